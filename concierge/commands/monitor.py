"""``concierge monitor``: the device-signal monitor as a service of its own.

Exactly one runs per deployment (it is the signals topic's single writer). It serves the
surveillance routes (``/v1/surveillance``, the same code, roles and audit as the API) and
``/readyz`` on ``CONCIERGE_MONITOR_PORT``; API processes forward to it when
``CONCIERGE_SURVEILLANCE_MONITOR_URL`` names it. Signal notifications are queued from here when
the recruitment database is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_monitor_app() -> FastAPI:
    """The API application with only the signal monitor's side: no facts snapshot, the monitor
    in-process, nothing forwarded."""
    from concierge.api import create_app
    from concierge.configuration import load_configuration

    settings = load_configuration().settings
    monitor_settings = settings.model_copy(
        update={
            "surveillance_monitor": True,
            "surveillance_monitor_url": "",
            "feasibility_feed": False,
        }
    )
    return create_app(monitor_settings)


@click.command()
@click.option("--host", default=None, help="Bind address (default CONCIERGE_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default CONCIERGE_MONITOR_PORT).")
def monitor(host: str | None, port: int | None) -> None:
    """Run the signal monitor (one per deployment) and serve /v1/surveillance and /readyz."""
    import logging

    import uvicorn

    from concierge.configuration import load_configuration

    settings = load_configuration().settings  # every section checked before serving
    host = host or settings.api_host
    port = port or settings.monitor_port
    from concierge.logs import PRODUCT_LOGGERS, configure_logging

    # the API's logging: CONCIERGE_LOG_FORMAT, product loggers at INFO, uvicorn's through the
    # same handler, its access log off (paths name resources)
    configure_logging(settings.log_format, logging.WARNING, PRODUCT_LOGGERS)
    logging.getLogger("concierge.monitor").info(
        "concierge monitor on http://%s:%s (readiness /readyz)", host, port
    )
    uvicorn.run(
        "concierge.commands.monitor:create_monitor_app",
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,
        access_log=False,
    )
