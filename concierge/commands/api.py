"""``concierge api``: serve the HTTP API (FHIR ingest endpoint and product API)."""

from __future__ import annotations

import click


def serve(factory: str, name: str, host: str | None, port: int | None, default_port: str) -> None:
    """Start one of the product's HTTP services (``concierge api``, ``concierge monitor``): the
    configuration checked whole first (a bad value is one line and exit 2), logging as
    ``CONCIERGE_LOG_FORMAT`` says, then uvicorn on the application ``factory`` builds.

    Our own loggers at INFO (catch-up progress, readiness changes); uvicorn's at warning,
    through the same handler (``log_config=None``), so its lines take the same format. Its
    access log stays off: paths name resources."""
    import logging

    import uvicorn

    from concierge.configuration import load_configuration

    settings = load_configuration().settings  # every section checked before serving
    host = host or settings.api_host
    port = port or int(getattr(settings, default_port))
    from concierge.logs import PRODUCT_LOGGERS, configure_logging

    configure_logging(settings.log_format, logging.WARNING, PRODUCT_LOGGERS)
    logging.getLogger(f"concierge.{name}").info(
        "concierge %s on http://%s:%s (readiness /readyz, liveness /healthz, metrics /metrics)",
        name,
        host,
        port,
    )
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,
        access_log=False,
    )


@click.command()
@click.option("--host", default=None, help="Bind address (default CONCIERGE_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default CONCIERGE_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Serve the API: POST/PUT/DELETE /fhir for sources, OpenAPI docs at /docs."""
    serve("concierge.api:create_app", "api", host, port, "api_port")
