"""``concierge monitor``: the device-signal monitor as a service of its own.

Exactly one runs per deployment (it is the signals topic's single writer). It starts as the API
does (the same start-up path, :func:`concierge.commands.api.serve` and
:func:`concierge.api.create_monitor_app`) and serves only the surveillance routes
(``/v1/surveillance``, the same code, roles and audit as the API), ``/readyz``, ``/metrics`` and
``/healthz`` on ``CONCIERGE_MONITOR_PORT``; API processes forward to it when
``CONCIERGE_SURVEILLANCE_MONITOR_URL`` names it. Signal notifications are queued from here when
the recruitment database is configured.
"""

from __future__ import annotations

import click

from concierge.commands.api import serve


@click.command()
@click.option("--host", default=None, help="Bind address (default CONCIERGE_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default CONCIERGE_MONITOR_PORT).")
def monitor(host: str | None, port: int | None) -> None:
    """Run the signal monitor (one per deployment) and serve /v1/surveillance and /readyz."""
    serve("concierge.api:create_monitor_app", "monitor", host, port, "monitor_port")
