"""Helpers shared by the worker benchmarks (``bench_recovery``, ``bench_scale_workers``): a
population of any size cloned from a small real one, and ``concierge worker`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_stream import cpu_seconds, free_port, record_population
from core.contracts.facts import BATCH_SCHEMA


def _rename(envelope: dict[str, Any], suffix: str) -> dict[str, Any]:
    return {**envelope, "patient": f"{envelope['patient']}{suffix}",
            "key": f"{envelope['key']}{suffix}"}  # fmt: skip


def clone(facts: list[tuple[str, bytes]], copies: int) -> Iterator[tuple[str, bytes]]:
    """The recorded facts messages ``copies`` times, copy *i* with every patient pseudonym and
    resource key suffixed ``~i`` (copy 0 as recorded): a population ``copies`` times as large
    whose patients look like real ones (the generator through the real adapters is too slow
    for hundreds of thousands of patients on this machine)."""
    for copy in range(copies):
        if copy == 0:
            yield from facts
            continue
        suffix = f"~{copy}"
        for key, value in facts:
            document = orjson.loads(value)
            if isinstance(document, dict) and document.get("schema") == BATCH_SCHEMA:
                renamed = [_rename(e, suffix) for e in document["envelopes"]]
                patient = f"{document['patient']}{suffix}"
                document = {**document, "patient": patient, "envelopes": renamed}
            else:
                document = _rename(document, suffix)
            yield f"{key}{suffix}", orjson.dumps(document)


def population(bootstrap: str, patients: int, seed: int = 42, base: int = 2000) -> Any:
    """``(facts messages, envelopes per copy, copies)`` for ``patients`` patients."""
    base = min(base, patients)
    facts, envelopes = record_population(bootstrap, base, seed)
    return facts, envelopes, max(1, round(patients / base))


class Worker:
    """One ``concierge worker`` process with its own home and status port."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.env = {**env, "CONCIERGE_HOME": str(home), "CONCIERGE_WORKER_WEB_PORT": str(self.port)}
        self.proc: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)

    def start(self, **extra: str) -> float:
        env = {**self.env, **extra}
        log = (self.home / "worker.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", "worker", "--loglevel", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        return time.monotonic()

    def get(self, path: str) -> Any:
        response = httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)
        return response.status_code, response.json()

    def health(self) -> dict[str, Any]:
        try:
            return dict(self.get("/health")[1])
        except (httpx.HTTPError, ValueError):
            return {}

    def ready(self) -> tuple[bool, Any]:
        try:
            status, body = self.get("/readyz")
        except (httpx.HTTPError, ValueError):
            return False, None
        return status == 200, body

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def wait_ready(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited: {self.tail()}")
            ok, body = self.ready()
            if ok:
                return body
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout} s: {self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)

    def tail(self) -> str:
        try:
            return (self.home / "worker.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
