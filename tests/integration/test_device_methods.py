"""Every method live, on the real broker: outcome definitions that choose the binomial MaxSPRT (a
self-controlled risk interval) and the risk-adjusted CUSUM are run by the real worker (which
writes the window keys into each contribution) and the API's monitor, and the numbers the API
shows equal the ones computed in batch from every published envelope."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from concierge.api import create_app
from core.auth import issue
from core.settings import Settings
from surveillance_stream import patient_state
from surveillance_stream.devices import (
    ICD10,
    OPCS4,
    SNOMED,
    Counters,
    contribution,
    outcome_definitions_from_json,
)
from surveillance_stream.signals import SignalConfig, assess, signal_id

from .surveillance_stack import FAULTY_NODE, Population, config
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: the default outcomes, but complications read by the CUSUM and infections by the binomial MaxSPRT
DEFINITIONS: list[dict[str, Any]] = [
    {"name": "adverse event", "kinds": ["adverse_event"]},
    {"name": "hip revision within 1 year", "codes": [f"{SNOMED}|179344006", f"{OPCS4}|W37.3"],
     "kinds": ["procedure"], "device_class": "hip", "window_days": 365},
    {"name": "joint mechanical complication", "codes": [f"{ICD10}|T84.0"],
     "kinds": ["condition", "adverse_event"], "device_class": ["hip", "knee"],
     "window_days": 1095, "method": "cusum"},
    {"name": "device infection", "codes": [f"{ICD10}|T84.5"],
     "kinds": ["condition", "adverse_event"], "device_class": ["hip", "knee"],
     "window_days": 1095, "method": "binomial", "risk_window": [1, 180],
     "control_window": [181, 720]},
]  # fmt: skip


@pytest.fixture
def definitions_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "outcomes.json"
    path.write_text(json.dumps(DEFINITIONS))
    monkeypatch.setenv("CONCIERGE_DEVICE_OUTCOMES", str(path))  # the API's monitor reads it
    return path


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
def worker(settings: Settings, tmp_path: Path, definitions_file: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        tmp_path / "worker-home",
        tmp_path / "worker.log",
    )
    proc.env["CONCIERGE_DEVICE_OUTCOMES"] = str(definitions_file)
    yield proc
    proc.stop()


def batch_counters(envelopes: list[Any]) -> Counters:
    definitions = outcome_definitions_from_json(DEFINITIONS)
    patients: dict[str, dict[str, Any]] = {}
    for key, entry in patient_state.fold(envelopes).items():
        patient, resource = patient_state.split_key(key)
        patients.setdefault(patient, {})[resource] = entry
    return Counters.rebuild(contribution(p, e, definitions) for p, e in patients.items())


def test_binomial_maxsprt_and_cusum_run_live(settings: Settings, worker: WorkerProcess) -> None:
    population = Population.build(settings, config(patients=1500))
    population.send()
    key = settings.token_key.get_secret_value().encode()
    regulator = {"Authorization": f"Bearer {issue(key, 'regulator', 'MHRA')}"}
    app = create_app(settings)
    with TestClient(app) as client:
        monitor = app.state.surveillance
        assert monitor.config.method("device infection") == "binomial"
        assert monitor.config.method("joint mechanical complication") == "cusum"
        worker.start()
        want = batch_counters(population.recorder.envelopes)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with monitor.lock:
                if monitor.counters == want and monitor.ready and monitor.assessments:
                    break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the monitor's counters never equalled batch\n{worker.tail()}")
        assert any("@risk" in k[2] or "@control" in k[2] for k in want.counts)
        reference = SignalConfig().with_definitions(outcome_definitions_from_json(DEFINITIONS))
        day = want.latest_day
        for outcome, method in (("device infection", "binomial"),
                                ("joint mechanical complication", "cusum")):  # fmt: skip
            identifier = signal_id(FAULTY_NODE, outcome)
            deadline = time.monotonic() + 30
            while identifier not in monitor.assessments and time.monotonic() < deadline:
                time.sleep(0.5)
            detail = client.get(f"/v1/surveillance/signals/{identifier}", headers=regulator)
            assert detail.status_code == 200, detail.text
            shown = detail.json()["assessment"]
            expected = assess(want, FAULTY_NODE, outcome, at=day, config=reference).to_dict()
            assert shown["method"] == method
            if method == "binomial":
                for field in ("cases", "controls", "z", "llr", "cv", "cv_midpoint", "signal"):
                    assert shown["binomial"][field] == pytest.approx(expected["binomial"][field])
                assert shown["binomial"]["periods"], "quarters with complete follow-up count"
                assert "binomial_cv" in detail.json()["reproduce"]
            else:
                assert shown["cusum"]["steps"] and shown["cusum"]["score"] == pytest.approx(
                    expected["cusum"]["score"]
                )
            assert shown["rules"]["maxsprt"] == expected["rules"]["maxsprt"]
