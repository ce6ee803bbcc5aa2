"""API processes without a monitor of their own: ``/v1/surveillance`` forwarded to the monitor
service (``concierge monitor``), and its readiness reported as this process's ``signals`` view.

The signal monitor keeps state that must be unique (the counters it assesses, the lifecycle it
is the signals topic's single writer of, the scan's alpha spending), so exactly one runs per
deployment and every API process is a stateless front for it: the caller's request (its bearer
token included) goes to the monitor service unchanged, which checks the role, answers and writes
the audit record, as an API process would. A reverse proxy of our own rather than a library one:
it is one route prefix, and what matters here is what it says when the monitor cannot answer (a
problem with ``Retry-After``, never a stale answer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable

import httpx
from fastapi import FastAPI, Request, Response

from core.http import problem
from infra.mirror import ReaderStatus

PREFIX = "/v1/surveillance"
#: Headers that describe one hop's connection, not the message (RFC 9110 7.6.1), plus the
#: length and encoding httpx has already undone.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    }
)
RETRY_AFTER_SECONDS = 2


class RemoteMonitor:
    """The monitor service's readiness, asked of its ``/readyz`` (at most once a second)."""

    def __init__(self, url: str, timeout: float = 2.0, cache_seconds: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, ReaderStatus] | None = None

    def readiness(self) -> ReaderStatus:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            status = self._ask()
            self._cached = (now, status)
            return status

    def _ask(self) -> ReaderStatus:
        def not_ready(why: str, error: str | None = None) -> ReaderStatus:
            return ReaderStatus(
                name="signal-monitor",
                ready=False,
                connected=False,
                caught_up=False,
                lag=None,
                staleness_seconds=None,
                positions={},
                waiting_for=why,
                error=error,
            )

        try:
            response = httpx.get(f"{self.url}/readyz", timeout=self.timeout)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return not_ready(
                f"the monitor service at {self.url} does not answer", f"{type(exc).__name__}"
            )
        view = (body.get("views") or {}).get("signals")
        if not isinstance(view, dict):
            return not_ready(f"the service at {self.url} runs no signal monitor")
        return ReaderStatus(
            name="signal-monitor",
            ready=bool(view.get("ready")),
            connected=bool(view.get("connected")),
            caught_up=bool(view.get("caught_up")),
            lag=view.get("lag"),
            staleness_seconds=view.get("staleness_seconds"),
            positions={int(p): int(o) for p, o in (view.get("positions") or {}).items()},
            waiting_for=view.get("waiting_for"),
            error=view.get("error"),
        )


def install(app: FastAPI, url: str, timeout: float = 30.0) -> None:
    """Forward every request under :data:`PREFIX` to the monitor service at ``url``; added
    last, so it runs before this process's own routes and audit (the service audits)."""
    base = url.rstrip("/")
    client = httpx.AsyncClient(base_url=base, timeout=timeout)
    app.state.surveillance_remote = RemoteMonitor(base)
    app.state.surveillance_proxy = client  # closed at shutdown (concierge.api)

    @app.middleware("http")
    async def forward(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            return await call_next(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if request.client is not None:
            headers["x-forwarded-for"] = request.client.host
        try:
            query = request.url.query
            answer = await client.request(
                request.method,
                f"{path}?{query}" if query else path,
                content=await request.body(),
                headers=headers,
            )
        except httpx.HTTPError as exc:
            return problem(
                503,
                "Service Unavailable",
                f"the signal monitor service does not answer ({type(exc).__name__}); "
                "try again shortly",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(answer.content, status_code=answer.status_code, headers=kept)
