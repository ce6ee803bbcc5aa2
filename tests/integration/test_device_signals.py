"""Device surveillance on the real broker, end to end: a real worker keeps each patient's
contribution to the device counters, the API's signal monitor sums them and assesses them.

* Stream equals batch: after a SIGKILL of the worker mid-stream and a restart, the monitor's
  counters equal the counters computed in batch from every envelope published (nothing lost,
  nothing counted twice).
* The injected faulty hip model signals; the regulator API shows its statistics, history,
  breakdowns and provenance, and lifecycle actions move it (illegal ones are refused with 409);
  each move is an event on the signals topic and an audit record.
* Retractions retract: deleting the faulty model's outcome records moves the statistics back,
  lapses the signals nobody reviewed, and the counters equal the batch counters again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from fastapi.testclient import TestClient

from concierge.api import create_app
from core.auth import issue
from core.contracts.signals import SIGNAL_EVENT_SCHEMA
from core.settings import Settings
from infra.topics import SIGNALS
from tests.generative.test_device_counters import faulty_outcome_records

from .surveillance_stack import FAULTY_NODE, Population, config, reference_counters
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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


def wait_for(predicate: Any, timeout: float, what: str, worker: WorkerProcess) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last is True or (last and not isinstance(last, tuple | str)):
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last}\n{worker.tail()}")


def signal_events(settings: Settings) -> list[dict[str, Any]]:
    topic = settings.topic(SIGNALS)
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "t-signals-read"}
    )
    high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    events: list[dict[str, Any]] = []
    read = 0
    deadline = time.monotonic() + 30
    while read < high and time.monotonic() < deadline:
        for message in consumer.consume(500, timeout=0.5):
            if message.error() is None:
                read = max(read, message.offset() + 1)
            if message.error() is None and message.value():
                found = orjson.loads(message.value())
                if found.get("schema") == SIGNAL_EVENT_SCHEMA:  # not the tree scan's looks
                    events.append(found)
    consumer.close()
    return events


def check_report(
    client: TestClient, headers: dict[str, str], identifier: str, detail: dict[str, Any]
) -> None:
    """The HTML and PDF reports show the API's numbers; the PDF renders (pdftoppm)."""
    from surveillance_stream.report import fmt

    maxsprt = detail["assessment"]["maxsprt"]
    numbers = [fmt(maxsprt["llr"]), fmt(maxsprt["expected"]), fmt(maxsprt["expected_crude"]),
               fmt(maxsprt["cv"]), str(detail["assessment"]["table"]["a"])]  # fmt: skip
    page = client.get(f"/v1/surveillance/signals/{identifier}/report", headers=headers)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for number in numbers:
        assert number in page.text, number
    pdf = client.get(f"/v1/surveillance/signals/{identifier}/report?format=pdf", headers=headers)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    text = pdf_text(pdf.content)
    for number in numbers:
        assert number in text, number
    pages = render_pdf_pages(pdf.content)
    assert pages and all(p.stat().st_size > 10_000 for p in pages)


