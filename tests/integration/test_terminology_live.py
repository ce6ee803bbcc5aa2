"""A saved question written in ECL, kept live by a real worker on the real broker: the live
cohort follows records coded anywhere under the expression as they stream in, and after a new
SNOMED CT release is loaded (with ``concierge terminology load``) that moves one concept out of
the hierarchy, the API publishes a new version of the saved question with the new expansion
and the patients coded with that concept leave the cohort (a cohort event each)."""

from __future__ import annotations

import os
import subprocess
import sys
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
from terminology.store import TerminologyStore

from ..terminology_fixtures import RELEASE_2025, RELEASE_2026
from .test_feasibility_api import wait_ready
from .test_live_cohorts import wait_for
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SNOMED = "http://snomed.info/sct"
TRIAL = "dm-ecl-live"


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
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


def diagnosed(name: str, code: str) -> list[dict[str, Any]]:
    """A patient and one SNOMED CT coded diagnosis, as a source would send them."""
    return [
        {
            "resourceType": "Patient",
            "id": name,
            "identifier": [{"system": "urn:test:mrn", "value": name}],
            "gender": "female",
            "birthDate": "1970-05-01",
        },
        {
            "resourceType": "Condition",
            "id": f"{name}-dx",
            "subject": {"reference": f"Patient/{name}"},
            "code": {"coding": [{"system": SNOMED, "code": code}]},
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "onsetDateTime": "2024-02-01",
        },
    ]


def test_an_ecl_saved_question_follows_new_records_and_a_new_release(
    settings: Settings, worker: WorkerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = f"sqlite:///{settings.home / 'terminology.db'}"
    settings.home.mkdir(parents=True, exist_ok=True)
    TerminologyStore(store_url).load(RELEASE_2025)
    monkeypatch.setenv("CONCIERGE_TERMINOLOGY_REFRESH_SECONDS", "0.5")

    sink = KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix)
    ingestor = build_ingestor(settings, sink=sink)
    first = {
        "type2": "44054006",
        "gestational": "11687002",
        "hypertension": "38341003",
        "type2-kidney": "420279001",  # under diabetes twice over (two parents)
    }
    for name, code in first.items():
        ingestor.ingest_bundle(bundle(diagnosed(name, code)), "test")
    ingestor.commit()

    app = create_app(settings)
    key = settings.token_key.get_secret_value().encode()
    sponsor = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Acme Pharma')}"}
    with TestClient(app) as client:
        service = app.state.feasibility
        view = service.cohorts
        wait_ready(client, 120)
        criteria = {
            "title": "Diabetes mellitus, any kind",
            "inclusion": [
                {"type": "condition", "codes": [{"system": "snomed", "ecl": "<< 73211009"}]}
            ],
        }
        created = client.post(
            "/v1/feasibility/saved-questions",
            json={"id": TRIAL, "title": "Diabetes by ECL", "criteria": criteria},
            headers=sponsor,
        )
        assert created.status_code == 201, created.text
        worker.start()

        def pseudonym(name: str) -> str:
            found = ingestor.patient_by_key(f"urn:test:ehr|Patient|{name}")
            assert found is not None
            return found

        def members_are(version: int, names: set[str]) -> Any:
            got = {r["patient"] for r in view.members(TRIAL, version)}
            want = {pseudonym(n) for n in names}
            if view.pending_partitions(TRIAL, version):
                return "pending"
            return True if got == want else (len(got), len(want))

        wait_for(lambda: members_are(1, {"type2", "gestational", "type2-kidney"}), 120,
                 "the first members", worker)  # fmt: skip

        # records coded with children and grandchildren stream in
        more = {
            "type2-plain": "313436004",
            "gestational-2": "11687002",
            "type1": "46635009",
            "kidney-only": "90708001",
        }
        for name, code in more.items():
            ingestor.ingest_bundle(bundle(diagnosed(name, code)), "test")
        ingestor.commit()
        everyone = {"type2", "gestational", "type2-kidney", "type2-plain", "gestational-2", "type1"}
        wait_for(lambda: members_are(1, everyone), 60, "members coded with children", worker)

        # a new release moves gestational diabetes out from under diabetes mellitus
        env = {**os.environ, "CONCIERGE_HOME": str(settings.home)}
        env.pop("CONCIERGE_TERMINOLOGY_STORE_URL", None)
        loaded = subprocess.run(
            [sys.executable, "-m", "concierge", "terminology", "load", str(RELEASE_2026)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert loaded.returncode == 0, loaded.stderr
        assert "version/20260101" in loaded.stdout

        deadline = time.monotonic() + 30
        while service.saved.get(TRIAL).version < 2:
            assert time.monotonic() < deadline, "the saved question was not re-expanded"
            time.sleep(0.2)
        record = service.saved.get(TRIAL)
        expansion = record.criteria.inclusion[0].any_of[0].codes[0].expansion
        assert expansion is not None and expansion.release is not None
        assert expansion.release.endswith("/version/20260101")
        assert "11687002" not in expansion.codes[SNOMED]
        left = {"gestational", "gestational-2"}
        wait_for(lambda: members_are(2, everyone - left), 90, "the cohort at version 2", worker)
        for name in left:  # each left with a cohort event at the new version
            event = view.records[TRIAL][pseudonym(name)]
            assert event["member"] is False and event["trial_version"] == 2, event
        # the saved question is shown with the release its expansion came from
        shown = client.get(f"/v1/feasibility/saved-questions/{TRIAL}", headers=sponsor).json()
        code = shown["criteria"]["inclusion"][0]["any_of"][0]["codes"][0]
        assert code["expansion"]["release"].endswith("/version/20260101")
        assert service.refresher is not None and service.refresher.problems == {}
    ingestor.vault.close()
