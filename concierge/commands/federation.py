"""``concierge hub``: serve the federation hub, make keys, register nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


@click.group()
def node() -> None:
    """This site as a federation node: answering HDR UK Cohort Discovery's task API."""


@node.command("poll")
@click.option("--url", default=None, help="The task API (default CONCIERGE_BUNNY_TASK_API_URL).")
@click.option(
    "--collection", default=None, help="The collection id (default CONCIERGE_BUNNY_COLLECTION)."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01, max=3600),
    default=None,
    help="Seconds between polls when there is no task (default CONCIERGE_BUNNY_POLL_SECONDS).",
)
@click.option("--once", is_flag=True, help="Answer the tasks waiting now, then exit.")
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds to wait for this site's data to be current before the first poll.",
)
def poll(
    url: str | None,
    collection: str | None,
    interval: float | None,
    once: bool,
    ready_timeout: float,
) -> None:
    """Poll the Cohort Discovery task API: translate each availability query through the site's
    concept map, answer it under this site's disclosure control (charged to bunny/<owner>),
    post the result back, and audit it. Runs until SIGTERM or Ctrl-C (or, with --once, until
    the task API has no task)."""
    import logging
    import signal
    import threading
    import time

    import httpx

    from concierge.api import build_feasibility
    from concierge.configuration import load_configuration
    from core.audit import AuditKeys, AuditLog
    from feasibility.criteria import Question
    from feasibility.service import NotCurrent
    from federation.bunny import ConceptMap, TaskPoller

    log = logging.getLogger("concierge.node.poll")
    configuration = load_configuration()
    bunny = configuration.bunny
    base = url or bunny.task_api_url
    collection = collection or bunny.collection
    if not base or not base.startswith(("http://", "https://")):
        raise click.UsageError("the task API's URL: --url or CONCIERGE_BUNNY_TASK_API_URL")
    if not collection:
        raise click.UsageError("the collection: --collection or CONCIERGE_BUNNY_COLLECTION")
    concepts_file = concept_map_path()
    if not concepts_file.exists():
        raise click.UsageError(f"no concept map at {concepts_file}: run concierge concept-map load")
    settings = configuration.settings
    service = build_feasibility(settings)
    audit = AuditLog(settings.resolved_audit_url(), AuditKeys.from_settings(settings))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                service.require("facts", "sites")
                break
            except NotCurrent as exc:
                if time.monotonic() > deadline or stop.is_set():
                    raise click.ClickException(f"this site's data is not current: {exc}") from None
                stop.wait(0.5)

        details: dict[str, Any] = {}

        def answer(question: Question, org: str) -> dict[str, Any]:
            details["org"] = org
            body, detail = service.answer(question, org, "cohort discovery")
            details["last"] = detail
            total: dict[str, Any] = body["total"]
            return total

        poller = TaskPoller(
            base,
            collection,
            ConceptMap.open(concepts_file),
            answer,
            username=bunny.username,
            password=bunny.password.get_secret_value(),
            timeout_seconds=bunny.timeout_seconds,
        )
        wait = interval if interval is not None else bunny.poll_seconds
        # A plain loop rather than a scheduler (APScheduler is not a dependency): one task at a
        # time, the next poll at once after a task, after ``wait`` when there was none.
        while not stop.is_set():
            details.clear()
            try:
                posted = poller.poll_once()
            except httpx.HTTPError as exc:
                if once:
                    raise click.ClickException(f"the task API failed: {exc}") from None
                log.warning("the task API failed (%s); polling again later", type(exc).__name__)
                stop.wait(wait)
                continue
            if posted is None:
                if once:
                    break
                stop.wait(wait)
                continue
            audit.append(
                actor=f"bunny:{base}",
                role="sponsor",
                org=details.get("org", "bunny"),
                action=f"POST bunny/task/{posted['uuid']}",
                detail={
                    "collection": collection,
                    "status": posted["status"],
                    "message": posted["message"],
                    **details.get("last", {}),
                },
            )
            click.echo(
                json.dumps(
                    {
                        "uuid": posted["uuid"],
                        "status": posted["status"],
                        "count": posted["queryResult"]["count"],
                        "message": posted["message"],
                    }
                )
            )
    finally:
        service.stop()
