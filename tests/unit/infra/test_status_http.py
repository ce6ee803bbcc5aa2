"""The recruitment service's status port (``infra/status_http.py``): loopback only, two probes,
no patient data.

The server is checked on its own, and as ``concierge recruitment run`` starts it: a real process
(its broker unreachable, so it is alive and not ready), its listening socket read from
``/proc/net/tcp``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.mirror import ReaderStatus
from infra.status_http import StatusServer
from tests.faults import free_port, listening_addresses

ROOT = Path(__file__).resolve().parents[3]
#: What a reader's readiness says: offsets, lag, reasons. A new field must be checked here for
#: patient data before it is served on the status port.
READINESS_FIELDS = {
    "name", "ready", "connected", "caught_up", "lag", "staleness_seconds", "positions",
    "waiting_for", "error", "topics", "lags",
}  # fmt: skip


def status(ready: bool) -> ReaderStatus:
    return ReaderStatus(
        name="recruitment-consumer",
        ready=ready,
        connected=True,
        caught_up=ready,
        lag=0 if ready else 12,
        staleness_seconds=0.1,
        positions={0: 40},
        waiting_for=None if ready else "12 messages behind",
        error=None,
    )


@pytest.fixture
def server() -> Iterator[tuple[StatusServer, dict[str, bool]]]:
    state = {"ready": False}
    running = StatusServer(lambda: status(state["ready"]).to_dict(), 0).start()
    yield running, state
    running.stop()


def test_the_status_server_binds_loopback_and_serves_two_probes(
    server: tuple[StatusServer, dict[str, bool]],
) -> None:
    running, state = server
    assert running.server.server_address[0] == "127.0.0.1"
    base = f"http://127.0.0.1:{running.port}"
    assert httpx.get(f"{base}/healthz").json() == {"ok": True}
    waiting = httpx.get(f"{base}/readyz")
    assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "2"
    assert set(waiting.json()) == READINESS_FIELDS
    state["ready"] = True
    assert httpx.get(f"{base}/readyz").status_code == 200
    for path in ("/", "/state/digest", "/readyz/x", "/healthz?verbose=1"):
        assert httpx.get(f"{base}{path}").status_code == 404, path


def test_readiness_fields_are_the_ones_checked() -> None:
    assert {f.name for f in fields(ReaderStatus)} == READINESS_FIELDS


def test_the_recruitment_service_serves_its_status_on_loopback_only(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CONCIERGE_HOME": str(tmp_path),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # nothing there: alive, never ready
        "CONCIERGE_RECRUITMENT_STATUS_PORT": str(port),
        "CONCIERGE_RECRUITMENT_EMAIL_ENABLED": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "concierge", "recruitment", "run", "--migrate", "--no-scheduler"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        answer: Any = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(f"{base}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        assert answer is not None, f"no status port (exit {proc.poll()})"
        assert answer.status_code == 503 and set(answer.json()) == READINESS_FIELDS
        assert not re.search(r"p-[0-9a-f]{32}", answer.text)  # no pseudonym
        assert httpx.get(f"{base}/healthz").json() == {"ok": True}
        metrics = httpx.get(f"{base}/metrics", timeout=2)
        assert metrics.status_code == 200
        assert 'concierge_reader_ready{reader="recruitment",service="recruitment"} 0.0' in (
            metrics.text
        )
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_metrics_are_served_only_with_a_registry() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("concierge_probe_test", "a counter", registry=registry).inc(3)
    with_metrics = StatusServer(lambda: status(True).to_dict(), 0, metrics=registry).start()
    without = StatusServer(lambda: status(True).to_dict(), 0).start()
    try:
        answer = httpx.get(f"http://127.0.0.1:{with_metrics.port}/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain; version=")
        assert "concierge_probe_test_total 3.0" in answer.text
        assert httpx.get(f"http://127.0.0.1:{without.port}/metrics").status_code == 404
    finally:
        with_metrics.stop()
        without.stop()
