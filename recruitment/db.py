"""The recruitment database: its :class:`core.db.Schema` and engines made by :mod:`core.db`.

SQLite by default (``$CONCIERGE_HOME/recruitment.sqlite``), PostgreSQL in production
(``CONCIERGE_RECRUITMENT_URL=postgresql+psycopg://...``). The schema is made only by the Alembic
migrations in ``recruitment/migrations`` (``concierge recruitment migrate``, or the API at start).

Concurrency: on PostgreSQL, transitions lock the invitation row (``SELECT ... FOR UPDATE``) and
invitation creation locks the trial row, so capacity and "one open invitation per patient" hold
across processes. On SQLite every writing transaction begins ``BEGIN IMMEDIATE`` and the busy
timeout makes other writers wait their turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config

from core import db as core_db
from core.db import SchemaNotReady, make_read_sessionmaker, make_sessionmaker

#: Alembic's bookkeeping table, named for this package so a shared database can hold others.
VERSION_TABLE = "recruitment_alembic_version"

SCHEMA = core_db.Schema(
    name="recruitment",
    migrations=Path(__file__).parent / "migrations",
    version_table=VERSION_TABLE,
    migrate_hint="run `concierge recruitment migrate`",
)


def default_url() -> str:
    from .settings import get_recruitment_settings

    return get_recruitment_settings().resolved_url()


def make_engine(url: str | None = None, **kwargs: Any) -> sa.Engine:
    return core_db.make_engine(url or default_url(), immediate_writes=True, **kwargs)


def alembic_config(url: str | None = None) -> Config:
    return core_db.alembic_config(SCHEMA, url)


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` (default: the configured one) up to ``revision``."""
    core_db.upgrade(SCHEMA, url or default_url(), revision)


def downgrade(url: str, revision: str) -> None:
    core_db.downgrade(SCHEMA, url, revision)


def head_revision() -> str | None:
    return core_db.head_revision(SCHEMA)


def current_revision(engine: sa.Engine) -> str | None:
    return core_db.current_revision(SCHEMA, engine)


def check_schema(engine: sa.Engine) -> None:
    """Fail clearly when the database has not been migrated to the code's revision."""
    core_db.check_schema(SCHEMA, engine)


__all__ = [
    "SCHEMA",
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
