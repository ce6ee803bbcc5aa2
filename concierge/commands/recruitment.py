"""``concierge recruitment ...``: run the recruitment service, migrate its database, deliver.

A verb of ``concierge/cli.py``; also runnable alone
(``python -m concierge.commands.recruitment run``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from types import FrameType

import click

from concierge.configuration import load_configuration

log = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def recruitment() -> None:
    """Candidates, routing, invitations and clinician notifications.

    Configuration: CONCIERGE_RECRUITMENT_* environment variables (database URL, cool-down, yearly
    cap, SMTP, webhook, schedules); Kafka and topic prefix as for every verb.
    """


@recruitment.command()
@click.option("--url", help="Database URL (default: CONCIERGE_RECRUITMENT_URL or SQLite).")
def migrate(url: str | None) -> None:
    """Create or upgrade the recruitment database (Alembic migrations)."""
    from recruitment.db import head_revision, upgrade
    from recruitment.settings import get_recruitment_settings

    upgrade(url or get_recruitment_settings().resolved_url())
    click.echo(json.dumps({"migrated": True, "revision": head_revision()}))


@recruitment.command()
@click.option("--migrate/--no-migrate", default=True, help="Upgrade the database first.")
@click.option("--scheduler/--no-scheduler", default=True, help="Run digests, expiry, delivery.")
@click.option("--batch-size", type=int, default=None, help="Messages per database transaction.")
@click.option(
    "--idle-exit",
    type=float,
    default=None,
    help="Exit once caught up and idle for this many seconds (batch runs and tests).",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--status-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of /healthz, /readyz and /metrics (default CONCIERGE_RECRUITMENT_STATUS_PORT or "
    "6067; 0: none), on CONCIERGE_RECRUITMENT_STATUS_BIND (127.0.0.1 by default).",
)
def run(
    migrate: bool,
    scheduler: bool,
    batch_size: int | None,
    idle_exit: float | None,
    log_level: str,
    status_port: int | None,
) -> None:
    """Consume trials, cohorts, facts and reference data; route candidates; notify clinicians."""
    from concierge.logs import configure_logging
    from recruitment.consumer import RecruitmentConsumer
    from recruitment.db import upgrade
    from recruitment.runtime import build_runtime
    from recruitment.scheduler import start_scheduler, stop_scheduler

    configuration = load_configuration()  # every section checked before starting
    settings = configuration.settings
    configure_logging(settings.log_format, log_level.upper())
    recruitment_settings = configuration.recruitment
    if status_port is None:
        status_port = recruitment_settings.status_port
    url = recruitment_settings.resolved_url(settings.home)
    if migrate:
        upgrade(url)
    runtime = build_runtime(recruitment_settings, url=url)
    consumer = RecruitmentConsumer(
        runtime.service,
        settings.kafka_bootstrap_servers,
        prefix=settings.topic_prefix,
        group=recruitment_settings.consumer_group,
        batch_size=batch_size or recruitment_settings.batch_size,
        config={"group.instance.id": recruitment_settings.instance_id}
        if recruitment_settings.instance_id
        else None,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    jobs = start_scheduler(runtime) if scheduler else None
    status = None
    if status_port:
        from concierge.metrics import recruitment_registry
        from infra.status_http import StatusServer

        status = StatusServer(
            lambda: consumer.readiness().to_dict(),
            status_port,
            host=recruitment_settings.status_bind,
            metrics=recruitment_registry(consumer),
        ).start()
    try:
        consumer.run(stop, idle_exit=idle_exit)
    finally:
        if status is not None:
            status.stop()
        consumer.close()
        if jobs is not None:
            stop_scheduler(jobs)
        runtime.close()
    total = consumer.total
    click.echo(
        json.dumps({"messages": total.messages, "applied": total.applied, "skipped": total.skipped})
    )


@recruitment.command()
def dispatch() -> None:
    """Deliver the notifications that are due, once."""
    from recruitment.runtime import build_runtime

    runtime = build_runtime()
    try:
        report = runtime.dispatcher.run_once()
    finally:
        runtime.close()
    click.echo(
        json.dumps(
            {"delivered": report.delivered, "retrying": report.retrying, "failed": report.failed}
        )
    )


@recruitment.command()
@click.argument("trial")
def funnel(trial: str) -> None:
    """Exact counts by invitation state for one trial (operators only: no disclosure control)."""
    from recruitment.runtime import build_runtime
    from recruitment.service import counts_by_state

    runtime = build_runtime()
    try:
        with runtime.sessions() as session:
            counts = counts_by_state(session, trial)
    finally:
        runtime.close()
    click.echo(json.dumps({"trial": trial, "counts": counts}))


if __name__ == "__main__":  # pragma: no cover - python -m concierge.commands.recruitment
    recruitment()
