"""Readiness of the API: which views it serves from are current, and what it waits for.

Every view the API answers from is a topic reader (:class:`infra.mirror.TopicMirror` or one
that reports the same :class:`infra.mirror.ReaderStatus`): the facts snapshot, the saved
questions, the live cohorts, the sites, the signal monitor. ``GET /readyz`` answers 200 only
when each of them is connected and has caught up; otherwise 503 with ``Retry-After`` and, per
view, why not. The one exception is a monitor running as its own service: it is shown (and
listed under ``degraded`` when not ready) but does not hold this process's readiness.
``GET /healthz`` stays the liveness probe (the process answers at all).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from core.http import RETRY_AFTER_HEADER

log = logging.getLogger(__name__)

#: Seconds a client is told to wait before asking again while a view catches up.
RETRY_AFTER_SECONDS = 2


def readers(app: FastAPI) -> Iterator[tuple[str, Any]]:
    """``(name, reader)`` for every topic reader this API process runs."""
    feasibility = getattr(app.state, "feasibility", None)
    if feasibility is not None:
        names = {"feed": "facts", "saved": "trials", "cohorts": "cohorts", "sites": "sites"}
        for attribute, name in names.items():
            reader = getattr(feasibility, attribute, None)
            if reader is not None:
                yield name, reader
    # the monitor in this process, or the monitor service's own readiness (monitor_proxy)
    monitor = getattr(app.state, "surveillance", None) or getattr(
        app.state, "surveillance_remote", None
    )
    if monitor is not None:
        yield "signals", monitor


def status_of(reader: Any) -> dict[str, Any]:
    readiness = getattr(reader, "readiness", None)
    if readiness is None:  # a reader that cannot say is not ready
        return {"ready": False, "waiting_for": "this reader reports no readiness"}
    status: dict[str, Any] = readiness().to_dict()
    return status


def _elsewhere(app: FastAPI) -> set[str]:
    """Views this process only forwards to another service (the monitor service): shown, but
    never a reason for this process to be taken out of rotation. Every API process forwards to
    the same monitor, so refusing traffic would stop feasibility and recruitment answers, which
    do not need it; the forwarded routes answer 503 with ``Retry-After`` themselves."""
    if getattr(app.state, "surveillance", None) is None and (
        getattr(app.state, "surveillance_remote", None) is not None
    ):
        return {"signals"}
    return set()


def report(app: FastAPI) -> tuple[bool, dict[str, Any]]:
    views = {name: status_of(reader) for name, reader in readers(app)}
    starting = getattr(app.state, "starting", False)
    elsewhere = _elsewhere(app)
    behind = {name: f"{name}: {v.get('waiting_for') or 'not ready'}"
              for name, v in views.items() if not v.get("ready")}  # fmt: skip
    waiting = [reason for name, reason in behind.items() if name not in elsewhere]
    if starting:
        waiting.insert(0, "the API is starting")
    body: dict[str, Any] = {
        "ready": not waiting,
        "waiting_for": waiting,
        "degraded": [reason for name, reason in behind.items() if name in elsewhere],
        "views": views,
    }
    anchors = getattr(app.state, "audit_anchors", None)
    if anchors is not None:
        # shown, never a reason to refuse traffic: requests are audited in the database either
        # way, and the publisher retries (docs/explanation/security.md)
        body["audit_anchors"] = anchors.status()
    return not waiting, body


class Readiness(BaseModel):
    """The body of ``/readyz``, ready or not."""

    ready: bool
    waiting_for: list[str] = Field(description="What readiness waits for, in words")
    degraded: list[str] = Field(
        default_factory=list,
        description="Views served by another service (the signal monitor) that are not ready: "
        "their routes answer 503, the rest of the API is unaffected and stays ready",
    )
    views: dict[str, dict[str, Any]] = Field(description="Each topic reader's status, by name")
    audit_anchors: dict[str, Any] | None = Field(
        default=None, description="The audit anchor publisher's state (never a reason to wait)"
    )


def install(app: FastAPI) -> None:
    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: 200 when every view the API answers from has caught up",
        response_model=Readiness,
        responses={
            503: {
                "model": Readiness,
                "description": "Not ready: `waiting_for` says why, per view",
                "headers": RETRY_AFTER_HEADER,
            }
        },
    )
    def readyz(request: Request) -> Response:
        ready, body = report(request.app)
        if ready:
            return JSONResponse(body)
        return JSONResponse(
            body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )


class ProgressLogger:
    """Logs each reader's catch-up progress every few seconds until all are ready, then once
    on every change of readiness (a reader that loses the broker, and its recovery)."""

    def __init__(
        self, app: FastAPI, every: float = 5.0, out: Callable[[str], None] | None = None
    ) -> None:
        self.app = app
        self.every = every
        self.out = out or log.info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness-log", daemon=True)
        self._last: dict[str, bool] = {}

    def start(self) -> ProgressLogger:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        announced = False
        while not self._stop.wait(self.every if not announced else 1.0):
            try:
                ready, body = report(self.app)
            except Exception as exc:  # never let logging take the API down
                self.out(f"readiness unknown: {type(exc).__name__}")
                continue
            views = body["views"]
            now = {name: bool(v.get("ready")) for name, v in views.items()}
            if not announced:
                if ready:
                    self.out("ready: every view has caught up")
                    announced = True
                else:
                    self.out("catching up: " + "; ".join(body["waiting_for"]))
            elif now != self._last:
                changed = [f"{n} {'ready' if r else 'NOT ready'}" for n, r in now.items()
                           if self._last.get(n) != r]  # fmt: skip
                detail = "; ".join(body["waiting_for"]) or "every view has caught up"
                self.out(f"readiness changed ({', '.join(changed)}): {detail}")
            self._last = now


__all__ = ["RETRY_AFTER_SECONDS", "ProgressLogger", "install", "report"]
