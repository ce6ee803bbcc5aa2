"""A minimal status endpoint for processes that serve no other HTTP: ``/healthz``, ``/readyz``
and (given a registry) ``/metrics`` on a port of the host's loopback unless told otherwise,
answered from a callable (the recruitment service uses it).

The standard library's threading HTTP server is enough for two probe routes; a web framework
would be a second server stack in a process that otherwise has none.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


class StatusServer:
    """Serves ``GET /healthz`` (200 while the process runs) and ``GET /readyz`` (200 when
    ``readiness()["ready"]``, else 503 with ``Retry-After``) on ``host:port``; with
    ``metrics``, ``GET /metrics`` in Prometheus' text format."""

    def __init__(
        self,
        readiness: Callable[[], dict[str, Any]],
        port: int,
        host: str = "127.0.0.1",
        metrics: CollectorRegistry | None = None,
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(200, {"ok": True})
                elif self.path == "/readyz":
                    try:
                        body = outer.readiness()
                    except Exception as exc:  # a probe that fails says so, never 200
                        body = {"ready": False, "waiting_for": f"readiness failed: {exc!r}"}
                    self._send(200 if body.get("ready") else 503, body)
                elif self.path == "/metrics" and outer.metrics is not None:
                    from infra.metrics import CONTENT_TYPE, scrape

                    data = scrape(outer.metrics)
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self._send(404, {"error": "not found"})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 503:
                    self.send_header("Retry-After", "2")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # probes are not news
                return

        self.readiness = readiness
        self.metrics = metrics
        self.host = host
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="status-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        pages = "/healthz, /readyz" + (", /metrics" if self.metrics is not None else "")
        log.info("status on http://%s:%s (%s)", self.host, self.port, pages)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


__all__ = ["StatusServer"]
