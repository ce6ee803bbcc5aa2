"""The sponsor API on the real broker: a synthetic population ingested through the adapters
into Kafka, the API's snapshot fed from the facts topic, answers checked against the
reference engine over the very envelopes that were published (the oracle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fastapi.testclient import TestClient

from concierge.api import create_app
from concierge.commands.generate import bundle
from core.auth import issue
from core.contracts.facts import ReferenceRecord, ResourceFacts
from core.settings import Settings
from feasibility.criteria import parse_question
from feasibility.engines.reference import ReferenceEngine
from feasibility.engines.results import cohort, funnel
from feasibility.service import answer_sets
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import DeadLetter, KafkaSink
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from surveillance_stream import patient_state

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "criteria"
INDEX = "2026-01-01"


class TeeSink:
    """Publishes to Kafka and keeps a copy of every envelope for the oracle."""

    def __init__(self, kafka: KafkaSink) -> None:
        self.kafka = kafka
        self.envelopes: list[ResourceFacts] = []

    def facts(self, envelope: ResourceFacts) -> None:
        self.envelopes.append(envelope)
        self.kafka.facts(envelope)

    def reference(self, record: ReferenceRecord) -> None:
        self.kafka.reference(record)

    def dead_letter(self, letter: DeadLetter) -> None:
        self.kafka.dead_letter(letter)

    def flush(self) -> None:
        self.kafka.flush()


@pytest.fixture(scope="module")
def world(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    import uuid

    from infra.topics_admin import ensure_topics

    prefix = f"t-feasibility-{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix)
    home = tmp_path_factory.mktemp("feasibility-home")
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        home=home,
        source_system="urn:test:ehr",
    )
    sink = TeeSink(KafkaSink(kafka_bootstrap, prefix))
    ingestor = build_ingestor(settings, sink=sink)  # type: ignore[arg-type]
    config = GeneratorConfig(patients=1500, seed=7)
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in iter_patients(config):
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()
    ingestor.vault.close()
    population = patient_state.fold(sink.envelopes)
    by_patient: dict[str, dict[str, Any]] = {}
    for key, entry in population.items():
        patient, resource = patient_state.split_key(key)
        by_patient.setdefault(patient, {})[resource] = entry
    app = create_app(settings)
    with TestClient(app) as client:
        service = app.state.feasibility
        assert service.feed.wait_for(len(sink.envelopes), 120), service.feed.status()
        wait_ready(client, 120)
        key = settings.token_key.get_secret_value().encode()
        yield {
            "client": client,
            "app": app,
            "population": by_patient,
            "envelopes": sink.envelopes,
            "sponsor": {"Authorization": f"Bearer {issue(key, 'sponsor', 'Acme Pharma')}"},
            "other": {"Authorization": f"Bearer {issue(key, 'sponsor', 'Rival Bio')}"},
            "clinician": {"Authorization": f"Bearer {issue(key, 'clinician', 'RA0')}"},
            "regulator": {"Authorization": f"Bearer {issue(key, 'regulator', 'MHRA')}"},
        }


def wait_ready(client: Any, timeout: float) -> None:
    """Until the API's /readyz says every view it answers from has caught up."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        assert time.monotonic() < deadline, response.text
        time.sleep(0.25)


def example(name: str) -> dict[str, Any]:
    criteria: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    criteria["index_date"] = INDEX  # the synthetic population's "today"
    return criteria


