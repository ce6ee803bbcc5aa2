"""The FastAPI application: the FHIR ingest endpoint now, the product API under /v1 later."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from concierge.audit import AuditLog
from concierge.http import install_audit, install_problem_details
from concierge.settings import Settings, get_settings
from fhir_adapters.rest import IngestService, build_router


def create_app(
    settings: Settings | None = None, ingest_service: IngestService | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "ingest", None) is None:
            from fhir_adapters.service import build_ingestor
            from fhir_adapters.sinks import KafkaSink

            sink = KafkaSink(
                settings.kafka_bootstrap_servers, settings.topic_prefix, {"linger.ms": 1}
            )
            app.state.ingest = IngestService(build_ingestor(settings, sink=sink))
        yield
        app.state.ingest.ingestor.commit()
        app.state.ingest.ingestor.vault.close()

    app = FastAPI(
        title="Trial concierge",
        version="0.1.0",
        summary="Clinical trial feasibility and recruitment concierge with a streaming "
        "device-safety surveillance core.",
        lifespan=lifespan,
    )
    app.state.ingest = ingest_service
    app.state.token_key = settings.token_key.get_secret_value().encode()
    app.state.audit = AuditLog(settings.resolved_audit_url())
    app.state.settings = settings
    install_problem_details(app)
    install_audit(app)

    def get_ingest(request: Request) -> IngestService:
        service: IngestService = request.app.state.ingest
        return service

    app.include_router(build_router(get_ingest, settings.max_resource_bytes * 10))

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    return app
