"""Scheduled work, with APScheduler 3 and a persistent job store in the recruitment database.

Jobs (ids are stable, so restarting replaces rather than duplicates them):

=========================  ===================================  ==================================
id                         when                                 does
=========================  ===================================  ==================================
``recruitment.dispatch``   every ``dispatch_interval_seconds``  delivers due notifications
``recruitment.digests``    daily at ``digest_hour`` (local)     one digest per clinician with
                                                                open invitations
``recruitment.reminders``  every ``housekeeping_interval``      reminds clinicians of invitations
                                                                waiting ``reminder_days``
``recruitment.expiry``     every ``housekeeping_interval``      expires invitations unchanged for
                                                                ``expiry_days``
``recruitment.reevaluate`` every ``housekeeping_interval``      re-checks open candidates: holds
                                                                that lift with time, and the
                                                                eligibility hook (time windows)
=========================  ===================================  ==================================

A persistent job store keeps jobs as references to importable functions, so every job calls
:func:`run_job` by name, which finds the process's :class:`~recruitment.runtime.Runtime` (set by
:func:`start_scheduler`). Missed runs are coalesced into one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .lifecycle import InvitationState
from .models import SCHEDULER_JOBS_TABLE, Invitation
from .runtime import Runtime
from .service import awaiting_by_practitioner

log = logging.getLogger(__name__)

_runtime: Runtime | None = None

#: Invitations in these states get a reminder after ``reminder_days`` without a change.
REMIND_STATES = (InvitationState.SENT_TO_CLINICIAN, InvitationState.APPROVED)


def enqueue_digests(runtime: Runtime, now: datetime | None = None) -> int:
    """One digest per clinician with open invitations, at most one per local day each."""
    now = now or runtime.service.clock()
    day = now.astimezone(ZoneInfo(runtime.settings.timezone)).date()
    sent = 0
    with runtime.sessions.begin() as session:
        for practitioner, counts in awaiting_by_practitioner(session).items():
            if runtime.writer.digest(session, practitioner, counts, day, now):
                sent += 1
    return sent


def enqueue_reminders(runtime: Runtime, now: datetime | None = None) -> int:
    now = now or runtime.service.clock()
    cutoff = now - timedelta(days=runtime.settings.reminder_days)
    reminded = 0
    with runtime.sessions.begin() as session:
        waiting = session.scalars(
            sa.select(Invitation)
            .where(
                Invitation.state.in_([s.value for s in REMIND_STATES]),
                Invitation.state_changed_at < cutoff,
            )
            .order_by(Invitation.state_changed_at)
        )
        for invitation in waiting:
            if runtime.writer.reminder(session, invitation, now):
                reminded += 1
    return reminded


def expire_stale(runtime: Runtime, now: datetime | None = None) -> int:
    return runtime.service.expire_stale(timedelta(days=runtime.settings.expiry_days), now)


def reevaluate(runtime: Runtime, now: datetime | None = None) -> int:
    return runtime.service.reevaluate_open(now)


def dispatch(runtime: Runtime, now: datetime | None = None) -> int:
    report = runtime.dispatcher.run_once()
    return report.delivered


JOBS: dict[str, Callable[[Runtime, datetime | None], int]] = {
    "dispatch": dispatch,
    "digests": enqueue_digests,
    "reminders": enqueue_reminders,
    "expiry": expire_stale,
    "reevaluate": reevaluate,
}


def run_job(name: str) -> int:
    """The entry point every stored job calls."""
    runtime = _runtime
    if runtime is None:
        log.warning("recruitment job %s ran with no runtime; skipped", name)
        return 0
    result = JOBS[name](runtime, None)
    if result:
        log.info("recruitment job %s: %d", name, result)
    return result


def register_jobs(scheduler: BaseScheduler, runtime: Runtime) -> None:
    settings = runtime.settings
    zone = ZoneInfo(settings.timezone)
    every = IntervalTrigger(minutes=settings.housekeeping_interval_minutes, timezone=zone)
    triggers: dict[str, Any] = {
        "dispatch": IntervalTrigger(seconds=settings.dispatch_interval_seconds, timezone=zone),
        "digests": CronTrigger(hour=settings.digest_hour, minute=0, timezone=zone),
        "reminders": every,
        "expiry": every,
        "reevaluate": every,
    }
    for name, trigger in triggers.items():
        scheduler.add_job(
            "recruitment.scheduler:run_job",
            trigger=trigger,
            args=[name],
            id=f"recruitment.{name}",
            name=f"recruitment {name}",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=3600 if name == "digests" else 300,
        )


class RetryingJobStore(SQLAlchemyJobStore):
    """APScheduler's SQLAlchemy job store, whose writes after a run wait out a busy database.

    APScheduler catches errors of ``get_due_jobs`` (and retries), but not of ``update_job``
    after a run nor of ``get_next_run_time``: one ``database is locked`` there (SQLite's busy
    timeout passed while another process held the write lock) ended the scheduler's thread, and
    nothing was dispatched again while the service kept running (seen in the demo). These retry
    a database error with a growing pause, saying so in the log, until it passes."""

    #: the longest pause between attempts, seconds
    MAX_PAUSE_SECONDS = 10.0

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        pause = 0.5
        while True:
            try:
                return call()
            except sa.exc.OperationalError as exc:
                log.warning(
                    "scheduler job store: %s failed (%s); retrying in %.1f s",
                    what,
                    exc.orig if exc.orig is not None else exc,
                    pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, self.MAX_PAUSE_SECONDS)

    def update_job(self, job: Any) -> None:
        self._retrying(
            f"updating job {job.id}", lambda: super(RetryingJobStore, self).update_job(job)
        )

    def get_next_run_time(self) -> Any:
        return self._retrying("reading the next run time", super().get_next_run_time)


def build_scheduler(runtime: Runtime) -> BackgroundScheduler:
    store = RetryingJobStore(engine=runtime.engine, tablename=SCHEDULER_JOBS_TABLE)
    return BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(max_workers=2)},
        timezone=ZoneInfo(runtime.settings.timezone),
    )


def start_scheduler(runtime: Runtime) -> BackgroundScheduler:
    """Bind the runtime, (re)register the jobs in the persistent store, and start."""
    global _runtime
    _runtime = runtime
    scheduler = build_scheduler(runtime)
    register_jobs(scheduler, runtime)
    scheduler.start()
    return scheduler


def stop_scheduler(scheduler: BaseScheduler, wait: bool = True) -> None:
    global _runtime
    if scheduler.running:
        scheduler.shutdown(wait=wait)
    _runtime = None


__all__ = [
    "JOBS",
    "build_scheduler",
    "enqueue_digests",
    "enqueue_reminders",
    "register_jobs",
    "run_job",
    "start_scheduler",
    "stop_scheduler",
]
