"""``concierge broker`` and ``concierge topics``."""

from __future__ import annotations

import json

import click

from concierge.configuration import load_configuration
from core.settings import get_settings
from infra.broker import BrokerConfig, BrokerError


def _broker() -> BrokerConfig:
    """The local broker as the configuration says (every section checked)."""
    configuration = load_configuration()
    return BrokerConfig.from_settings(configuration.settings.home, configuration.broker)


@click.group()
def broker() -> None:
    """The local Apache Kafka broker (KRaft, single node, fetched from Maven Central).

    Ports: CONCIERGE_BROKER_PORT (9092) and CONCIERGE_CONTROLLER_PORT (9093); Kafka version:
    CONCIERGE_KAFKA_VERSION; data under CONCIERGE_HOME/kafka.
    """


@broker.command()
def fetch() -> None:
    """Download the broker's jars with Maven into the local cache (idempotent)."""
    from infra.broker import fetch as do_fetch

    config = _broker()
    try:
        lib = do_fetch(config)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Kafka {config.version}: {len(list(lib.glob('*.jar')))} jars in {lib}")


@broker.command()
@click.option("--reset", is_flag=True, help="Delete the broker's data first (a fresh cluster).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for it.")
def start(reset: bool, timeout: float) -> None:
    """Start the broker; returns once it answers (no-op if one already answers)."""
    from infra.broker import start as do_start

    config = _broker()
    click.echo(f"starting Kafka {config.version} on {config.bootstrap} ...", err=True)
    try:
        result = do_start(config, timeout=timeout, reset=reset)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    note = "already running" if not result["started"] else f"started (pid {result['pid']})"
    click.echo(f"Kafka broker {note} at {result['bootstrap']}")


@broker.command()
def stop() -> None:
    """Stop the broker this project started."""
    from infra.broker import stop as do_stop

    config = _broker()
    click.echo("stopped" if do_stop(config) else "no broker of ours was running")


@broker.command()
@click.option("--quiet", is_flag=True, help="Print nothing; exit 0 if it answers, 1 if not.")
def status(quiet: bool) -> None:
    """Print the broker's status as JSON (exit code 1 when it does not answer)."""
    from infra.broker import status as do_status

    result = do_status(_broker())
    if not quiet:
        click.echo(json.dumps(result, indent=2))
    raise SystemExit(0 if result["running"] else 1)


@click.group()
def topics() -> None:
    """The product's Kafka topics (names carry CONCIERGE_TOPIC_PREFIX)."""


@topics.command("create")
def create_topics() -> None:
    """Create every topic in infra/topics.py that does not exist yet."""
    from infra.topics_admin import ensure_topics

    settings = get_settings()
    created = ensure_topics(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        replication_factor=settings.topic_replication_factor,
    )
    click.echo(
        f"created {len(created)} topics"
        + (f": {', '.join(created)}" if created else " (all existed)")
    )


@topics.command("list")
def list_topics() -> None:
    """List the product's topics with their partitions and settings."""
    from infra.topics import TOPICS

    settings = get_settings()
    for spec in TOPICS:
        config = ", ".join(f"{k}={v}" for k, v in spec.config.items())
        click.echo(f"{settings.topic(spec.name)}  partitions={spec.partitions}  {config}")
        click.echo(f"    {spec.doc}")
