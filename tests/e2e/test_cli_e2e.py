"""The CLI as a user runs it: `concierge ingest` and `concierge demo` against the real broker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from infra.broker import answers
from tests.integration.test_ingest_kafka import SAMPLES
from tests.integration.worker_proc import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def _env(kafka_bootstrap: str, topic_prefix: str, home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CONCIERGE_TOPIC_PREFIX": topic_prefix,
        "CONCIERGE_HOME": str(home),
        # the recruitment service's status port: its own, not the default a demo may hold
        "CONCIERGE_RECRUITMENT_STATUS_PORT": str(free_port()),
        **extra,
    }


def test_ingest_command_prints_summary_json(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)
    (samples / "broken.ndjson").write_text('{"resourceType": "Observation", "id": "x"}\nnope\n')
    env = _env(kafka_bootstrap, topic_prefix, tmp_path / "home")
    run = subprocess.run(
        [sys.executable, "-m", "concierge", "ingest", str(samples), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["files"] == 21
    assert summary["dead_lettered"] == 2
    assert summary["accepted"] > 1000
    assert summary["total"] == (
        summary["accepted"] + summary["unchanged"] + summary["skipped"] + summary["dead_lettered"]
    )
    human = subprocess.run(
        [sys.executable, "-m", "concierge", "ingest", str(samples)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert human.returncode == 0, human.stderr
    assert "accepted 0," in human.stdout  # the replay changed nothing
    assert "Observation" in human.stdout


def _share_kafka_release(home: Path) -> None:
    """The new home uses the Kafka release the test broker already runs (a link, not a second
    download from Maven Central)."""
    shared = Path(os.environ.get("CONCIERGE_HOME", "")) / "kafka"
    releases = [p for p in shared.glob("*") if (p / "lib").is_dir()] if shared.is_dir() else []
    assert releases, f"no Kafka release under {shared}: run the tests through scripts/test.sh"
    (home / "kafka").mkdir(parents=True)
    for release in releases:
        (home / "kafka" / release.name).symlink_to(release)


def test_demo_comes_up_and_streams(kafka_bootstrap: str, tmp_path: Path) -> None:
    """As on a fresh machine: no broker answers, so the demo starts its own (on its own ports)
    and stops it again when it ends, with every other process it started."""
    api_port, worker_port, dashboard_port = free_port(), free_port(), free_port()
    broker_port, controller_port = free_port(), free_port()
    home = tmp_path / "home"
    _share_kafka_release(home)
    env = _env(
        f"127.0.0.1:{broker_port}",
        "",
        home,
        CONCIERGE_API_PORT=str(api_port),
        CONCIERGE_WORKER_WEB_PORT=str(worker_port),
        CONCIERGE_DASHBOARD_PORT=str(dashboard_port),
        CONCIERGE_BROKER_PORT=str(broker_port),
        CONCIERGE_CONTROLLER_PORT=str(controller_port),
    )
    env.pop("CONCIERGE_TOPIC_PREFIX")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "concierge",
            "demo",
            "--patients",
            "120",
            "--rate",
            "40",
            "--duration",
            "25",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"http://127.0.0.1:{api_port}/docs" in run.stdout
    assert "streaming the rest live" in run.stdout
    assert re.search(r"the stream holds \d+ patients", run.stdout), run.stdout  # admin token
    assert "stream worker state: 401" not in run.stdout + run.stderr
    assert "device signals:" in run.stdout
    assert f"http://127.0.0.1:{dashboard_port}" in run.stdout
    for port in (api_port, dashboard_port):  # everything the demo started is stopped again
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert "stopping the broker" in run.stdout, run.stdout
    assert not answers(f"127.0.0.1:{broker_port}"), "the demo left its broker running"
    assert not (home / "kafka" / f"broker-{broker_port}" / "broker.pid").exists()


def test_sigterm_stops_every_process_the_demo_started(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """``kill -TERM`` of a running demo (as an operator, a service manager or scripts/soak.sh
    would) stops the worker, API, recruitment and follow-up services, SMTP server and dashboard,
    not just the demo itself."""
    import signal
    import time

    api_port, worker_port, dashboard_port = free_port(), free_port(), free_port()
    home = tmp_path / "home"
    env = _env(
        kafka_bootstrap,
        topic_prefix,
        home,
        CONCIERGE_API_PORT=str(api_port),
        CONCIERGE_WORKER_WEB_PORT=str(worker_port),
        CONCIERGE_DASHBOARD_PORT=str(dashboard_port),
    )
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "concierge", "demo", "--patients", "120", "--rate", "40"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        # the demo reads the worker's state page with an admin token: a number, not a 401
        while not re.search(r"the stream holds \d+ patients", output.read_text(errors="replace")):
            assert demo.poll() is None, output.read_text(errors="replace")
            assert time.monotonic() < deadline, output.read_text(errors="replace")
            time.sleep(1)
        roles = json.loads((home / "logs" / "demo-processes.json").read_text())["roles"]
        assert {"worker", "api", "recruitment", "followup", "dashboard", "smtp"} <= set(roles)
        pids = [info["pid"] for info in roles.values() if info.get("owned", True)]
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0, output.read_text(errors="replace")
        assert "stopping (SIGTERM)" in output.read_text(errors="replace")
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        for port in (api_port, worker_port, dashboard_port):
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        # On a failure above, the demo's children (own sessions, so not in its process group)
        # would outlive the test and hold the broker's topics and ports: stop what the registry
        # names.
        _kill_registered(home / "logs" / "demo-processes.json")


def _kill_registered(registry: Path) -> None:
    import contextlib
    import signal

    try:
        roles = json.loads(registry.read_text())["roles"]
    except (OSError, ValueError, KeyError):
        return
    for info in roles.values():
        pid = info.get("pid")
        if isinstance(pid, int) and info.get("owned", True):
            # each child leads its own process group: that takes its own children too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
