"""Bulk-Data-style export of a trial's feed (the shape of FHIR Bulk Data ``$export``).

A kick-off answers 202 with ``Content-Location``, the status URL; the status answers 202 (with
``X-Progress`` and ``Retry-After``) while the job runs, then 200 with a manifest: the
``transactionTime``, the request, and the output files (NDJSON, one feed entry a line, at most
``lines_per_file`` each) by URL. Jobs run on a thread of the API process and write under
``<home>/followup-exports/<job>``; the manifest is written last (atomically), so a reader never
sees a half-written export as complete. A job is its requester's: another caller is told 404.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .service import FollowupService


@dataclass
class Job:
    id: str
    trial_id: str
    owner: str
    request: str
    started: datetime
    upto: int = 0
    written: int = 0
    done: bool = False
    error: str | None = None
    files: list[str] = field(default_factory=list)
    #: how current the follow-up tables were at kick-off (``followup.progress.Standing.body``)
    standing: dict[str, Any] = field(default_factory=dict)


class Exports:
    def __init__(self, service: FollowupService, root: Path, lines_per_file: int = 10_000) -> None:
        self.service = service
        self.root = root
        self.lines_per_file = lines_per_file
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def kick_off(
        self,
        trial_id: str,
        owner: str,
        request: str,
        since: int = 0,
        standing: dict[str, Any] | None = None,
    ) -> Job:
        job = Job(id=uuid.uuid4().hex, trial_id=trial_id, owner=owner, request=request,
                  started=datetime.now(UTC), standing=dict(standing or {}))  # fmt: skip
        upto = self.service.feed(trial_id, 0, 1)["written"]
        job.upto = upto
        with self._lock:
            self._jobs[job.id] = job
        thread = threading.Thread(target=self._run, args=(job, since), daemon=True,
                                  name=f"followup-export-{job.id[:8]}")  # fmt: skip
        thread.start()
        return job

    def get(self, job_id: str, owner: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def file(self, job: Job, name: str) -> Path | None:
        if name not in job.files:
            return None
        return self.root / job.id / name

    def _run(self, job: Job, since: int) -> None:
        folder = self.root / job.id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            after, index, handle, lines = since, 0, None, 0
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
                        job.files.append(name)
                        lines = 0
                    handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
                    lines += 1
                    job.written += 1
                after = entries[-1]["seq"]
            if handle is not None:
                handle.close()
            manifest = folder / "manifest.json"
            tmp = folder / "manifest.json.tmp"
            tmp.write_text(json.dumps({"job": job.id, "files": job.files}))
            os.replace(tmp, manifest)
        except Exception as exc:  # reported on the status URL, never swallowed
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            job.done = True

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
