"""Every store's schema comes from its Alembic migrations (core.db), on SQLite and PostgreSQL:
the migrations make exactly the store's tables, a database made before migrations is adopted
rather than recreated, and processes opening a store at once take turns."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from core import audit, db, revocation
from feasibility.disclosure import tables as disclosure_tables
from fhir_adapters import vault
from tests.recruitment_helpers import BACKENDS, fresh_database

STORES = {
    "vault": (vault.SCHEMA, vault.metadata),
    "audit": (audit.SCHEMA, audit.metadata),
    "disclosure": (disclosure_tables.SCHEMA, disclosure_tables.metadata),
    "revocation": (revocation.SCHEMA, revocation.metadata),
}


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, migrate=False) as url:
        yield url


def _diff(engine: sa.Engine, schema: db.Schema, metadata: sa.MetaData) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": schema.version_table}
        )
        return list(compare_metadata(context, metadata))


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


@pytest.mark.parametrize("store", sorted(STORES))
def test_migrations_make_exactly_the_store_and_go_down_again(empty_url: str, store: str) -> None:
    schema, metadata = STORES[store]
    engine = db.make_engine(empty_url)
    try:
        with pytest.raises(db.SchemaNotReady, match=f"{schema.name} database is at revision none"):
            db.check_schema(schema, engine)
        db.ensure_schema(schema, empty_url)
        db.check_schema(schema, engine)
        assert _tables(engine) == set(metadata.tables) | {schema.version_table}
        assert _diff(engine, schema, metadata) == []
        db.ensure_schema(schema, empty_url)  # idempotent
        db.downgrade(schema, empty_url, "base")
        assert _tables(engine) == {schema.version_table}
        db.upgrade(schema, empty_url)
        assert _diff(engine, schema, metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("store", sorted(STORES))
def test_a_database_made_before_migrations_is_adopted_with_its_rows(
    empty_url: str, store: str
) -> None:
    schema, metadata = STORES[store]
    engine = db.make_engine(empty_url)
    try:
        metadata.create_all(engine)  # what the store did before it had migrations
        table = next(iter(metadata.tables.values()))
        row = {c.name: _value(c) for c in table.columns}
        with engine.begin() as conn:
            conn.execute(table.insert().values(**row))
        db.ensure_schema(schema, empty_url)
        db.check_schema(schema, engine)
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 1
    finally:
        engine.dispose()


def _value(column: sa.Column[object]) -> object:
    if isinstance(column.type, sa.Boolean):
        return False
    if isinstance(column.type, sa.Integer | sa.Float):
        return 1
    if isinstance(column.type, sa.LargeBinary):
        return b"x"
    if isinstance(column.type, sa.DateTime):
        return datetime(2026, 1, 1, tzinfo=UTC)
    return "x"


def _open_vault(url: str) -> None:
    vault.SqlVault(url).close()


def test_processes_opening_a_new_sqlite_store_at_once_take_turns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_open_vault, args=(url,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    engine = db.make_engine(url)
    try:
        db.check_schema(vault.SCHEMA, engine)
    finally:
        engine.dispose()


def test_sqlite_writers_begin_immediate_only_when_asked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.sqlite'}"
    immediate = db.make_engine(url, immediate_writes=True)
    deferred = db.make_engine(url)
    try:
        with immediate.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        with immediate.begin() as holder:  # a writer: BEGIN IMMEDIATE, the write lock held
            holder.exec_driver_sql("INSERT INTO t VALUES (1)")
            reader = db.make_read_sessionmaker(immediate)
            with reader() as session:  # reads begin deferred: they never wait for the writer
                assert session.execute(sa.text("SELECT count(*) FROM t")).scalar_one() == 0
            locked = db.make_engine(url, immediate_writes=True, connect_args={"timeout": 0.2})
            try:  # another writer cannot even begin while the first holds the lock
                with pytest.raises(sa.exc.OperationalError, match="locked"), locked.begin():
                    pass
            finally:
                locked.dispose()
        with deferred.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
    finally:
        immediate.dispose()
        deferred.dispose()
