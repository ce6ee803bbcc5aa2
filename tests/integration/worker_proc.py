"""Running a real ``concierge worker`` process for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from core.auth import issue
from tests.faults import free_port

#: The key the worker under test checks tokens with (its state pages need an admin token).
TOKEN_KEY = "worker-process-test-token-key-0123456789abcdef"


class WorkerProcess:
    def __init__(self, bootstrap: str, prefix: str, home: Path, log_path: Path) -> None:
        self.port = free_port()
        self.home = home
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "CONCIERGE_TOPIC_PREFIX": prefix,
            "CONCIERGE_HOME": str(home),
            "CONCIERGE_WORKER_WEB_PORT": str(self.port),
            "CONCIERGE_TOKEN_KEY": TOKEN_KEY,
            # A crash in native code (librdkafka, a C extension) prints every Python thread's
            # stack into the log: a worker that died with SIGSEGV once left an empty log.
            "PYTHONFAULTHANDLER": "1",
            # a stalled partition is logged after 15 s and, if left paused, resumed after 30 s:
            # inside the tests' waits (the production default is 60 s)
            "CONCIERGE_STREAM_STALL_SECONDS": "15",
        }
        self.admin = {"Authorization": f"Bearer {issue(TOKEN_KEY.encode(), 'admin', 'site-ops')}"}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", "worker", "--loglevel", "warning"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        """A page's JSON, as a site admin (the probes need no token; sending one is harmless)."""
        response = httpx.get(f"{self.url}{path}", headers=self.admin, timeout=5)
        response.raise_for_status()
        return response.json()

    def wait_until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        path: str = "/state/digest",
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited before {path} said so:\n{self.report()}")
            try:
                last = self.get(path)
                if predicate(last):
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(
            f"timed out after {timeout} s; last {path}: {last}\n"
            f"/readyz: {self.readyz()}\n{self.tail(80)}"
        )

    def readyz(self) -> str:
        """The worker's /readyz body whatever its status (what it waits for, lag, stalls)."""
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).text
        except httpx.HTTPError as exc:
            return f"(no answer: {exc})"

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit, no flush."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def report(self, lines: int = 200) -> str:
        """How the process ended (or that it runs) and the last ``lines`` of its log: what a
        failing test prints about its worker."""
        code = None if self.proc is None else self.proc.poll()
        if self.proc is None:
            state = "not started"
        elif code is None:
            state = f"running (pid {self.proc.pid})"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown"
            state = f"exited by signal {name} ({code})"
        else:
            state = f"exited with {code}"
        return f"--- worker {self.home.name}: {state}; log {self.log_path}:\n{self.tail(lines)}"

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
