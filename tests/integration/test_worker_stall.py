"""A real worker whose facts partition stops being fetched (paused in Faust's consumer by a
test extension, as faust-streaming has been reported to leave partitions): the stall watch must
say so on /readyz, /metrics and in the log, and resume the partition, after which the state
holds every message. CI saw a worker stop part-way and answer from a partial state for two
minutes with nothing said (tests/integration/test_worker.py, state pages test)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from surveillance_stream import patient_state

from .test_worker import synthetic_envelopes
from .test_worker_recovery import produce
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration]

PARTITION = 1
FIRST = 60


def test_a_partition_left_paused_is_reported_stalled_then_resumed(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    envelopes = synthetic_envelopes(300, seed=12)
    worker = WorkerProcess(kafka_bootstrap, topic_prefix, tmp_path / "home", tmp_path / "w.log")
    worker.env |= {
        "CONCIERGE_STREAM_EXTENSIONS": "tests.integration.stall_extension:install",
        "CONCIERGE_STREAM_STALL_SECONDS": "6",
        "STALL_PARTITION": str(PARTITION),
        "STALL_AFTER": str(FIRST),
    }
    try:
        produce(settings, envelopes[:FIRST], PARTITION)
        worker.start()
        worker.wait_until(lambda h: h.get("messages", 0) >= FIRST, timeout=120, path="/health")
        # never fetched while the partition is paused
        produce(settings, envelopes[FIRST:], PARTITION)

        # reported: /readyz names the partition, /metrics counts it, the log says where it waits
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline and seen is None:
            ready = httpx.get(f"{worker.url}/readyz", timeout=5)
            waiting = ready.json().get("waiting_for") or ""
            if f"partition {PARTITION} at offset {FIRST} has not moved" in waiting:
                seen = ready
                metrics = httpx.get(f"{worker.url}/metrics", timeout=5).text
            time.sleep(0.2)
        assert seen is not None, worker.report()
        assert seen.status_code == 503 and seen.headers["Retry-After"]
        assert 'concierge_stream_stalled_partitions{service="worker"} 1.0' in metrics
        log = worker.log_path.read_text()
        assert f"partition {PARTITION} stalled: at offset {FIRST} with" in log, worker.report()
        assert "paused: True" in log and "task " in log, worker.report()

        # resumed, and the state then holds every message, ready again
        want = patient_state.digest(patient_state.fold(envelopes).items())
        worker.wait_until(lambda d: d == want, timeout=90)
        assert "was left paused by the consumer with no rebalance under way: resumed" in (
            worker.log_path.read_text()
        )
        worker.wait_until(lambda r: r.get("ready") is True, timeout=30, path="/readyz")
        assert worker.get("/health")["messages"] >= len(envelopes)
    finally:
        worker.stop()
