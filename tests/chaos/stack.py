"""A whole deployment on this machine for the chaos suite: a broker of its own, the worker, the
API and the recruitment service, each a real process started as the product starts it.

Every process can be SIGKILLed (its whole process group) and started again on the same state
(broker data, identity vault, recruitment database), as an operator's machine would see after a
crash. Readiness comes from each process's own ``/readyz``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.auth import issue
from infra import broker as broker_mod
from infra.topics_admin import ensure_topics
from tests.faults import PrivateBroker, free_port

TOKEN_KEY = "chaos-suite-token-key-not-a-secret-0123456789"
SOURCE = "urn:chaos:ehr"


@dataclass
class Service:
    """One product process: ``python -m concierge <argv>`` with its own log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_url: str | None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Service:
        out = self.log_path.open("ab")
        out.write(f"\n===== start {self.starts + 1} at {time.strftime('%X')}\n".encode())
        out.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", *self.argv],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group: no shutdown hook, no final commit, no flush."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def readiness(self) -> tuple[bool, Any]:
        if self.ready_url is None:
            return self.alive(), None
        if not self.alive():
            return False, f"{self.name} is not running"
        try:
            response = httpx.get(self.ready_url, timeout=3)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}"
        try:
            body = response.json()
        except ValueError:
            body = response.text[:200]
        return response.status_code == 200, body

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Stack:
    root: Path
    broker: PrivateBroker = field(default_factory=PrivateBroker)
    services: dict[str, Service] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    worker_port: int = field(default_factory=free_port)
    recruitment_port: int = field(default_factory=free_port)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def worker(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    def token(self, role: str, org: str) -> dict[str, str]:
        source_system = SOURCE if role == "source" else None  # the stack's one EHR
        token = issue(TOKEN_KEY.encode(), role, org, source_system=source_system)  # type: ignore[arg-type]
        return {"Authorization": f"Bearer {token}"}

    def env(self) -> dict[str, str]:
        home = self.root / "home"
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "CONCIERGE_HOME": str(home),
            "CONCIERGE_TOPIC_PREFIX": "",
            "CONCIERGE_TOKEN_KEY": TOKEN_KEY,
            "CONCIERGE_SOURCE_SYSTEM": SOURCE,
            "CONCIERGE_API_PORT": str(self.api_port),
            "CONCIERGE_WORKER_WEB_PORT": str(self.worker_port),
            "CONCIERGE_RECRUITMENT_STATUS_PORT": str(self.recruitment_port),
            "CONCIERGE_RECRUITMENT_EMAIL_ENABLED": "false",
            "CONCIERGE_STREAM_TRIAL_SYNC_SECONDS": "0.5",
            # Exact counts: the oracle compares totals, not disclosure control (tested apart).
            "CONCIERGE_DC_THRESHOLD": "1",
            "CONCIERGE_DC_ROUNDING": "1",
            "CONCIERGE_DC_SUPPRESS_ZERO": "false",
            "CONCIERGE_DC_OVERLAP_CONTROL": "false",
            "CONCIERGE_DC_QUERY_BUDGET": "1000000",
        }

    def start(self) -> Stack:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        self.broker.start()
        ensure_topics(self.broker.bootstrap, "")
        env = self.env()
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        self.services = {
            "worker": Service(
                "worker",
                ["worker", "--loglevel", "info"],
                env,
                logs / "worker.log",
                f"{self.worker}/readyz",
            ),
            "api": Service("api", ["api"], env, logs / "api.log", f"{self.api}/readyz"),
            "recruitment": Service(
                "recruitment",
                ["recruitment", "run", "--migrate", "--no-scheduler"],
                env,
                logs / "recruitment.log",
                f"http://127.0.0.1:{self.recruitment_port}/readyz",
            ),
        }
        for service in self.services.values():
            service.start()
        self.wait_ready(180)
        return self

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            states = {name: s.readiness() for name, s in self.services.items()}
            last = {name: body for name, (_, body) in states.items()}
            if all(ok for ok, _ in states.values()):
                return last
            for name, service in self.services.items():
                if service.proc is not None and not service.alive():
                    raise AssertionError(f"{name} exited:\n{service.tail()}")
            time.sleep(0.5)
        tails = "\n".join(f"--- {n}:\n{s.tail(25)}" for n, s in self.services.items())
        raise AssertionError(f"not ready after {timeout} s: {last}\n{tails}")

    def kill_broker(self) -> None:
        self.broker.kill()

    def start_broker(self) -> None:
        broker_mod.start(self.broker.config, reset=False)

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        self.broker.stop()


__all__ = ["SOURCE", "Service", "Stack"]
