"""Databases: the one way to make an engine, and Alembic migrations for every store.

Each store (identity vault, audit log, disclosure registry, recruitment) describes itself with a
:class:`Schema` (its migrations folder and its own Alembic version table, so several stores can
share one database) and is brought to its head revision by :func:`ensure_schema` when it opens,
or by :func:`upgrade` from a command. SQLite by default, PostgreSQL in production; the SQLite
settings (WAL, busy timeout, foreign keys, optionally ``BEGIN IMMEDIATE`` writers) are here and
nowhere else. See ``docs/explanation/architecture.md`` (Stores).
"""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_SECONDS = 30

#: Text every store can keep, as a JSON Schema / pydantic ``pattern``: PostgreSQL refuses U+0000
#: in text, so a request parameter or field that reaches SQL takes it (a NUL is answered 422
#: naming the field, never 500 from the driver).
NO_NUL = r"^[^\u0000]*$"

#: Execution option marking a connection that only reads (see :func:`make_read_sessionmaker`).
READ_ONLY = "concierge_read_only"


@dataclass(frozen=True)
class Schema:
    """A store's schema as its Alembic migrations define it."""

    name: str
    migrations: Path
    version_table: str
    #: What to tell an operator whose database is behind.
    migrate_hint: str = "restart the service to migrate it"


class SchemaNotReady(RuntimeError):
    pass


def make_engine(url: str, *, immediate_writes: bool = False, **kwargs: Any) -> sa.Engine:
    """An engine for ``url``. On SQLite: WAL, a busy timeout, foreign keys, connections usable
    from any thread; with ``immediate_writes``, every transaction that is not read-only begins
    ``BEGIN IMMEDIATE`` (no lock upgrade half-way through a read-then-write). Elsewhere: pool
    pre-ping, so a restarted server costs one retry rather than an error."""
    if url.startswith("sqlite"):
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_SECONDS)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine, immediate_writes)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kwargs)


def _configure_sqlite(engine: sa.Engine, immediate_writes: bool) -> None:
    in_memory = engine.url.database in (None, "", ":memory:")

    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        if immediate_writes:
            # Let SQLAlchemy, not the driver, open transactions, so they can start IMMEDIATE.
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    if not immediate_writes:
        return

    @sa.event.listens_for(engine, "begin")
    def on_begin(connection: sa.Connection) -> None:
        # Writers take the write lock at BEGIN; readers begin deferred, so in WAL mode they
        # never wait for a writer.
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


# ------------------------------------------------------------------------------ migrations


def alembic_config(schema: Schema, url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(schema.migrations))
    config.set_main_option("version_table", schema.version_table)
    if url:
        # ConfigParser interpolation: a literal % must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision(schema: Schema) -> str | None:
    return ScriptDirectory.from_config(alembic_config(schema)).get_current_head()


