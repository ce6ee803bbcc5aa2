"""Bulk-Data-style export of a trial's feed (the shape of FHIR Bulk Data ``$export``).

A kick-off answers 202 with ``Content-Location``, the status URL; the status answers 202 (with
``X-Progress`` and ``Retry-After``) while the job runs, then 200 with a manifest: the
``transactionTime``, the request, and the output files (NDJSON, one feed entry a line, at most
``lines_per_file`` each) by URL. A job is its requester's: another caller is told 404.

Jobs are rows of ``followup_exports`` in the follow-up database, so a status URL still answers
after the API restarts. A job runs on a thread of the API process that kicked it off (or took
it over) and writes under ``<home>/followup-exports/<job>``; while it runs it renews a lease.
A job whose lease has run out (its process died) is taken over, at the next look at its status
or when an API process starts, and run again from its start: the export is fixed at kick-off
(the feed up to ``upto``, which never changes once written), so running it again writes the
same files. The files and the manifest are written before the row says ``done``, so a reader
never sees a half-written export as complete. Files live on the machine that wrote them: API
processes on several machines need ``CONCIERGE_HOME``'s ``followup-exports`` on shared storage.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from .service import FollowupService
from .tables import ExportJob

log = logging.getLogger(__name__)

#: Seconds a running job's lease lasts; its runner renews it at every page of the feed.
LEASE_SECONDS = 30.0


@dataclass
class Job:
    """A job as its row says (a copy: the row is the truth)."""

    id: str
    trial_id: str
    owner: str
    request: str
    started: datetime
    since: int = 0
    upto: int = 0
    written: int = 0
    state: str = "running"
    error: str | None = None
    files: list[str] = field(default_factory=list)
    #: how current the follow-up tables were at kick-off (``followup.progress.Standing.body``)
    standing: dict[str, Any] = field(default_factory=dict)
    lease_until: datetime | None = None

    @property
    def done(self) -> bool:
        return self.state != "running"

    @classmethod
    def of(cls, row: ExportJob) -> Job:
        return cls(id=row.id, trial_id=row.trial_id, owner=row.owner, request=row.request,
                   started=row.started, since=row.since, upto=row.upto, written=row.written,
                   state=row.state, error=row.error, files=list(row.files),
                   standing=dict(row.standing), lease_until=row.lease_until)  # fmt: skip


class Exports:
    def __init__(
        self,
        service: FollowupService,
        root: Path,
        lines_per_file: int = 10_000,
        *,
        sessions: sessionmaker[Session] | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.service = service
        self.sessions = sessions or service.sessions
        self.root = root
        self.lines_per_file = lines_per_file
        self.lease_seconds = lease_seconds
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def _lease(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.lease_seconds)

    def kick_off(
        self,
        trial_id: str,
        owner: str,
        request: str,
        since: int = 0,
        standing: dict[str, Any] | None = None,
    ) -> Job:
        upto = self.service.feed(trial_id, 0, 1)["written"]
        row = ExportJob(id=uuid.uuid4().hex, trial_id=trial_id, owner=owner, request=request,
                        started=datetime.now(UTC), since=since, upto=upto, written=0,
                        state="running", error=None, files=[], standing=dict(standing or {}),
                        lease_until=self._lease())  # fmt: skip
        with self.sessions.begin() as session:
            session.add(row)
            job = Job.of(row)
        self._start(job)
        return job

    def resume(self) -> int:
        """Take over every running job whose lease has run out (its process is gone); how
        many. An API process calls it when it starts."""
        with self.sessions() as session:
            ids = session.scalars(
                sa.select(ExportJob.id).where(
                    ExportJob.state == "running", ExportJob.lease_until < datetime.now(UTC)
                )
            ).all()
        return sum(1 for job_id in ids if self._take_over(job_id))

    def _take_over(self, job_id: str) -> bool:
        """Claim a running job whose lease ran out (one process wins) and run it again."""
        now = datetime.now(UTC)
        with self.sessions.begin() as session:
            update = (
                sa.update(ExportJob)
                .where(
                    ExportJob.id == job_id,
                    ExportJob.state == "running",
                    ExportJob.lease_until < now,
                )
                .values(lease_until=self._lease(), written=0, files=[])
            )
            claimed = cast("sa.CursorResult[Any]", session.execute(update)).rowcount
            row = session.get(ExportJob, job_id) if claimed else None
            job = Job.of(row) if row is not None else None
        if job is None:
            return False
        log.info("follow-up export %s taken over (its lease ran out): running it again", job_id)
        self._start(job)
        return True

    def _start(self, job: Job) -> None:
        thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                  name=f"followup-export-{job.id[:8]}")  # fmt: skip
        with self._lock:
            self._threads[job.id] = thread
        thread.start()

    def get(self, job_id: str, owner: str) -> Job | None:
        with self.sessions() as session:
            row = session.get(ExportJob, job_id)
            job = Job.of(row) if row is not None else None
        if job is None or job.owner != owner:
            return None
        if not job.done and job.lease_until is not None and job.lease_until < datetime.now(UTC):
            self._take_over(job.id)  # its runner died: run it here
            return self.get(job_id, owner)
        return job

    def file(self, job: Job, name: str) -> Path | None:
        if name not in job.files:
            return None
        path = self.root / job.id / name
        return path if path.exists() else None

    def wait(self, job_id: str, timeout: float) -> None:
        """Wait for this process's thread of a job (tests, shutdown)."""
        with self._lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)

    def _update(self, job: Job, **values: Any) -> None:
        with self.sessions.begin() as session:
            session.execute(
                sa.update(ExportJob)
                .where(ExportJob.id == job.id)
                .values(lease_until=self._lease(), **values)
            )

    def _run(self, job: Job) -> None:
        folder = self.root / job.id
        files: list[str] = []
        written = 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            after, index, handle, lines = job.since, 0, None, 0
            while after < job.upto:
                entries = self.service.entries_after(job.trial_id, after, 1000)
                entries = [e for e in entries if e["seq"] <= job.upto]
                if not entries:
                    break
                for entry in entries:
                    if handle is None or lines >= self.lines_per_file:
                        if handle is not None:
                            handle.close()
                        index += 1
                        name = f"feed-{index:04d}.ndjson"
                        handle = (folder / name).open("w", encoding="utf-8")
                        files.append(name)
                        lines = 0
                    handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
                    lines += 1
                    written += 1
                after = entries[-1]["seq"]
                self._update(job, written=written)  # progress, and the lease renewed
            if handle is not None:
                handle.close()
            manifest = folder / "manifest.json"
            tmp = folder / "manifest.json.tmp"
            tmp.write_text(json.dumps({"job": job.id, "files": files}))
            os.replace(tmp, manifest)
            self._update(job, written=written, files=files, state="done")
        except Exception as exc:  # reported on the status URL, never swallowed
            log.exception("follow-up export %s failed", job.id)
            try:
                self._update(job, state="failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # the database is away: the lease runs out, another run follows
                log.exception("follow-up export %s: could not record the failure", job.id)

    def manifest(self, job: Job, base_url: str) -> dict[str, Any]:
        return {
            "transactionTime": job.started.isoformat(),
            "request": job.request,
            "requiresAccessToken": True,
            "output": [
                {"type": "FollowupEntry", "url": f"{base_url}/{name}"} for name in job.files
            ],
            "error": [],
            "extension": {
                "trial": job.trial_id,
                "upto": job.upto,
                "entries": job.written,
                **job.standing,
            },
        }

    def headers(self, job: Job) -> dict[str, str]:
        """How current the export's feed was, for its NDJSON files."""
        out = {"X-Followup-Partial": "true" if job.standing.get("partial") else "false"}
        if job.standing.get("lag") is not None:
            out["X-Followup-Lag"] = str(job.standing["lag"])
        if job.standing.get("as_of"):
            out["X-Followup-As-Of"] = str(job.standing["as_of"])
        return out
