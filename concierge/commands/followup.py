"""``concierge followup``: the follow-up service (one per deployment).

It reads the facts topic into the follow-up tables of the recruitment database (consent,
participants, each trial's feed, safety events queued in recruitment's outbox; offsets in the
same transactions), and a relay publishes each trial's feed on the trial's own topic,
transactionally. Safety notifications are delivered by ``concierge recruitment run``'s
dispatcher, like every outbox row. ``/healthz`` and ``/readyz`` on
``CONCIERGE_FOLLOWUP_STATUS_PORT`` (loopback; 0: none).
"""

from __future__ import annotations

import logging
import signal
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
def followup(log_level: str, status_port: int | None) -> None:
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
    consumer = FollowupConsumer(sessions, engine, bootstrap, prefix, batch_size=section.batch_size)
    relay = Relay(
        sessions,
        bootstrap,
        prefix,
        transactional_id=f"{prefix}concierge-followup-relay",
        replication_factor=settings.topic_replication_factor,
    )
    consumer.start()
    relay.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port = section.status_port if status_port is None else status_port
    status = StatusServer(lambda: consumer.readiness().to_dict(), port).start() if port else None
    relay_thread = threading.Thread(
        target=relay.run, args=(stop, section.relay_interval_seconds), name="followup-relay"
    )
    relay_thread.start()
    log.info("concierge followup: reading %s%s", prefix, "concierge.facts.v1")
    try:
        consumer.run(stop)
    finally:
        stop.set()
        relay_thread.join()
        relay.close()
        consumer.close()
        if status is not None:
            status.stop()
