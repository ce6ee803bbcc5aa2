"""Alembic environment for the recruitment database.

The URL comes from, in order: a connection passed in ``config.attributes["connection"]``; the
``sqlalchemy.url`` option (``recruitment.db.upgrade(url)`` sets it); ``-x url=...`` on the alembic
command line; ``CONCIERGE_RECRUITMENT_URL``; the default SQLite file under ``CONCIERGE_HOME``.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from recruitment.db import VERSION_TABLE, default_url, make_engine
from recruitment.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("CONCIERGE_RECRUITMENT_URL")
        or default_url()
    )


def _version_table() -> str:
    return config.get_main_option("version_table") or VERSION_TABLE


def _configure(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=_version_table(),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=_version_table(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
