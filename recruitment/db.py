"""Engines, sessions and migrations for the recruitment database.

SQLite by default (``$CONCIERGE_HOME/recruitment.sqlite``), PostgreSQL in production
(``CONCIERGE_RECRUITMENT_URL=postgresql+psycopg://...``). The schema is made only by the Alembic
migrations in ``recruitment/migrations``: call :func:`upgrade` (or ``concierge recruitment
migrate``); nothing in a production path calls ``create_all``.

Concurrency: on PostgreSQL, transitions lock the invitation row (``SELECT ... FOR UPDATE``) and
invitation creation locks the trial row, so capacity and "one open invitation per patient" hold
across processes. SQLite has one writer at a time: every transaction starts ``BEGIN IMMEDIATE``,
so a read-then-write never fails half-way with "database is locked", and the busy timeout makes
other writers wait their turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
#: Alembic's bookkeeping table, named for this package so a shared database can hold others.
VERSION_TABLE = "recruitment_alembic_version"
SQLITE_BUSY_TIMEOUT_SECONDS = 30


def default_url() -> str:
    from .settings import get_recruitment_settings

    return get_recruitment_settings().resolved_url()


def make_engine(url: str | None = None, **kwargs: Any) -> sa.Engine:
    url = url or default_url()
    if url.startswith("sqlite"):
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_SECONDS)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kwargs)


#: Execution option marking a connection that only reads.
READ_ONLY = "concierge_read_only"


def _configure_sqlite(engine: sa.Engine) -> None:
    in_memory = engine.url.database in (None, "", ":memory:")

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, open transactions, so they can start IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        # Writers take the write lock at BEGIN (no lock upgrade to deadlock on later); readers
        # (read_sessionmaker) begin deferred, so in WAL mode they never wait for a writer.
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: sa.Engine) -> sessionmaker[Session]:
    """Sessions for reads only: on SQLite they begin deferred, so they never queue behind
    writers for the write lock (WAL readers see the last committed state)."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("version_table", VERSION_TABLE)
    if url:
        # ConfigParser interpolation: a literal % must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` (default: the configured one) up to ``revision``."""
    command.upgrade(alembic_config(url or default_url()), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


class SchemaNotReady(RuntimeError):
    pass


def check_schema(engine: sa.Engine) -> None:
    """Fail clearly when the database has not been migrated to the code's revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaNotReady(
            f"recruitment database is at revision {current or 'none'}, the code needs {head}: "
            "run `concierge recruitment migrate`"
        )


__all__ = [
    "VERSION_TABLE",
    "SchemaNotReady",
    "alembic_config",
    "check_schema",
    "current_revision",
    "default_url",
    "downgrade",
    "head_revision",
    "make_engine",
    "make_read_sessionmaker",
    "make_sessionmaker",
    "upgrade",
]
