"""The attack of issue 12, on the real thing: a sponsor locked out by overlap control tries every
sponsor route that gives something new, and each is refused.

Reported: after an organisation was locked out (429 after the 21st overlap hit) it registered
five more versions of a saved question and a new one, and read all their answers with 200; the
budget's ``used`` never moved across 17 saved answers, and every version started recruitment.

Here the API runs over the real broker with a real stream worker keeping the saved question
live. An honest sponsor asks a question; the attacker registers the same criteria as a saved
question and reads its answer (charged once; re-reading the unchanged answer is free). Three
patients arrive, and the attacker asks the question again under another title: its sets are
each a few patients from the honest sponsor's, overlap control copies them (a hit), and with
``CONCIERGE_DC_LOCKOUT_AFTER=0`` the attacker is locked out. Then: an ad hoc question, a FHIR
Group question, a new saved question, a new version of the saved question and its answer, all
429 with ``Retry-After``; nothing is charged, no version reaches the trials topic; the honest
sponsor is unaffected; an administrator's unlock lets the attacker read again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concierge.api import create_app
from concierge.commands.generate import bundle
from core.auth import issue
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import KafkaSink
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)

from .test_feasibility_api import TeeSink, wait_ready
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
CRITERIA: dict[str, Any] = {
    "schema": "concierge.criteria/1",
    "title": "Type 2 diabetes",
    "inclusion": [{"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}],
}
SAVED = "attack-t2dm"


def newcomer(i: int) -> list[dict[str, Any]]:
    """A patient with type 2 diabetes who was not there before."""
    patient = {
        "resourceType": "Patient",
        "id": f"newcomer-{i}",
        "identifier": [
            {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": f"97314626{i:02d}"}
        ],
        "gender": "female",
        "birthDate": "1960-05-0" + str(i + 1),
    }
    condition = {
        "resourceType": "Condition",
        "id": f"newcomer-{i}-t2dm",
        "subject": {"reference": f"Patient/newcomer-{i}"},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "recordedDate": "2024-05-01",
    }
    return [patient, condition]


@pytest.fixture
def settings(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setenv("CONCIERGE_DC_LOCKOUT_AFTER", "0")  # the first overlap hit locks out
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:ehr",
    )


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        tmp_path / "worker-home",
        tmp_path / "worker.log",
    )
    proc.env["CONCIERGE_STREAM_TRIAL_SYNC_SECONDS"] = "0.5"
    yield proc
    proc.stop()


def answered(client: TestClient, path: str, headers: dict[str, str], worker: WorkerProcess) -> Any:
    """The saved answer, once the stream has evaluated the question (503s are waited out: a
    client honours Retry-After, and a 503 costs nothing)."""
    deadline = time.monotonic() + 120
    while True:
        response = client.get(path, headers=headers)
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            return response
        assert time.monotonic() < deadline, f"{response.text}\n{worker.tail()}"
        time.sleep(min(float(response.headers["Retry-After"]), 2.0))


def test_a_locked_out_sponsor_is_refused_every_route_that_answers(
    settings: Settings, worker: WorkerProcess
) -> None:
    config = GeneratorConfig(patients=400, seed=12)
    sink = TeeSink(KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix))
    ingestor = build_ingestor(settings, sink=sink)  # type: ignore[arg-type]
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in iter_patients(config):
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()

    key = settings.token_key.get_secret_value().encode()
    honest = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Honest Trials')}"}
    mallory = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Mallory Bio')}"}
    admin = {"Authorization": f"Bearer {issue(key, 'admin', 'site-ops')}"}
    answer_path = f"/v1/feasibility/saved-questions/{SAVED}/answer"
    app = create_app(settings)
    with TestClient(app) as client:
        service = app.state.feasibility
        wait_ready(client, 120)

        def budget() -> dict[str, Any]:
            found: dict[str, Any] = client.get("/v1/feasibility/budget", headers=mallory).json()
            return found

        def audited(method: str, path: str) -> dict[str, Any]:
            record = next(
                r for r in reversed(list(app.state.audit.records()))
                if r["action"] == f"{method} {path}"
            )  # fmt: skip
            detail: dict[str, Any] = json.loads(record["detail"])
            assert detail.pop("jti")  # every record names the caller's token (revocable by it)
            return detail

        assert client.post("/v1/feasibility/ask", json=CRITERIA, headers=honest).is_success

        # the attacker registers the same criteria as a saved question: charged and audited
        trial = {"id": SAVED, "title": "T2DM", "criteria": CRITERIA, "recruiting_sites": []}
        created = client.post("/v1/feasibility/saved-questions", json=trial, headers=mallory)
        assert created.status_code == 201, created.text
        assert audited("POST", "/v1/feasibility/saved-questions")["budget"] == {
            "charged": True,
            "used": 1,
        }
        worker.start()
        first = answered(client, answer_path, mallory, worker)
        assert audited("GET", answer_path)["budget"] == {"charged": True, "used": 2}
        assert audited("GET", answer_path)["overlap_hits"] == 0  # the same sets as published
        # reading the unchanged answer again is a republication: free, no overlap hit
        again = answered(client, answer_path, mallory, worker)
        assert again.json()["total"] == first.json()["total"]
        assert audited("GET", answer_path)["budget"] == {"charged": False, "used": 2}
        assert budget()["used"] == 2

        # three patients arrive; the attacker asks the question again under another title:
        # each set is a few patients from the honest sponsor's answer (differencing)
        for i in range(3):
            ingestor.ingest_bundle(bundle(newcomer(i)), "test")
        ingestor.commit()
        ingestor.vault.close()
        assert service.feed.wait_for(len(sink.envelopes), 60)
        wait_ready(client, 60)
        probe = {**CRITERIA, "title": "Type 2 diabetes, again"}
        asked = client.post("/v1/feasibility/ask", json=probe, headers=mallory)
        assert asked.status_code == 200, asked.text
        assert audited("POST", "/v1/feasibility/ask")["overlap_hits"] > 0
        assert budget()["used"] == 3

        # locked out: every route that would give something new is refused
        group = json.loads((EXAMPLES / "fhir" / "t2dm-group.json").read_text())
        attempts: list[tuple[str, str, Any]] = [
            ("POST", "/v1/feasibility/ask", CRITERIA),
            ("POST", "/v1/feasibility/ask", {**CRITERIA, "title": "Yet another title"}),
            ("POST", "/v1/feasibility/ask-group", group),
            ("POST", "/v1/feasibility/saved-questions", {**trial, "id": "attack-new"}),
            ("POST", "/v1/feasibility/saved-questions", {**trial, "title": "T2DM v2"}),
            ("GET", answer_path, None),
        ]
        for method, path, body in attempts:
            refused = client.request(method, path, json=body, headers=mallory)
            assert refused.status_code == 429, f"{method} {path}: {refused.text}"
            assert int(refused.headers["Retry-After"]) > 0
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert "suspended" in refused.json()["detail"]
            assert audited(method, path) == {"status": 429, "query": "", "budget": "locked"}
        status = budget()
        assert status["locked"] is True and status["used"] == 3
        # no new saved question, no new version: nothing reached the trials topic to recruit
        listed = client.get("/v1/feasibility/saved-questions", headers=mallory).json()
        assert [(t["id"], t["version"]) for t in listed] == [(SAVED, 1)]
        assert "attack-new" not in service.saved.trials

        # another sponsor is unaffected; an administrator lifts the lockout
        assert client.post("/v1/feasibility/ask", json=CRITERIA, headers=honest).is_success
        unlocked = client.post("/v1/admin/budgets/Mallory Bio/unlock", headers=admin)
        assert unlocked.status_code == 200 and unlocked.json()["locked"] is False
        assert answered(client, answer_path, mallory, worker).status_code == 200
