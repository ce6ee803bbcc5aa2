"""The recruitment schema: Alembic migrations agree with the models, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from recruitment import db
from recruitment.models import Base, Candidate, Invitation, Trial
from tests.recruitment_helpers import BACKENDS, fresh_database

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, migrate=False) as url:
        yield url


def _diff(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": db.VERSION_TABLE}
        )
        return list(compare_metadata(context, Base.metadata))


def test_migrations_create_exactly_the_models_and_go_down_again(empty_url: str) -> None:
    engine = db.make_engine(empty_url)
    try:
        with pytest.raises(db.SchemaNotReady, match="concierge recruitment migrate"):
            db.check_schema(engine)
        db.upgrade(empty_url)
        db.check_schema(engine)
        assert db.current_revision(engine) == db.head_revision() == "0002"
        tables = set(sa.inspect(engine).get_table_names())
        assert set(Base.metadata.tables) | {db.VERSION_TABLE} == tables
        assert _diff(engine) == []
        db.upgrade(empty_url)  # idempotent
        db.downgrade(empty_url, "base")
        assert set(sa.inspect(engine).get_table_names()) == {db.VERSION_TABLE}
        db.upgrade(empty_url)
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_one_open_invitation_per_patient_is_enforced_by_the_database(empty_url: str) -> None:
    db.upgrade(empty_url)
    engine = db.make_engine(empty_url)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    sessions = db.make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            session.add(Trial(id="t1", version=1, status="active", updated_at=now))
            session.add(Trial(id="t2", version=1, status="active", updated_at=now))
            for i, trial in enumerate(("t1", "t2")):
                session.add(
                    Candidate(
                        id=f"c{i}",
                        trial_id=trial,
                        patient="p1",
                        site="RA3",
                        status="invited",
                        held_reasons=[],
                        arrival=i,
                        created_at=now,
                        updated_at=now,
                    )
                )

        def invitation(id_: str, candidate: str, trial: str, active: bool) -> Invitation:
            return Invitation(
                id=id_,
                candidate_id=candidate,
                trial_id=trial,
                patient="p1",
                site="RA3",
                practitioner="gp",
                state="proposed" if active else "withdrawn",
                active=active,
                created_at=now,
                state_changed_at=now,
            )

        with sessions.begin() as session:
            session.add(invitation("i1", "c0", "t1", active=True))
            session.add(invitation("i0", "c0", "t1", active=False))
        with pytest.raises(sa.exc.IntegrityError), sessions.begin() as session:
            session.add(invitation("i2", "c1", "t2", active=True))
        with sessions.begin() as session:
            session.add(invitation("i3", "c1", "t2", active=False))
    finally:
        engine.dispose()


def test_timestamps_come_back_in_utc_and_naive_ones_are_refused(empty_url: str) -> None:
    db.upgrade(empty_url)
    engine = db.make_engine(empty_url)
    sessions = db.make_sessionmaker(engine)
    london_summer = timezone(timedelta(hours=1))
    try:
        with sessions.begin() as session:
            session.add(
                Trial(
                    id="t1",
                    version=1,
                    status="active",
                    updated_at=datetime(2026, 7, 1, 13, 0, tzinfo=london_summer),
                )
            )
        with sessions() as session:
            trial = session.get(Trial, "t1")
            assert trial is not None
            assert trial.updated_at == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
            assert trial.updated_at.tzinfo is not None
        with pytest.raises(sa.exc.StatementError, match="naive"), sessions.begin() as session:
            session.add(Trial(id="t2", version=1, status="active", updated_at=datetime(2026, 1, 1)))
    finally:
        engine.dispose()


def test_the_migrate_command_and_alembic_env_read_the_url_from_the_environment(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    env = {**os.environ, "CONCIERGE_RECRUITMENT_URL": url, "CONCIERGE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "concierge.commands.recruitment", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert '"revision": "0002"' in done.stdout
    engine = db.make_engine(url)
    try:
        db.check_schema(engine)
    finally:
        engine.dispose()
