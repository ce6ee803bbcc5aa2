"""The workspace's own stores: the history of saved questions' cohorts, and every answer a
sponsor got.

**Why a store of our own.** The cohort topic is compacted: Kafka keeps only each
``trial|patient`` key's latest record, so when a patient entered a cohort, and how the live
count moved day by day, is gone from it once the log cleaner has run (and an API that starts
later never sees it). Arrival rates and the live count's time series need those changes, so
the API keeps every membership change it reads from the cohort topic (:class:`CohortHistory`)
in the feasibility database (``CONCIERGE_FEASIBILITY_URL``, tables ``ws_cohort_changes`` and
``ws_cohort_baselines``, migration 0002 of the disclosure store). A SQL table rather than a
topic: the answers read it by trial and time range, several API processes writing the same
change (one key per trial, patient and change counter) is harmless, and the store is the one
disclosure control already keeps beside it (as sensitive: it holds pseudonyms, never shown).

What an API process cannot have read (changes compacted away before it first ran) is not in the
history: the first time it sees a saved question complete is that question's *baseline*, and
only entries after it count as arrivals. Each answer says from when its history runs.

:class:`AnswerHistory` keeps every answer a sponsor organisation got (its protected body, as
sent), for ``GET /v1/feasibility/history`` and the exports.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..disclosure.tables import (
    cohort_baselines_table,
    cohort_changes_table,
    open_engine,
    sponsor_answers_table,
)

if TYPE_CHECKING:
    from ..live import CohortView

log = logging.getLogger(__name__)


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return time.time()


@dataclass(frozen=True)
class CohortChange:
    """One membership change of one patient (a pseudonym) in a saved question's cohort."""

    patient: str
    change: int
    member: bool
    at: float


def first_entries(changes: Iterable[CohortChange]) -> dict[str, float]:
    """When each patient first became a member (stream time, epoch seconds)."""
    first: dict[str, float] = {}
    for c in sorted(changes, key=lambda c: (c.at, c.change)):
        if c.member and c.patient not in first:
            first[c.patient] = c.at
    return first


def members_at(changes: Iterable[CohortChange], at: float) -> set[str]:
    """The members at stream time ``at``: each patient's latest change at or before it."""
    latest: dict[str, CohortChange] = {}
    for c in changes:
        if c.at <= at:
            seen = latest.get(c.patient)
            if seen is None or (c.change, c.at) > (seen.change, seen.at):
                latest[c.patient] = c
    return {p for p, c in latest.items() if c.member}


