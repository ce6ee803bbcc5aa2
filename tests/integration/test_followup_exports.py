"""``$export`` jobs live in the database: a status URL answers after the API restarts, on SQLite
and PostgreSQL, and a job whose process died is taken over and finished by another."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.contracts.facts import Coding, ConditionFact, ConsentFact, Provenance, ResourceFacts
from core.db import make_engine, make_sessionmaker
from followup.db import upgrade
from followup.engine import FollowupEngine, Outcome
from followup.export import Exports, Job
from followup.service import FollowupService
from tests.followup_helpers import SECRET, enrol, plan
from tests.recruitment_helpers import fresh_database

SOURCE = "urn:test:ehr"
STANDING = {"partial": True, "lag": 3, "as_of": "2026-12-07T12:00:00+00:00"}


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with fresh_database(request.param, tmp_path, migrate=False) as url:
        upgrade(url)
        engine = make_engine(url, immediate_writes=True)
        yield make_sessionmaker(engine)
        engine.dispose()


def envelope(key: str, patient: str, *facts: object) -> ResourceFacts:
    kind, ident = key.split("|")
    return ResourceFacts(
        key=f"{SOURCE}|{key}", patient=patient, seq=1,
        provenance=Provenance(source=SOURCE, resource_type=kind, resource_id=ident, version="1",
                              ingested_at=datetime.now(UTC)),
        facts=tuple(facts),  # type: ignore[arg-type]
    )  # fmt: skip


def feed_of(sessions: sessionmaker[Session], facts: int) -> list[dict[str, object]]:
    """A trial ``TX`` with one participant and ``facts`` conditions on its feed."""
    FollowupService(sessions).put_plan("TX", plan(), "dm")
    enrol(sessions, "TX", "px")
    engine, out = FollowupEngine(SECRET, "https://x.example"), Outcome()
    permit = ConsentFact(status="active", research_opt_out=False, follow_up_trials=("TX",))
    with sessions.begin() as session:
        engine.apply_one(session, envelope("Consent|k", "px", permit), out)
        for n in range(facts):
            fact = ConditionFact(codes=(Coding(system="http://snomed.info/sct", code=str(n)),))
            engine.apply_one(session, envelope(f"Condition|c{n}", "px", fact), out)
    return list(FollowupService(sessions).feed("TX", 0, 1000)["entries"])


def lines(exports: Exports, job: Job) -> list[dict[str, object]]:
    out = []
    for name in job.files:
        path = exports.file(job, name)
        assert path is not None
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def wait_done(exports: Exports, job_id: str, owner: str = "dm") -> Job:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = exports.get(job_id, owner)
        assert job is not None
        if job.done:
            return job
        time.sleep(0.05)
    raise AssertionError(f"export {job_id} did not finish")


def test_a_status_url_answers_after_a_restart(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    entries = feed_of(sessions, 7)
    root = tmp_path / "exports"
    first = Exports(FollowupService(sessions), root, lines_per_file=3)
    job = first.kick_off("TX", "dm", "https://api.example/$export", 0, STANDING)
    first.wait(job.id, 30)
    del first  # the API process is gone

    again = Exports(FollowupService(sessions), root, lines_per_file=3)  # restarted
    found = wait_done(again, job.id)
    assert found.state == "done" and found.error is None
    assert found.files == ["feed-0001.ndjson", "feed-0002.ndjson", "feed-0003.ndjson"]
    assert lines(again, found) == entries
    manifest = again.manifest(found, "https://api.example/v1/followup/exports/x")
    assert manifest["extension"]["entries"] == len(entries) == found.upto
    assert manifest["extension"]["partial"] is True and manifest["extension"]["lag"] == 3
    assert again.headers(found)["X-Followup-Partial"] == "true"
    assert again.get(job.id, "someone-else") is None  # still its requester's alone


class Dies(Exports):
    """An API process that dies right after kick-off: the job's row exists, nothing runs it."""

    def _start(self, job: Job) -> None:
        return None


def test_a_job_whose_process_died_is_taken_over(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    entries = feed_of(sessions, 4)
    root = tmp_path / "exports"
    dead = Dies(FollowupService(sessions), root, lease_seconds=0.5)
    job = dead.kick_off("TX", "dm", "https://api.example/$export", 2)
    other = Exports(FollowupService(sessions), root)
    running = other.get(job.id, "dm")
    assert running is not None and not running.done  # its lease has not run out yet: 202
    time.sleep(0.6)
    assert other.resume() == 1  # as an API process does when it starts
    assert other.resume() == 0  # taken: once
    other.wait(job.id, 30)
    found = wait_done(other, job.id)
    assert found.state == "done"
    assert lines(other, found) == [e for e in entries if int(str(e["seq"])) > 2]
