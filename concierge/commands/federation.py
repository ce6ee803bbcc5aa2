"""``concierge hub``: serve the federation hub, make keys, register nodes."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def hub() -> None:
    """The federation hub (holds no patient data): serve it, make keys, register nodes.
    Configuration: CONCIERGE_HUB_* (and CONCIERGE_TOKEN_* for the hub's own sponsors)."""


@hub.command("serve")
@click.option("--host", default=None, help="Bind address (default CONCIERGE_HUB_HOST).")
@click.option("--port", type=int, default=None, help="Port (default CONCIERGE_HUB_PORT).")
def serve(host: str | None, port: int | None) -> None:
    """Serve the hub's API (/v1/hub)."""
    import uvicorn

    from concierge.configuration import load_configuration
    from concierge.hub import create_hub_app

    configuration = load_configuration()
    hub_settings = configuration.hub
    app = create_hub_app(configuration.settings, hub_settings)
    uvicorn.run(
        app,
        host=host or hub_settings.host,
        port=port or hub_settings.port,
        log_level="warning",
    )


@hub.command("keygen")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Key file prefix.")
def keygen(out: Path) -> None:
    """Write an Ed25519 key pair: OUT.key (private, mode 600) and OUT.pub (public), for the hub
    (CONCIERGE_HUB_KEY_FILE) or a node (CONCIERGE_NODE_KEY_FILE)."""
    from federation.tokens import generate_key

    private, public = generate_key()
    key, pub = out.with_suffix(".key"), out.with_suffix(".pub")
    key.parent.mkdir(parents=True, exist_ok=True)
    key.touch(mode=0o600)
    key.write_bytes(private)
    pub.write_bytes(public)
    click.echo(json.dumps({"private": str(key), "public": str(pub)}))


@hub.command("register")
@click.argument("node_id")
@click.option("--url", required=True, help="The node's API address (http(s)://host:port).")
@click.option(
    "--public-key",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="The node's public key (PEM).",
)
@click.option("--controller", default="", help="The data controller's name, for operators.")
def register(node_id: str, url: str, public_key: Path, controller: str) -> None:
    """Register (or change) a node in the hub's directory."""
    from concierge.configuration import load_configuration
    from federation.hub import NodeDirectory, NodeRecord

    configuration = load_configuration()
    nodes = configuration.hub.nodes_file or Path(configuration.settings.home) / "hub/nodes.json"
    try:
        NodeDirectory(nodes).register(NodeRecord(node_id, url, public_key.read_text(), controller))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"registered": node_id, "url": url}))


@click.group("concept-map")
def concept_map() -> None:
    """The site's OMOP vocabulary, for HDR UK Cohort Discovery queries (concept ids)."""


def concept_map_path() -> Path:
    from core.settings import get_settings

    return Path(get_settings().home) / "omop" / "concepts.json"


@concept_map.command("load")
@click.argument("concept_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def concept_map_load(concept_csv: Path) -> None:
    """Load Athena's CONCEPT.csv (tab-separated) into the site's concept map
    (omop/concepts.json under CONCIERGE_HOME)."""
    from federation.bunny import ConceptMap

    try:
        concepts = ConceptMap.from_athena(concept_csv)
    except (ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    target = concept_map_path()
    concepts.save(target)
    click.echo(json.dumps({"concepts": len(concepts.concepts), "path": str(target)}))