def _insert_ignoring(engine: sa.Engine, table: sa.Table) -> Any:
    """An INSERT that skips rows whose key is there already (another process, a replay)."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise RuntimeError(f"the workspace history needs SQLite or PostgreSQL, not {dialect}")


class CohortHistory:
    """Every membership change of every saved question's cohort as read from the cohort topic
    (see the module docstring), and each question's baseline."""

    def __init__(self, target: str | sa.Engine = "sqlite://") -> None:
        self.engine = open_engine(target)
        self.lock = threading.Lock()
        #: The last error writing the history (None: none since it last succeeded); answers
        #: built on the history say so (``partial``) rather than count from a gap.
        self.error: str | None = None
        with self.engine.connect() as conn:
            t = cohort_baselines_table
            self._baselines = {
                row.trial: float(row.at) for row in conn.execute(sa.select(t.c.trial, t.c.at))
            }

    def follow(self, view: CohortView) -> CohortHistory:
        """Keep the history of ``view``'s cohorts from now on (its mirror thread calls us)."""

        def on_batch(records: list[dict[str, Any]], marked: set[str]) -> None:
            try:
                self.absorb(records)
                for trial in sorted(marked | {str(r["trial"]) for r in records}):
                    if trial not in self._baselines and not view.pending_partitions(trial, 1):
                        stream = view.stream_time()
                        self.set_baseline(trial, stream.timestamp() if stream else None)
                self.error = None
            except Exception as exc:  # never into the mirror: recorded, and answers say so
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("cohort history not written: %s", type(exc).__name__)

        view.on_batch = on_batch
        return self

    def absorb(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Keep these cohort records' membership changes (a change seen before is skipped)."""
        rows = [
            {
                "trial": str(r["trial"]),
                "patient": str(r["patient"]),
                "change": int(r["change"]),
                "member": bool(r.get("member")),
                "at": _epoch(r.get("at_epoch", r.get("at"))),
            }
            for r in records
        ]
        if not rows:
            return
        with self.lock, self.engine.begin() as conn:
            conn.execute(_insert_ignoring(self.engine, cohort_changes_table), rows)

    def set_baseline(self, trial: str, at: float | None) -> float:
        """The trial's baseline: the later of ``at`` and its latest change so far (every member
        until then was there before arrivals could be told apart). Set once."""
        if trial in self._baselines:
            return self._baselines[trial]
        t = cohort_changes_table
        with self.lock, self.engine.begin() as conn:
            latest = conn.execute(sa.select(sa.func.max(t.c.at)).where(t.c.trial == trial))
            last = latest.scalar()
            value = max(x for x in (at, last, 0.0) if x is not None)
            conn.execute(
                _insert_ignoring(self.engine, cohort_baselines_table),
                [{"trial": trial, "at": value}],
            )
            stored = conn.execute(
                sa.select(cohort_baselines_table.c.at).where(
                    cohort_baselines_table.c.trial == trial
                )
            ).scalar_one()
        self._baselines[trial] = float(stored)
        return self._baselines[trial]

    def baseline(self, trial: str) -> float | None:
        return self._baselines.get(trial)

    def changes(self, trial: str) -> list[CohortChange]:
        t = cohort_changes_table
        query = (
            sa.select(t.c.patient, t.c.change, t.c.member, t.c.at)
            .where(t.c.trial == trial)
            .order_by(t.c.at, t.c.change)
        )
        with self.engine.connect() as conn:
            return [
                CohortChange(row.patient, int(row.change), bool(row.member), float(row.at))
                for row in conn.execute(query)
            ]

    def close(self) -> None:
        self.engine.dispose()


@dataclass(frozen=True)
class PastAnswer:
    id: int
    kind: str
    fingerprint: str
    trial: str | None
    title: str | None
    at: float
    question: dict[str, Any]
    body: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        total = self.body.get("total")
        return {
            "id": self.id,
            "kind": self.kind,
            "question": self.fingerprint,
            "trial": self.trial,
            "title": self.title,
            "at": datetime.fromtimestamp(self.at).astimezone().isoformat(),
            "total": total,
            "links": {
                "csv": f"/v1/feasibility/history/{self.id}/export.csv",
                "report": f"/v1/feasibility/history/{self.id}/report.html",
                "pdf": f"/v1/feasibility/history/{self.id}/report.pdf",
            },
        }


class AnswerHistory:
    """Every answer a sponsor organisation got, by organisation (only its own are listed)."""

    def __init__(self, target: str | sa.Engine = "sqlite://", *, keep: int = 500) -> None:
        self.engine = open_engine(target)
        #: Answers kept per organisation and kind of answer (older ones are dropped).
        self.keep = keep

    def record(
        self,
        org: str,
        kind: str,
        fingerprint: str,
        question: Mapping[str, Any],
        body: Mapping[str, Any],
        trial: str | None = None,
    ) -> int:
        t = sponsor_answers_table
        with self.engine.begin() as conn:
            inserted = conn.execute(
                t.insert().returning(t.c.id),
                {
                    "org": org,
                    "kind": kind,
                    "fingerprint": fingerprint,
                    "trial": trial,
                    "title": body.get("title") or question.get("title"),
                    "at": time.time(),
                    "question": json.dumps(question, sort_keys=True, default=str),
                    "body": json.dumps(body, sort_keys=True, default=str),
                },
            )
            new_id = int(inserted.scalar_one())
            old = (
                sa.select(t.c.id)
                .where(t.c.org == org, t.c.kind == kind)
                .order_by(t.c.id.desc())
                .offset(self.keep)
            )
            stale = [row.id for row in conn.execute(old)]
            if stale:
                conn.execute(t.delete().where(t.c.id.in_(stale)))
        return new_id

    def list(self, org: str, limit: int = 100) -> list[PastAnswer]:
        t = sponsor_answers_table
        query = sa.select(t).where(t.c.org == org).order_by(t.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [self._row(row) for row in conn.execute(query)]

    def get(self, org: str, answer_id: int) -> PastAnswer | None:
        t = sponsor_answers_table
        query = sa.select(t).where(t.c.org == org, t.c.id == answer_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else self._row(row)

    @staticmethod
    def _row(row: Any) -> PastAnswer:
        return PastAnswer(
            id=int(row.id),
            kind=row.kind,
            fingerprint=row.fingerprint,
            trial=row.trial,
            title=row.title,
            at=float(row.at),
            question=json.loads(row.question),
            body=json.loads(row.body),
        )

    def close(self) -> None:
        self.engine.dispose()


__all__ = [
    "AnswerHistory",
    "CohortChange",
    "CohortHistory",
    "PastAnswer",
    "first_entries",
    "members_at",
]
