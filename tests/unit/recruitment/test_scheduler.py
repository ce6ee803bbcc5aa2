"""Scheduled work: jobs persist in the recruitment database and run the service's housekeeping."""

from __future__ import annotations

import pickle
from pathlib import Path

import sqlalchemy as sa

from recruitment import scheduler
from recruitment.models import SCHEDULER_JOBS_TABLE, Invitation
from recruitment.notify import MemoryChannel
from recruitment.runtime import build_runtime
from recruitment.settings import RecruitmentSettings
from tests.recruitment_helpers import (
    Clock,
    cohort,
    fresh_database,
    patient_facts,
    practitioner,
    practitioner_key,
    trial,
)

JOB_IDS = {
    "recruitment.dispatch",
    "recruitment.digests",
    "recruitment.reminders",
    "recruitment.expiry",
    "recruitment.reevaluate",
}


def test_jobs_persist_in_the_job_store_and_restarts_do_not_duplicate_them(
    tmp_path: Path,
) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        settings = RecruitmentSettings(url=url, digest_hour=6, dispatch_interval_seconds=3600)
        runtime = build_runtime(settings, url=url, channels={}, clock=Clock())
        try:
            for _ in range(2):  # start, stop, start again: the same five jobs
                jobs = scheduler.start_scheduler(runtime)
                assert {job.id for job in jobs.get_jobs()} == JOB_IDS
                scheduler.stop_scheduler(jobs)
            with runtime.engine.connect() as conn:
                rows = conn.execute(
                    sa.text(f"SELECT id, job_state FROM {SCHEDULER_JOBS_TABLE}")
                ).all()
            assert {row.id for row in rows} == JOB_IDS
            digest = next(pickle.loads(r.job_state) for r in rows if r.id == "recruitment.digests")
            assert digest["func"] == "recruitment.scheduler:run_job"
            assert digest["args"] == ("digests",)
            assert "hour='6'" in str(digest["trigger"])
            assert scheduler.run_job("expiry") == 0  # no runtime bound after stop: a no-op
        finally:
            runtime.close()


def test_housekeeping_jobs_expire_remind_and_deliver(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        clock = Clock()
        email = MemoryChannel()
        settings = RecruitmentSettings(url=url, expiry_days=30, reminder_days=7)
        runtime = build_runtime(settings, url=url, channels={"email": email}, clock=clock)
        try:
            with runtime.sessions.begin() as session:
                work = runtime.service.unit_of_work(session)
                work.trial("t1", trial())
                work.reference(practitioner("gp1"))
                work.facts(patient_facts("p1", gps=[practitioner_key("gp1")]))
                work.cohort("t1", "p1", cohort("t1", "p1", 1))
                work.finish()
            scheduler._runtime = runtime  # what start_scheduler binds
            assert scheduler.run_job("dispatch") == 1
            clock.advance(days=8)
            assert scheduler.run_job("reminders") == 1
            assert scheduler.run_job("dispatch") == 1
            assert [n.kind for n in email.sent] == ["alert", "reminder"]
            assert scheduler.run_job("expiry") == 0
            clock.advance(days=23)
            assert scheduler.run_job("expiry") == 1
            assert scheduler.run_job("reevaluate") == 0
            with runtime.sessions() as session:
                assert session.scalars(sa.select(Invitation.state)).all() == ["expired"]
        finally:
            scheduler._runtime = None
            runtime.close()


def test_the_job_store_waits_out_a_locked_database_instead_of_ending_the_scheduler(
    tmp_path: Path,
) -> None:
    """The demo's recruitment service lost its scheduler thread to one ``database is locked``
    from ``update_job`` (APScheduler does not catch it there): another process held SQLite's
    write lock past the busy timeout. A real lock held by another connection, a busy timeout
    of 0.2 s: the update waits until the lock is released, and lands."""
    import sqlite3
    import threading
    import time

    from apscheduler.triggers.interval import IntervalTrigger

    path = tmp_path / "jobs.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.2})
    store = scheduler.RetryingJobStore(engine=engine, tablename="jobs")
    jobs = scheduler.BackgroundScheduler(jobstores={"default": store})
    jobs.add_job(print, IntervalTrigger(seconds=60), id="j", args=["x"])
    jobs.start(paused=True)
    try:
        job = jobs.get_job("j")
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as another process would hold it
        released = threading.Timer(1.5, holder.execute, args=["COMMIT"])
        released.start()
        started = time.monotonic()
        later = job.next_run_time.replace(year=job.next_run_time.year + 1)
        job._modify(next_run_time=later)
        store.update_job(job)  # raised OperationalError after 0.2 s before
        assert time.monotonic() - started >= 1.0
        assert store.lookup_job("j").next_run_time == later
        assert store.get_next_run_time() == later
        released.join()
        holder.close()
    finally:
        jobs.shutdown(wait=False)
        engine.dispose()
