"""``concierge hub``'s application: the hub's HTTP API (``/v1/hub``), with no patient data.

Sponsors and administrators use tokens of the hub's own site (``CONCIERGE_TOKEN_*``, checked as
the API checks them); the hub signs what it sends to nodes with its own key
(``CONCIERGE_HUB_KEY_FILE``). Every request is audited in the hub's own trail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from core.audit import AuditKeys, AuditLog
from core.auth import TokenVerifier
from core.http import install_audit, install_problem_details
from core.settings import Settings
from federation.hub import Hub, NodeDirectory
from federation.settings import HubSettings
from federation.tokens import load_private_file


def build_hub(settings: Settings, hub_settings: HubSettings) -> Hub:
    if hub_settings.key_file is None:
        from core.settings import ConfigurationError

        raise ConfigurationError("bad configuration: CONCIERGE_HUB_KEY_FILE is not set")
    nodes = hub_settings.nodes_file or Path(settings.home) / "hub" / "nodes.json"
    return Hub(
        id=hub_settings.id,
        key=load_private_file(hub_settings.key_file),
        directory=NodeDirectory(nodes),
        deadline_seconds=hub_settings.deadline_seconds,
    )


def create_hub_app(
    settings: Settings, hub_settings: HubSettings | None = None, hub: Hub | None = None
) -> FastAPI:
    """The hub's API over ``hub`` (built from ``hub_settings`` when not given)."""
    from concierge.routes.federation import build_hub_router

    app = FastAPI(
        title="Trial concierge hub",
        version="0.1.0",
        summary="Federated feasibility: the nodes' protected answers, combined.",
    )
    app.state.hub = hub or build_hub(settings, hub_settings or HubSettings())
    app.state.token_verifier = TokenVerifier.from_settings(settings)
    app.state.audit = AuditLog(settings.resolved_audit_url(), AuditKeys.from_settings(settings))
    install_problem_details(app)
    install_audit(app)
    app.include_router(build_hub_router())

    @app.get("/healthz", tags=["operations"], summary="Liveness: the hub answers")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "nodes": len(app.state.hub.directory.all())}

    return app


__all__ = ["build_hub", "create_hub_app"]
