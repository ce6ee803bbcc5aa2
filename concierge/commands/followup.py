"""``concierge followup``: the follow-up service (one per deployment).

It reads the facts topic into the follow-up tables of the recruitment database (consent,
participants, each trial's feed, safety events queued in recruitment's outbox; offsets in the
same transactions), and a relay publishes each trial's feed on the trial's own topic,
transactionally. Safety notifications are delivered by ``concierge recruitment run``'s
dispatcher, like every outbox row. ``/healthz`` and ``/readyz`` on
``CONCIERGE_FOLLOWUP_STATUS_PORT`` (loopback; 0: none). One instance reads every partition;
with ``CONCIERGE_FOLLOWUP_GROUP=true`` several share them as a consumer group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from types import FrameType

import click

log = logging.getLogger("concierge.followup")


@click.command()
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--status-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of /healthz and /readyz (default CONCIERGE_FOLLOWUP_STATUS_PORT; 0: none).",
)
@click.option(
    "--relay/--no-relay",
    default=True,
    show_default=True,
    help="Publish the trials' feeds on their topics here. With CONCIERGE_FOLLOWUP_GROUP, run "
    "the relay in one instance only (--no-relay on the others): relays share one "
    "transactional id, so a second one fences the first.",
)
def followup(log_level: str, status_port: int | None, relay: bool) -> None:
    """Follow enrolled participants up: each trial's feed, safety events, withdrawal."""
    from concierge.configuration import load_configuration
    from concierge.logs import configure_logging
    from core.db import make_engine, make_sessionmaker
    from followup.consumer import FollowupConsumer
    from followup.db import default_url, upgrade
    from followup.engine import FollowupEngine
    from followup.relay import Relay
    from infra.status_http import StatusServer

    configuration = load_configuration()  # every section checked before starting
    settings = configuration.settings
    section = configuration.followup
    configure_logging(settings.log_format, log_level.upper())
    from followup.settings import DEVELOPMENT_SECRET

    if section.secret.get_secret_value() == DEVELOPMENT_SECRET:
        log.warning("CONCIERGE_FOLLOWUP_SECRET is the public development key: set it")
    url = default_url(settings.home)
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url, immediate_writes=True))
    engine = FollowupEngine(
        section.secret.get_secret_value().encode(), configuration.recruitment.app_base_url
    )
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    # one per deployment by default; with CONCIERGE_FOLLOWUP_GROUP several share the partitions,
    # each beating under a name of its own
    name = (
        f"{section.consumer_group}:{socket.gethostname()}:{os.getpid()}"
        if section.group
        else ("concierge-followup")
    )
    consumer = FollowupConsumer(sessions, engine, bootstrap, prefix, batch_size=section.batch_size,
                                name=name, group=section.consumer_group if section.group else None,
                                )  # fmt: skip
    publisher = Relay(
        sessions,
        bootstrap,
        prefix,
        transactional_id=f"{prefix}concierge-followup-relay",
        replication_factor=settings.topic_replication_factor,
    )
    consumer.start()
    if relay:
        publisher.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port = section.status_port if status_port is None else status_port
    status = StatusServer(lambda: consumer.readiness().to_dict(), port).start() if port else None
    relay_thread = threading.Thread(
        target=publisher.run, args=(stop, section.relay_interval_seconds), name="followup-relay"
    )
    if relay:
        relay_thread.start()
    log.info("concierge followup: reading %s%s", prefix, "concierge.facts.v1")
    try:
        consumer.run(stop)
    finally:
        stop.set()
        if relay:
            relay_thread.join()
        publisher.close()
        consumer.close()
        if status is not None:
            status.stop()