def pdf_text(content: bytes) -> str:
    """The PDF's text (pdftotext, poppler-utils, beside pdftoppm)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.pdf"
        path.write_bytes(content)
        tool = str(Path(pdftoppm_path()).with_name("pdftotext"))
        out = subprocess.run([tool, "-layout", str(path), "-"], capture_output=True, check=True)
        return out.stdout.decode()


def pdftoppm_path() -> str:
    import os
    import shutil

    found = os.environ.get("CONCIERGE_PDFTOPPM") or shutil.which("pdftoppm")
    assert found, "pdftoppm is missing: scripts/test.sh installs poppler-utils"
    return found


def render_pdf_pages(content: bytes, folder: Path | None = None) -> list[Path]:
    """Each page of a PDF as a PNG (pdftoppm at 60 dpi)."""
    import subprocess
    import tempfile

    target = folder or Path(tempfile.mkdtemp())
    path = target / "report.pdf"
    path.write_bytes(content)
    subprocess.run(
        [pdftoppm_path(), "-png", "-r", "60", str(path), str(target / "page")], check=True
    )
    return sorted(target.glob("page*.png"))


def test_faulty_model_signals_live_and_retractions_move_it_back(
    settings: Settings, worker: WorkerProcess
) -> None:
    population = Population.build(settings, config())
    half = len(population.patients) // 2
    population.send(half)
    key = settings.token_key.get_secret_value().encode()
    regulator = {"Authorization": f"Bearer {issue(key, 'regulator', 'MHRA')}"}
    app = create_app(settings)
    with TestClient(app) as client:
        monitor = app.state.surveillance
        worker.start()
        worker.wait_until(lambda d: d.get("exposed_patients", 0) > 0, 120, "/state/devices")
        worker.kill()  # mid-stream: no final commit, table writes after the last one in flight
        population.send()
        worker.start()

        def counters_equal_batch() -> Any:
            want = reference_counters(population.recorder.envelopes)
            with monitor.lock:
                got = monitor.counters.to_dict()
            if got == want.to_dict():
                return True
            return (len(got["counts"]), len(want.to_dict()["counts"]))

        wait_for(counters_equal_batch, 180, "the monitor's counters to equal batch", worker)
        assert monitor.ready and not monitor.error

        def faulty_signalled() -> Any:
            response = client.get("/v1/surveillance/signals", headers=regulator)
            if response.status_code != 200:
                return response.text
            rows = response.json()["signals"]
            found = [r for r in rows if r["node"] == FAULTY_NODE and r["state"] == "signalled"]
            return found or "no signal yet"

        signalled = wait_for(faulty_signalled, 60, "the faulty model to signal", worker)
        listing = client.get("/v1/surveillance/signals", headers=regulator).json()["signals"]
        assert listing[0]["signal"], "signalling rows come first"
        assert listing[0]["strength"] >= 1.0
        target = signalled[0]
        assert target["observed"] > target["expected"]
        assert "maxsprt" in target["fired"]

        # the detail reproduces: the 2x2 in the reproduce command is the assessment's table
        detail = client.get(f"/v1/surveillance/signals/{target['id']}", headers=regulator).json()
        table = detail["assessment"]["table"]
        assert f"--a {table['a']} --b {table['b']}" in detail["reproduce"]["disproportionality"]
        assert [e["action"] for e in detail["events"]] == ["detect"]

        history = client.get(
            f"/v1/surveillance/signals/{target['id']}/history", headers=regulator
        ).json()["points"]
        assert history and history[-1]["observed"] == target["observed"]
        assert [p["observed"] for p in history] == sorted(p["observed"] for p in history)

        # adjusted expectations with the crude alongside; the cumulative expected never dips
        assert detail["assessment"]["adjustment"]["by"] == ["age", "sex"]
        assert detail["assessment"]["maxsprt"]["expected_crude"] is not None
        assert [p["expected"] for p in history] == sorted(p["expected"] for p in history)

        # the tree-based scan on demand (exploratory: spends nothing, signals nothing)
        scanned = client.post("/v1/surveillance/scan", json={"seed": 7}, headers=regulator)
        assert scanned.status_code == 200, scanned.text
        look = scanned.json()
        assert look["look"] is None and look["signals"] == [] and look["top"]
        assert look["variant"] == "conditional Poisson tree-based scan"
        top = look["top"][0]
        assert top["observed"] > top["expected"] and 0 < top["p_value"] <= 1
        view = client.get("/v1/surveillance/scan", headers=regulator).json()
        assert view["latest"]["at"] == look["at"] and view["plan"]["looks"] == 104

        # the report to file: HTML and PDF with the numbers the API gives
        check_report(client, regulator, target["id"], detail)

        by_lot = client.get(
            f"/v1/surveillance/signals/{target['id']}/breakdown?by=lot", headers=regulator
        ).json()["rows"]
        assert by_lot and all(r["node"].startswith(FAULTY_NODE + "/") for r in by_lot)
        shown = [r["with_outcome"] for r in by_lot]
        assert all(isinstance(v, str) or v == 0 or v >= 10 for v in shown), shown
        by_site = client.get(
            f"/v1/surveillance/signals/{target['id']}/breakdown?by=site", headers=regulator
        )
        assert by_site.status_code == 200 and by_site.json()["rows"]

        provenance = client.get(
            f"/v1/surveillance/signals/{target['id']}/provenance?limit=10000", headers=regulator
        ).json()
        assert provenance["patients"] == target["observed"]
        # the records behind the count: each device, and the record making the outcome (a
        # revision procedure is both: it names the device and ends the exposure)
        kinds = {s["resource_type"] for s in provenance["sources"]}
        assert "Device" in kinds and kinds & {"AdverseEvent", "Condition", "Procedure"}, kinds
        assert {s["role"] for s in provenance["sources"]} <= {"exposure", "outcome"}
        assert all(s["resource_id"] and s["version"] for s in provenance["sources"])

        # lifecycle: review, an illegal move refused, then confirm
        reviewed = client.post(
            f"/v1/surveillance/signals/{target['id']}/actions",
            json={"action": "review", "reason": "assigned to the orthopaedic team"},
            headers=regulator,
        )
        assert reviewed.status_code == 200, reviewed.text
        assert reviewed.json()["signal"]["state"] == "under_review"
        illegal = client.post(
            f"/v1/surveillance/signals/{target['id']}/actions",
            json={"action": "close"},
            headers=regulator,
        )
        assert illegal.status_code == 409
        assert "confirm" in illegal.json()["detail"]
        sponsor = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Acme')}"}
        assert client.get("/v1/surveillance/signals", headers=sponsor).status_code == 403

        # Retractions retract: entered-in-error outcome records of the faulty model
        for rtype, rid in faulty_outcome_records(population.patients):
            population.ingestor.delete(rtype, rid, "test")
        population.ingestor.commit()
        wait_for(counters_equal_batch, 120, "the counters after the retractions", worker)

        def moved_back() -> Any:
            rows = client.get("/v1/surveillance/signals", headers=regulator).json()["signals"]
            mine = [r for r in rows if r["node"] == FAULTY_NODE]
            if any(r["signal"] or r["state"] == "signalled" for r in mine):
                return "still signalling"
            return mine

        after = {r["id"]: r for r in wait_for(moved_back, 60, "the signals to lapse", worker)}
        assert after[target["id"]]["state"] == "under_review"  # reviewed: only people move it
        assert after[target["id"]]["observed"] < target["observed"]
        for other in signalled[1:]:
            assert after[other["id"]]["state"] == "none"

    events = signal_events(settings)
    mine = [e for e in events if e["signal"] == target["id"]]
    assert [e["action"] for e in mine] == ["detect", "review"]
    assert {e["action"] for e in events} >= {"detect", "review", "lapse"} or len(signalled) == 1
    actions = [r["action"] for r in app.state.audit.records()]
    assert "signal.detect" in actions and "signal.review" in actions
    assert app.state.audit.verify().ok