def current_revision(schema: Schema, engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": schema.version_table})
        return context.get_current_revision()


def check_schema(schema: Schema, engine: sa.Engine) -> None:
    """Fail clearly when the database is not at the code's revision."""
    current, head = current_revision(schema, engine), head_revision(schema)
    if current != head:
        raise SchemaNotReady(
            f"{schema.name} database is at revision {current or 'none'}, the code needs {head}: "
            f"{schema.migrate_hint}"
        )


def upgrade(schema: Schema, url: str, revision: str = "head") -> None:
    """Bring the store at ``url`` to ``revision``. (A store's first revision creates only the
    tables that are missing, so a database made before the store had migrations is adopted with
    its rows, not recreated.)

    Processes that open the same store at once (the API and recruitment in the demo) take turns:
    an advisory lock on PostgreSQL, a lock file beside the database on SQLite (``fcntl``: SQLite
    has no advisory locks, and DDL racing DDL fails with "table already exists")."""
    with _migration_lock(schema, url):
        command.upgrade(alembic_config(schema, url), revision)


def downgrade(schema: Schema, url: str, revision: str) -> None:
    with _migration_lock(schema, url):
        command.downgrade(alembic_config(schema, url), revision)


def ensure_schema(schema: Schema, url: str) -> None:
    """At open: migrate the store at ``url`` if it is behind (one query when it is not)."""
    engine = make_engine(url, poolclass=sa.pool.NullPool)
    try:
        ensure_engine_schema(schema, engine)
    finally:
        engine.dispose()


def ensure_engine_schema(schema: Schema, engine: sa.Engine) -> None:
    """As :func:`ensure_schema`, on a connection of ``engine`` (for a store handed an engine, or
    an in-memory SQLite database that only that engine's connection can see)."""
    head = head_revision(schema)
    if current_revision(schema, engine) == head:
        return
    url = engine.url.render_as_string(hide_password=False)
    with _migration_lock(schema, url), engine.begin() as conn:
        config = alembic_config(schema)
        config.attributes["connection"] = conn
        context = MigrationContext.configure(conn, opts={"version_table": schema.version_table})
        if context.get_current_revision() == head:  # migrated by another while this one waited
            return
        command.upgrade(config, "head")


@contextlib.contextmanager
def _migration_lock(schema: Schema, url: str) -> Iterator[None]:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(f"{database}.{schema.version_table}.lock")
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if parsed.get_backend_name() == "postgresql":
        key = zlib.crc32(schema.version_table.encode())
        engine = make_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield


class ProcessLock:
    """A re-entrant lock held across every process that shares ``engine``'s database: threads
    of this process take turns on an ``RLock``; the outermost holder also takes PostgreSQL's
    session advisory lock ``name`` (on a connection of its own, released by the server if the
    process dies), or an exclusive ``flock`` on ``<database>.<name>.lock`` next to a SQLite
    file (SQLite is shared only by processes on one host). An in-memory SQLite database belongs
    to one process: the ``RLock`` alone.

    For a read-decide-write that spans several transactions (the disclosure registry's
    refresh, match and record; the query budget's check and charge), where a row lock or
    ``BEGIN IMMEDIATE`` would cover only one of them."""

    def __init__(self, engine: sa.Engine, name: str) -> None:
        import threading

        self.engine = engine
        self.name = name
        self._local = threading.RLock()
        self._depth = 0
        self._held: contextlib.ExitStack | None = None

    def __enter__(self) -> ProcessLock:
        self._local.acquire()
        try:
            if self._depth == 0:
                self._held = self._acquire()
        except BaseException:
            self._local.release()
            raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._held is not None:
                held, self._held = self._held, None
                held.close()
        finally:
            self._local.release()

    def _acquire(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        backend = self.engine.url.get_backend_name()
        if backend == "postgresql":
            key = zlib.crc32(f"concierge:{self.name}".encode())
            conn = stack.enter_context(self.engine.connect())
            # autocommit: the advisory lock is the session's, not a transaction's
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            stack.callback(conn.execute, sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        elif backend == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            path = Path(f"{self.engine.url.database}.{self.name}.lock")
            handle = stack.enter_context(path.open("a"))
            fcntl.flock(handle, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        return stack


def run_environment(
    context: Any, metadata: sa.MetaData | None, default_url: str | None = None
) -> None:
    """The body of every store's Alembic ``env.py``. The URL comes from, in order: a connection
    in ``config.attributes["connection"]``; the ``sqlalchemy.url`` option (:func:`upgrade` sets
    it); ``-x url=...`` on the alembic command line; ``default_url``."""
    config = context.config
    version_table = config.get_main_option("version_table")
    url = (
        config.get_main_option("sqlalchemy.url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or default_url
    )

    def configure(connection: sa.Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    if context.is_offline_mode():
        context.configure(
            url=url,
            target_metadata=metadata,
            version_table=version_table,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        configure(connection)
        return
    if not url:
        raise SchemaNotReady("no database URL for the migration (pass -x url=...)")
    engine = make_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            configure(conn)
    finally:
        engine.dispose()


__all__ = [
    "NO_NUL",
    "READ_ONLY",
    "ProcessLock",
    "Schema",
    "SchemaNotReady",
    "alembic_config",
    "check_schema",
    "current_revision",
    "downgrade",
    "ensure_engine_schema",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "make_read_sessionmaker",
    "make_sessionmaker",
    "run_environment",
    "upgrade",
]
