"""``concierge worker``: run the stream processor (a Faust worker)."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--web-port",
    type=int,
    default=None,
    help="Port of the worker's status pages (default CONCIERGE_WORKER_WEB_PORT).",
)
@click.option(
    "--store", default=None, help="Faust table store URL, e.g. memory:// (default) or rocksdb://."
)
@click.option(
    "--loglevel",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def worker(web_port: int | None, store: str | None, loglevel: str) -> None:
    """Run the stream worker: per-patient state and live cohorts of saved questions.

    Patient state is rebuilt from the facts topic on start; cohort membership survives restarts
    in the cohort topic (the table's changelog). Several workers with the same
    CONCIERGE_WORKER_ID share the partitions between them. Status pages on the web port, bound
    to CONCIERGE_WORKER_WEB_BIND (127.0.0.1 by default): /health, /readyz (503 until every
    assigned partition is rebuilt and caught up) and /metrics (Prometheus) for anyone;
    /state/digest, /state/patients/{pseudonym}, /state/cohorts and /state/devices for an admin
    bearer token only, each request audited.
    """
    from concierge.configuration import load_configuration

    # every section checked before Faust is even imported: a bad value is one line at once,
    # not after seconds of imports (a loaded machine took over a minute)
    settings = load_configuration().settings
    from faust.worker import Worker

    from surveillance_stream.app import create_app

    if web_port is not None:
        settings = settings.model_copy(update={"worker_web_port": web_port})
    from concierge.logs import faust_logging_config

    stream = create_app(settings, store)
    stream.declare_topics()
    runner = Worker(
        stream.app,
        loglevel=loglevel,
        logging_config=faust_logging_config(settings.log_format, loglevel),
        # JSON logs: no start-up banner (a table on stdout, not a log record)
        quiet=settings.log_format == "json",
    )
    # No terminal spinner: when it is on, Faust sets the root log handler's level to the
    # worker's ``--loglevel`` after our logging configuration is applied, which swallowed the
    # product's INFO lines (a partition rebuilt, a checkpoint loaded) at the default
    # ``warning``, and it writes cursor escape codes into log files.
    runner.spinner = None
    runner.execute_from_commandline()
