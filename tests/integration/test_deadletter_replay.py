"""``concierge deadletter`` on the real broker: a resource dead-lettered for a cause, the cause
fixed, replay moves it into the facts exactly once; a second replay moves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.contracts.facts import decode_resource_facts, envelopes_of
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from infra.topics import DEADLETTER, FACTS
from tests.integration.test_ingest_kafka import read_all

pytestmark = pytest.mark.integration

SOURCE = "urn:it:replay-ehr"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


def patient(rid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": rid, "identifier": [{"system": NHS, "value": rid}]}


def observation(rid: str, subject: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": f"Patient/{subject}"},
        "effectiveDateTime": "2024-01-01T09:00:00Z",
        "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "concierge", "deadletter", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def observation_envelopes(bootstrap: str, topic: str, expect: int) -> dict[str, list[int]]:
    """seqs published per Observation key on the facts topic."""
    found: dict[str, list[int]] = {}
    for _, value in read_all(bootstrap, topic, expect_at_least=expect):
        for envelope in envelopes_of(value):
            facts = decode_resource_facts(json.dumps(envelope))
            if "|Observation|" in facts.key:
                found.setdefault(facts.key, []).append(facts.seq)
    return found


def test_replay_moves_a_fixed_letter_in_once(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=home,
        source_system=SOURCE,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        CONCIERGE_TOPIC_PREFIX=topic_prefix,
        CONCIERGE_HOME=str(home),
        CONCIERGE_SOURCE_SYSTEM="urn:it:some-other-default",  # letters name their source
    )
    # the cause: observations of a patient the adapter has not seen yet (their Patient came
    # late), next to one that will keep failing (its patient never comes) and one accepted
    ingestor = build_ingestor(settings)
    try:
        ingestor.ingest_resource(patient("known"), "it:batch-1")
        assert ingestor.ingest_resource(observation("ok", "known", 1.0), "it:batch-1").status == (
            "accepted"
        )
        late = ingestor.ingest_resource(observation("late", "late-patient", 2.0), "it:batch-1")
        never = ingestor.ingest_resource(observation("never", "ghost", 3.0), "it:batch-1")
        assert late.status == never.status == "dead_lettered"
        ingestor.commit()
    finally:
        ingestor.vault.close()

    listed = cli(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [(x["resource_type"], x["resource_id"]) for x in letters] == [
        ("Observation", "late"),
        ("Observation", "never"),
    ]
    assert all(x["codes"][-1] == "not-found" for x in letters)
    assert all("payload" not in x for x in letters)  # list shows no patient data
    filtered = json.loads(cli(env, "list", "--json", "--reason", "NOT-FOUND").stdout)
    assert len(filtered) == 2
    assert json.loads(cli(env, "list", "--json", "--since", "2999-01-01").stdout) == []
    assert len(json.loads(cli(env, "list", "--json", "--since", "1h").stdout)) == 2
    bad = cli(env, "list", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr
    shown = cli(env, "show", letters[0]["id"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(json.loads(shown.stdout)["payload"])["id"] == "late"

    # the fix: the late patient arrives
    ingestor = build_ingestor(settings)
    try:
        assert ingestor.ingest_resource(patient("late-patient"), "it:batch-2").status == (
            "accepted"
        )
        ingestor.commit()
    finally:
        ingestor.vault.close()

    first = cli(env, "replay", "--json")
    assert first.returncode == 1, first.stderr  # one still fails
    report = json.loads(first.stdout)
    results = {row["resource_id"]: row["result"] for row in report["rows"]}
    assert results == {"late": "re-ingested", "never": "still failing"}
    assert "unknown patient" in next(
        r["reason"] for r in report["rows"] if r["resource_id"] == "never"
    )
    second = cli(env, "replay", "--json", "--reason", "not-found")
    second_report = json.loads(second.stdout)
    results = {row["resource_id"]: row["result"] for row in second_report["rows"]}
    assert results == {"late": "already present", "never": "still failing"}
    assert second_report["counts"]["re-ingested"] == 0

    # exactly once in the facts, as the source that sent it; nothing dead-lettered again
    seqs = observation_envelopes(kafka_bootstrap, topic_prefix + FACTS, expect=3)
    assert sorted(seqs) == [f"{SOURCE}|Observation|late", f"{SOURCE}|Observation|ok"]
    assert all(len(v) == 1 for v in seqs.values()), seqs
    assert len(read_all(kafka_bootstrap, topic_prefix + DEADLETTER, expect_at_least=2)) == 2
