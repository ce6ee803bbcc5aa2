"""Device problems written in notes, on the real broker: DocumentReferences with plain-text notes
go through the real adapter (medspaCy's rules and ConText) to the facts topic, the real worker
counts an asserted problem as a candidate outcome ``<name> (from text)`` and the API's monitor
holds exactly the counters computed in batch from every published envelope; a negated note
gives no finding and counts nothing."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concierge.api import create_app
from concierge.commands.generate import bundle
from core.contracts.facts import TextFindingFact
from core.settings import Settings

from .surveillance_stack import Population, config, reference_counters
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASSERTED = "Review at clinic. The left hip prosthesis shows loosening of the acetabular cup."
NEGATED = "Review at clinic. No loosening of the hip prosthesis; wound healed."
OUTCOME = "joint mechanical complication (from text)"


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        surveillance_monitor=True,  # the monitor in this API process (as in the demo)
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:ehr",
        feasibility_feed=False,
        recruitment_api=False,
    )


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        tmp_path / "worker-home",
        tmp_path / "worker.log",
    )
    yield proc
    proc.stop()


def hip_implant(resources: list[dict[str, Any]]) -> tuple[str, datetime] | None:
    """The patient's id and the date of a hip implant (an Acetabulon or Exeter), if any."""
    devices = {
        r["id"]
        for r in resources
        if r["resourceType"] == "Device"
        and any(n.get("name") in ("Acetabulon X2", "Exeter V40") for n in r.get("deviceName", []))
    }
    for r in resources:
        if r["resourceType"] != "Procedure":
            continue
        manipulated = {
            f.get("manipulated", {}).get("reference", "").removeprefix("Device/")
            for f in r.get("focalDevice", [])
        }
        performed = r.get("performedDateTime") or r.get("performedPeriod", {}).get("start")
        if manipulated & devices and performed:
            patient = r["subject"]["reference"].removeprefix("Patient/")
            return patient, datetime.fromisoformat(performed.replace("Z", "+00:00"))
    return None


def note(note_id: str, patient: str, at: datetime, text: str) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": note_id,
        "status": "current",
        "subject": {"reference": f"Patient/{patient}"},
        "date": at.isoformat(),
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode()).decode(),
                }
            }
        ],
    }


def test_a_problem_in_a_note_is_counted_live_as_batch_counts_it(
    settings: Settings, worker: WorkerProcess
) -> None:
    population = Population.build(settings, config(patients=300))
    hips = [h for h in map(hip_implant, population.patients) if h is not None]
    assert len(hips) >= 2, "the generated population has two hip implants"
    (asserted_patient, implanted), (negated_patient, implanted_2) = hips[0], hips[1]
    population.send()
    notes = [
        note("note-asserted", asserted_patient, implanted + timedelta(days=60), ASSERTED),
        note("note-negated", negated_patient, implanted_2 + timedelta(days=60), NEGATED),
    ]
    population.ingestor.ingest_bundle(bundle(notes), "notes")
    population.ingestor.commit()

    envelopes = population.recorder.envelopes
    # the generator's own AdverseEvents carry text too (an infection): only the notes here
    findings = [
        (e.key, f)
        for e in envelopes
        if "|DocumentReference|" in e.key
        for f in e.facts
        if isinstance(f, TextFindingFact)
    ]
    assert [(key.rsplit("|", 1)[-1], f.problem) for key, f in findings] == [
        ("note-asserted", "LOOSENING")
    ], "the negated note gives no finding"
    (_, finding) = findings[0]
    assert ASSERTED[finding.start : finding.end] == "loosening"

    want = reference_counters(envelopes)
    from_text = [k for k in want.counts if k[2] == OUTCOME]
    assert from_text, f"batch counts the note's problem as {OUTCOME!r}"
    counted = {p for k in from_text for p in want.patients(k)}
    assert len(counted) == 1, counted

    app = create_app(settings)
    with TestClient(app):
        monitor = app.state.surveillance
        worker.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with monitor.lock:
                if monitor.counters == want and monitor.ready:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the monitor's counters never equalled batch\n{worker.tail()}")
        with monitor.lock:
            live = {p for k in from_text for p in monitor.counters.patients(k)}
        assert live == counted
