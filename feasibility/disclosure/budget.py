"""The query budget (rule 7): per sponsor organisation, answered questions per rolling window,
and a lockout after too many answers in which overlap control fired, until an administrator
lifts it. See ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from core.db import ProcessLock

from .settings import DisclosureSettings
from .tables import budget_locks_table, budget_queries_table, open_engine, overlap_events_table


class BudgetExceeded(Exception):
    """The organisation may not ask another question now; retry after ``retry_after_seconds``."""

    def __init__(self, retry_after_seconds: int, message: str | None = None) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__(
            message or f"query budget exceeded; retry in {retry_after_seconds} seconds"
        )


class LockedOut(BudgetExceeded):
    """The organisation is locked out until an administrator unlocks it."""

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__(
            retry_after_seconds,
            "questions from this organisation are suspended pending review by an administrator",
        )


@dataclass(frozen=True)
class BudgetStatus:
    """What a sponsor may know about its own budget (nothing about overlap control)."""

    org: str
    used: int
    limit: int
    remaining: int
    window_seconds: int
    locked: bool
    retry_after_seconds: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "used": self.used,
            "limit": self.limit,
            "remaining": self.remaining,
            "window_seconds": self.window_seconds,
            "locked": self.locked,
            "retry_after_seconds": self.retry_after_seconds,
        }


class QueryBudget:
    """Rule 7: per organisation, at most ``max_queries`` answered questions per rolling
    ``window``; more than ``lockout_after`` answers in which overlap control fired (recorded by
    :func:`protect` through a :class:`PublicationRegistry` on the same database) lock the
    organisation out until :meth:`unlock`. ``clock`` returns seconds since the epoch."""

    def __init__(
        self,
        target: str | sa.Engine = "sqlite://",
        *,
        max_queries: int = 200,
        window: timedelta | float = timedelta(hours=24),
        lockout_after: int = 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        seconds = window.total_seconds() if isinstance(window, timedelta) else float(window)
        if max_queries < 1:
            raise ValueError(f"max_queries must be at least 1, not {max_queries}")
        if lockout_after < 0:
            raise ValueError(f"lockout_after must be at least 0, not {lockout_after}")
        if seconds <= 0:
            raise ValueError("window must be positive")
        self.engine = open_engine(target)
        self.max_queries = max_queries
        self.window = seconds
        self.lockout_after = lockout_after
        self.clock = clock
        # a charge's check and insert are one step across every process on the database
        self._lock = ProcessLock(self.engine, "disclosure-budget")

    @classmethod
    def from_env(
        cls,
        target: str | sa.Engine = "sqlite://",
        *,
        window: timedelta | float = timedelta(hours=24),
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> QueryBudget:
        """The budget from ``CONCIERGE_DC_QUERY_BUDGET`` and ``CONCIERGE_DC_LOCKOUT_AFTER``
        (:class:`~feasibility.disclosure.settings.DisclosureSettings`)."""
        settings = DisclosureSettings.load(environ)
        return cls(
            target,
            max_queries=settings.query_budget,
            window=window,
            lockout_after=settings.lockout_after,
            clock=clock,
        )

    # -- internals
    def _retry_after(self, conn: sa.Connection, org: str, now: float) -> int:
        q = budget_queries_table
        oldest = conn.execute(
            sa.select(sa.func.min(q.c.at)).where(q.c.org == org, q.c.at > now - self.window)
        ).scalar()
        if oldest is None:
            return 1
        return max(1, math.ceil(oldest + self.window - now))

    def _used(self, conn: sa.Connection, org: str, now: float) -> int:
        q = budget_queries_table
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(q.c.org == org, q.c.at > now - self.window)
            ).scalar_one()
        )

    def _fires(self, conn: sa.Connection, org: str, now: float) -> int:
        lock = conn.execute(
            sa.select(budget_locks_table.c.unlocked_at).where(budget_locks_table.c.org == org)
        ).first()
        since = now - self.window
        if lock is not None and lock.unlocked_at is not None:
            since = max(since, lock.unlocked_at)
        e = overlap_events_table
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(e.c.org == org, e.c.at > since)
            ).scalar_one()
        )

    def _is_locked(self, conn: sa.Connection, org: str, now: float) -> bool:
        """Locked already, or more overlap fires than allowed (then lock it, persistently)."""
        row = conn.execute(
            sa.select(budget_locks_table.c.locked).where(budget_locks_table.c.org == org)
        ).first()
        if row is not None and row.locked:
            return True
        if self._fires(conn, org, now) <= self.lockout_after:
            return False
        values = {"locked": True, "locked_at": now}
        if row is None:
            conn.execute(budget_locks_table.insert().values(org=org, unlocked_at=None, **values))
        else:
            conn.execute(
                budget_locks_table.update().where(budget_locks_table.c.org == org).values(**values)
            )
        return True

    def _status(self, conn: sa.Connection, org: str, now: float, locked: bool) -> BudgetStatus:
        used = self._used(conn, org, now)
        retry: int | None = None
        if locked:
            retry = int(self.window)
        elif used >= self.max_queries:
            retry = self._retry_after(conn, org, now)
        return BudgetStatus(
            org=org,
            used=used,
            limit=self.max_queries,
            remaining=max(0, self.max_queries - used),
            window_seconds=int(self.window),
            locked=locked,
            retry_after_seconds=retry,
        )

    # -- API
    def charge(self, org: str) -> BudgetStatus:
        """Count one answered question for ``org``, or raise :class:`LockedOut` /
        :class:`BudgetExceeded` (then nothing is counted)."""
        return self.reserve(org)[1]

    def reserve(self, org: str) -> tuple[int, BudgetStatus]:
        """Count one answer for ``org`` before it is made, or raise :class:`LockedOut` /
        :class:`BudgetExceeded` (then nothing is counted): the charge's id (for
        :meth:`refund`, when the answer turns out to be no news or is not given) and the
        status with it counted. The lockout is checked first, so a locked-out organisation is
        refused whatever its budget."""
        now = self.clock()
        q = budget_queries_table
        with self._lock:
            with self.engine.begin() as conn:
                locked = self._is_locked(conn, org, now)  # a new lock is committed here
            if locked:
                raise LockedOut(int(self.window))
            with self.engine.begin() as conn:
                conn.execute(q.delete().where(q.c.org == org, q.c.at <= now - self.window))
                if self._used(conn, org, now) >= self.max_queries:
                    raise BudgetExceeded(self._retry_after(conn, org, now))
                charge = conn.execute(q.insert().values(org=org, at=now).returning(q.c.id))
                charge_id = int(charge.scalar_one())
                return charge_id, self._status(conn, org, now, False)

    def refund(self, charge_id: int) -> None:
        """Take back a charge made by :meth:`reserve`: the answer was not given (a view was not
        current, the request was refused) or was a republication of the organisation's last
        answer to the same question (nothing new; see ``disclosure-control.md``)."""
        q = budget_queries_table
        with self._lock, self.engine.begin() as conn:
            conn.execute(q.delete().where(q.c.id == charge_id))

    def status(self, org: str) -> BudgetStatus:
        now = self.clock()
        with self._lock, self.engine.begin() as conn:
            return self._status(conn, org, now, self._is_locked(conn, org, now))

    def unlock(self, org: str) -> None:
        """Administrator action: lift a lockout; overlap fires before now no longer count."""
        now = self.clock()
        t = budget_locks_table
        with self._lock, self.engine.begin() as conn:
            exists = conn.execute(sa.select(t.c.org).where(t.c.org == org)).first()
            values = {"locked": False, "unlocked_at": now}
            if exists is None:
                conn.execute(t.insert().values(org=org, locked_at=None, **values))
            else:
                conn.execute(t.update().where(t.c.org == org).values(**values))

    def overlap_fires(self, org: str) -> int:
        """Audit/admin only: answers in the window (since the last unlock) in which overlap
        control fired for ``org``. Never show this to the sponsor."""
        now = self.clock()
        with self.engine.connect() as conn:
            return self._fires(conn, org, now)

    def close(self) -> None:
        self.engine.dispose()


__all__ = ["BudgetExceeded", "BudgetStatus", "LockedOut", "QueryBudget"]