def rounded(n: int) -> str:
    return str(5 * ((n + 2) // 5))


@pytest.mark.parametrize("name", ["t2dm-sglt2.json", "heart-failure.json", "nsclc-egfr.json"])
def test_answer_matches_the_reference_engine_under_disclosure(
    world: dict[str, Any], name: str
) -> None:
    criteria = example(name)
    question = parse_question(criteria)
    at = datetime.now(UTC)
    results = ReferenceEngine().evaluate(question, world["population"], at)
    true_cohort = cohort(question, results)
    true_funnel = funnel(question, results)

    # Exactly: the polars engine over the snapshot fed from Kafka finds the same patients
    # as the reference engine over the envelopes that were published.
    service = world["app"].state.feasibility
    steps = service.evaluate(question, at)
    members = steps.filter(pl.col("member")).get_column("pid").to_list()
    assert {service.snapshot.pseudonym_of(pid) for pid in members} == set(true_cohort)
    sets = answer_sets(question, steps)
    assert [len(s.remaining) for s in sets.funnel] == [len(s.remaining) for s in true_funnel]

    # What the sponsor sees is that, under disclosure control.
    response = world["client"].post("/v1/feasibility/ask", json=criteria, headers=world["sponsor"])
    assert response.status_code == 200, response.text
    answer = response.json()
    total = answer["total"]
    if len(true_cohort) < 10:
        assert total["suppressed"] and total["display"] == "withheld"
    else:  # shown rounded, or withheld to protect another cell
        assert total["display"] in (rounded(len(true_cohort)), "withheld")
    assert [step["label"] for step in answer["funnel"]][1:] == [
        step.label for step in question.steps
    ]
    population = sum(1 for r in results.values() if r.in_population)
    assert answer["funnel"][0]["entered"]["display"] == rounded(population)
    for cell in [*answer["by_site"].values(), *answer["by_region"].values()]:
        assert cell["suppressed"] or cell["value"] >= 10
    # what cannot all be shown is said in words, and no cell claims to be under the threshold
    for step in answer["funnel"]:
        hidden = [f for f in ("entered", "passed", "failed", "unknown", "remaining")
                  if step[f]["suppressed"]]  # fmt: skip
        assert (step["note"] is None) == (not hidden)
        assert all(step[f]["display"] == "withheld" for f in hidden)
    sites_hidden = sum(1 for c in answer["by_site"].values() if c["suppressed"])
    if sites_hidden:
        assert answer["notes"][0].startswith(f"{sites_hidden} of {len(answer['by_site'])} site")
    assert "<10" not in response.text
    assert "p-" not in response.text  # no pseudonym, ever
    assert answer["rules"]


def test_repeating_a_question_gives_the_same_answer(world: dict[str, Any]) -> None:
    criteria = example("t2dm-sglt2.json")
    answers = [
        world["client"].post("/v1/feasibility/ask", json=criteria, headers=world["sponsor"]).json()
        for _ in range(5)
    ]
    keys = ("total", "by_site", "by_region", "funnel")
    assert all({k: a[k] for k in keys} == {k: answers[0][k] for k in keys} for a in answers)


def test_roles_and_errors(world: dict[str, Any]) -> None:
    client = world["client"]
    criteria = example("t2dm-sglt2.json")
    assert client.post("/v1/feasibility/ask", json=criteria).status_code == 401
    for role in ("clinician", "regulator"):
        response = client.post("/v1/feasibility/ask", json=criteria, headers=world[role])
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("application/problem+json")
    bad = client.post(
        "/v1/feasibility/ask",
        json={"inclusion": [{"type": "age"}]},
        headers=world["sponsor"],
    )
    assert bad.status_code == 422
    assert "min and/or max" in bad.text
    assert bad.headers["content-type"].startswith("application/problem+json")


def test_saved_questions_lifecycle_and_isolation(world: dict[str, Any]) -> None:
    client = world["client"]
    trial = {
        "id": "hf-arni-001",
        "title": "HFrEF not on an ARNI",
        "criteria": example("heart-failure.json"),
        "recruiting_sites": ["RA0", "RA1"],
        "target": 50,
    }
    created = client.post("/v1/feasibility/saved-questions", json=trial, headers=world["sponsor"])
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    assert created.headers["location"].endswith("/hf-arni-001")
    listed = client.get("/v1/feasibility/saved-questions", headers=world["sponsor"]).json()
    assert [t["id"] for t in listed] == ["hf-arni-001"]
    # another sponsor sees nothing and cannot take it over
    assert client.get("/v1/feasibility/saved-questions", headers=world["other"]).json() == []
    assert (
        client.get(
            "/v1/feasibility/saved-questions/hf-arni-001", headers=world["other"]
        ).status_code
        == 404
    )
    assert (
        client.post(
            "/v1/feasibility/saved-questions", json=trial, headers=world["other"]
        ).status_code
        == 409
    )
    # No stream worker runs in this module: the live answer says so instead of counting an
    # empty cohort (which it did before, with HTTP 200).
    answer = client.get(
        "/v1/feasibility/saved-questions/hf-arni-001/answer", headers=world["sponsor"]
    )
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"]
    assert "still being evaluated" in " ".join(answer.json()["detail"]["waiting_for"])
    retired = client.delete("/v1/feasibility/saved-questions/hf-arni-001", headers=world["sponsor"])
    assert retired.json()["status"] == "retired"
    assert retired.json()["version"] == 2
    assert (
        client.get(
            "/v1/feasibility/saved-questions/hf-arni-001/answer", headers=world["sponsor"]
        ).status_code
        == 409
    )


def test_every_request_is_audited_without_patient_data(world: dict[str, Any]) -> None:
    audit = world["app"].state.audit
    records = [r for r in audit.records() if r["action"].startswith("POST /v1/feasibility/ask")]
    assert records
    assert all("p-" not in r["detail"] for r in audit.records())
    assert audit.verify().ok


def test_a_definitional_fhir_group_is_asked_like_criteria(world: dict[str, Any]) -> None:
    group = json.loads((EXAMPLES.parent / "fhir" / "t2dm-group.json").read_text())
    client = world["client"]
    response = client.post("/v1/feasibility/ask-group", json=group, headers=world["sponsor"])
    assert response.status_code == 200, response.text
    labels = [step["label"] for step in response.json()["funnel"]]
    assert labels == [
        "population", "Type 2 diabetes", "Aged 18 to 80", "HbA1c 7.5% or more", "On insulin",
    ]  # fmt: skip
    bad = client.post(
        "/v1/feasibility/ask-group",
        json={**group, "membership": "enumerated"},
        headers=world["sponsor"],
    )
    assert bad.status_code == 422
    assert "definitional" in bad.json()["detail"]


def test_the_query_budget_locks_a_sponsor_out_with_retry_after(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCIERGE_DC_QUERY_BUDGET", "2")
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix, home=tmp_path
    )
    key = settings.token_key.get_secret_value().encode()
    sponsor = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Greedy Ltd')}"}
    other = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Patient Ltd')}"}
    criteria = example("t2dm-sglt2.json")
    with TestClient(create_app(settings)) as client:
        wait_ready(client, 120)  # a 503 while views catch up is charged nothing
        # the same question twice: its unchanged answer is republished, free; then another one
        for title in ("first", "first", "second"):
            asked = {**criteria, "title": title}
            assert client.post("/v1/feasibility/ask", json=asked, headers=sponsor).is_success
        assert client.get("/v1/feasibility/budget", headers=sponsor).json()["used"] == 2
        # spent: refused, even the question whose answer would be unchanged
        again = client.post("/v1/feasibility/ask", json={**criteria, "title": "first"},
                            headers=sponsor)  # fmt: skip
        assert again.status_code == 429
        refused = client.post("/v1/feasibility/ask", json=criteria, headers=sponsor)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert refused.headers["content-type"].startswith("application/problem+json")
        budget = client.get("/v1/feasibility/budget", headers=sponsor).json()
        assert budget["remaining"] == 0
        # budgets are per organisation
        assert client.post("/v1/feasibility/ask", json=criteria, headers=other).is_success


def test_a_bad_unit_is_refused_with_the_criterion_s_place(world: dict[str, Any]) -> None:
    """A misspelt unit or one of the wrong kind made the step UNKNOWN for everyone (a 200
    with an empty cohort); it is a 422 naming where it is, on every route that takes criteria."""
    client = world["client"]
    for unit, message in (("mmol/mool", "unknown unit atom 'mool'"), ("kg", "'kg'")):
        criteria = example("t2dm-sglt2.json")
        criteria["inclusion"][2]["any_of"][0]["value"]["unit"] = unit
        trial = {"id": "t2dm-bad-unit", "title": "Bad unit", "criteria": criteria}
        for route, body, pointer in (
            ("ask", criteria, "/inclusion/2/any_of/0/value/unit"),
            ("check", criteria, "/inclusion/2/any_of/0/value/unit"),
            ("saved-questions", trial, "/criteria/inclusion/2/any_of/0/value/unit"),
        ):
            response = client.post(f"/v1/feasibility/{route}", json=body, headers=world["sponsor"])
            assert response.status_code == 422, (route, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            (error,) = response.json()["detail"]
            assert error["pointer"] == pointer, (route, error)
            assert message in error["msg"], (route, error)
    listed = client.get("/v1/feasibility/saved-questions", headers=world["sponsor"]).json()
    assert "t2dm-bad-unit" not in [t["id"] for t in listed]


def test_each_step_says_how_many_results_were_skipped_as_unconvertible(
    world: dict[str, Any],
) -> None:
    """Per funnel step with a unit to convert to, the results its criteria skipped because
    their unit does not convert, among the patients who entered the step (the oracle: the
    reference engine's per-patient counts), under the small-number rule and rounding."""
    criteria = example("t2dm-sglt2.json")
    question = parse_question(criteria)
    service = world["app"].state.feasibility
    response = world["client"].post("/v1/feasibility/ask", json=criteria, headers=world["sponsor"])
    assert response.status_code == 200, response.text
    results = ReferenceEngine().evaluate(question, world["population"], datetime.now(UTC))
    true_funnel = funnel(question, results)[1:]
    for i, step in enumerate(response.json()["funnel"][1:]):
        if i not in (2, 4):  # only the HbA1c and eGFR steps convert units
            assert "unconvertible_results" not in step, step
            continue
        entered = true_funnel[i].entered
        skipped = sum(results[p].unconvertible[i] for p in entered)
        patients = sum(1 for p in entered if results[p].unconvertible[i])
        cell = step["unconvertible_results"]
        if service.policy.is_small(skipped) or service.policy.is_small(patients):
            assert cell == {
                "value": None,
                "display": service.policy.withheld_display,
                "suppressed": True,
            }, (i, cell)
        else:
            assert cell["value"] == service.policy.rounded(skipped), (i, cell)
