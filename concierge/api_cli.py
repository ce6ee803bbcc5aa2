"""``concierge api``: serve the HTTP API (FHIR ingest endpoint and product API)."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default=None, help="Bind address (default CONCIERGE_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default CONCIERGE_API_PORT).")
def api(host: str | None, port: int | None) -> None:
    """Serve the API: POST/PUT/DELETE /fhir for sources, OpenAPI docs at /docs."""
    import uvicorn

    from concierge.settings import get_settings

    settings = get_settings()
    uvicorn.run(
        "concierge.api:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level="warning",
    )
