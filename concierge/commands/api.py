"""``concierge api``: serve the HTTP API (FHIR ingest endpoint and product API)."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default=None, help="Bind address (default CONCIERGE_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default CONCIERGE_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Serve the API: POST/PUT/DELETE /fhir for sources, OpenAPI docs at /docs."""
    import logging

    import uvicorn

    from concierge.configuration import load_configuration

    settings = load_configuration().settings  # every section checked before serving
    host = host or settings.api_host
    port = port or settings.api_port
    from concierge.logs import PRODUCT_LOGGERS, configure_logging

    # Our own loggers at INFO (catch-up progress, readiness changes); uvicorn's at warning,
    # through the same handler (log_config=None below), so its lines take CONCIERGE_LOG_FORMAT
    # too. Its access log stays off: paths name resources.
    configure_logging(settings.log_format, logging.WARNING, PRODUCT_LOGGERS)
    logging.getLogger("concierge.api").info(
        "concierge api on http://%s:%s (docs /docs, readiness /readyz, liveness /healthz)",
        host,
        port,
    )
    uvicorn.run(
        "concierge.api:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,
        access_log=False,
    )
