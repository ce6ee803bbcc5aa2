"""Disclosure control: what a trial sponsor may see of a feasibility answer.

The feasibility engine computes exact sets of patients (``pyroaring.BitMap`` of dense patient
ids): the cohort, the cohort per site and per region, and an attrition funnel. :func:`protect`
turns those sets into aggregates a sponsor may see. Every published number is the size of a set,
and the rules below decide, per set, whether its size is shown, rounded, or withheld. The threat
model and the reasoning behind each rule are in ``docs/explanation/disclosure-control.md``.

Rules (each is numbered as in the threat-model document):

1. **Small cells** (primary suppression). A count ``n`` with ``0 < n < threshold``, or ``n == 0``
   when ``suppress_zero`` is on, is withheld before anything else happens.
2. **Rounding.** Every shown count is rounded to the nearest multiple of ``rounding``, ties half up
   (``round_half_up(n / r) * r``), and never shown below the threshold rounded up to a multiple of
   ``rounding`` (so a rounded count can never look like a small cell).
3. **Complementary (secondary) suppression** over linked cells. The relations are: total = the sum
   of the regions = the sum of the sites (plus, never published, the cohort members without a
   site); each region = the sum of its sites; for each funnel step entered = passed + failed +
   unknown, entered = remaining + dropped, and remaining = passed (+ unknown, when a step keeps
   unknowns); remaining of a step = entered of the next; the cohort = the last remaining when
   they are the same set. In every relation there must never be exactly one unknown term, and
   when the parent is known, the unknown children must not add up to a small group (fewer than
   ``threshold``, or none under ``suppress_zero``). The same holds for the deeper "frontiers"
   obtained by expanding withheld cells into their own parts (a withheld region into its sites,
   and so on). A violated relation is repaired by withholding the smallest shown non-zero child
   that was not published before, preferring cells whose withholding lets a reader pin down
   nothing new and parts over subtotals (ties by count, then name); failing that the parent;
   failing that every fresh child. The repair runs to a fixed point over all relations; then an
   exact linear-algebra audit asks whether any withheld cell is determined by the shown ones,
   and if so withholds a fresh cell its derivation uses, and repeats.
   A reader is assumed to know zero ``unknown`` counts (criteria on codes are never unknown), so
   those are never relied on to protect anything; they are still shown as withheld under
   ``suppress_zero``.
4. **Overlap control** against differencing, with the persistent :class:`PublicationRegistry`. A
   set identical to a published set is published exactly as before. A set within fewer than
   ``threshold`` patients (symmetric difference) of a freshly published set takes that publication
   (hidden if any such neighbour was hidden, otherwise the nearest, then earliest, shown one)
   instead of a fresh value. So two *fresh* values are never published for sets that differ by
   fewer than ``threshold`` patients, across questions and across sponsors. Copied values are not
   this set's own count, so the complementary rules treat them as unknown; a cell already
   published is never chosen for complementary suppression (withholding it again would not
   un-publish it). The output never says whether a value was copied; only the audit counts it.
   Within one answer, two shown sets closer than ``threshold`` cannot both stay exact: the later
   (in cell order) is withheld. The registry also records each answer's relations (between
   publications), and an answer that publishes two or more earlier sets again imports the
   earlier relations among them, so the audit of rule 3 covers both answers together.
   **Repeats are not attacks.** The registry also keeps, per organisation and question
   fingerprint, the last answer published (cell by cell, with the last few displays each cell
   had before). A copied cell whose display that organisation already saw for that cell of that
   question tells it nothing new and is no overlap hit (data drifting under a question re-asked
   or polled live, or its ad hoc and live answers alternating); an answer identical to
   the last one for that organisation and question, made only of earlier publications and copies
   of them, is republished without recording anything (the registry does not grow).
5. **The funnel** goes through the same rules as the geographical breakdown.
6. **Determinism.** No noise: the same sets and the same registry state give the same output, and
   a repeated question gets the identical answer, so averaging repeats gains nothing.
7. **Query budget** (:class:`QueryBudget`): per sponsor organisation at most ``max_queries``
   answered questions per rolling window; an organisation for which overlap control fired in more
   than ``lockout_after`` answers within the window is locked out until an administrator unlocks
   it.

All withheld cells are shown alike (``"<10"`` for threshold 10), whatever the reason they are
withheld: distinguishing small cells from complementary ones would tell a reader that the
complementary cell is at least the threshold, which bounds the small cell it protects.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from itertools import combinations
from typing import Any, Literal

import sqlalchemy as sa
from pyroaring import AbstractBitMap, BitMap, FrozenBitMap
from sqlalchemy.pool import StaticPool

ENV_THRESHOLD = "CONCIERGE_DC_THRESHOLD"
ENV_ROUNDING = "CONCIERGE_DC_ROUNDING"
ENV_SUPPRESS_ZERO = "CONCIERGE_DC_SUPPRESS_ZERO"
ENV_OVERLAP_CONTROL = "CONCIERGE_DC_OVERLAP_CONTROL"
ENV_QUERY_BUDGET = "CONCIERGE_DC_QUERY_BUDGET"
ENV_LOCKOUT_AFTER = "CONCIERGE_DC_LOCKOUT_AFTER"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
FUNNEL_FIELDS = ("entered", "passed", "failed", "unknown", "remaining")


# --------------------------------------------------------------------------------------- policy


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None


def _env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be a boolean (true/false, 1/0, yes/no, on/off), not {raw!r}")


@dataclass(frozen=True)
class DisclosurePolicy:
    """The disclosure-control parameters. ``threshold`` and ``rounding`` are at least 1."""

    threshold: int = 10
    rounding: int = 5
    suppress_zero: bool = True
    overlap_control: bool = True

    def __post_init__(self) -> None:
        for name in ("threshold", "rounding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        for name in ("suppress_zero", "overlap_control"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DisclosurePolicy:
        """The policy from ``CONCIERGE_DC_*`` variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            threshold=_env_int(env, ENV_THRESHOLD, default.threshold),
            rounding=_env_int(env, ENV_ROUNDING, default.rounding),
            suppress_zero=_env_bool(env, ENV_SUPPRESS_ZERO, default.suppress_zero),
            overlap_control=_env_bool(env, ENV_OVERLAP_CONTROL, default.overlap_control),
        )

    @property
    def floor(self) -> int:
        """The smallest value a shown non-zero count can have: the threshold rounded up to a
        multiple of ``rounding``."""
        return -(-self.threshold // self.rounding) * self.rounding

    @property
    def suppressed_display(self) -> str:
        return f"<{self.threshold}"

    def is_small(self, n: int) -> bool:
        """Rule 1: would a count of ``n`` be withheld as a small cell?"""
        return n < self.threshold and (n > 0 or self.suppress_zero)

    def rounded(self, n: int) -> int:
        """Rule 2: the shown value of a count ``n`` that is not a small cell."""
        if n == 0:
            return 0
        r = self.rounding
        return max((2 * n + r) // (2 * r) * r, self.floor)

    def rules(self) -> list[str]:
        """Human-readable statements of the rules in force (not of which ones fired)."""
        t = self.threshold
        small = f"counts under {t} suppressed"
        small += " (zero counts too)" if self.suppress_zero else " (zero counts shown)"
        rules = [small]
        if self.rounding > 1:
            rounding = f"rounded to the nearest {self.rounding}"
            if self.floor != t:
                rounding += f" (a shown count is never below {self.floor})"
            rules.append(rounding)
        rules += [
            "complementary suppression across site, region and total",
            "funnel cells protected alike",
            f"every withheld cell is shown as {self.suppressed_display}, whether it is small or "
            "withheld to protect another cell",
        ]
        if self.overlap_control:
            rules.append(
                f"overlap control: answers to questions whose cohorts differ by fewer than {t} "
                "patients are not both exact"
            )
        rules.append("no random noise: the same question gets the same answer")
        return rules

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "rounding": self.rounding,
            "suppress_zero": self.suppress_zero,
            "overlap_control": self.overlap_control,
        }


# ------------------------------------------------------------------------------ inputs, outputs


@dataclass(frozen=True)
class FunnelStepSets:
    """One step of the attrition funnel, as exact sets.

    ``entered`` is the previous step's ``remaining`` (everyone for the ``population`` step);
    ``passed``, ``failed`` and ``unknown`` partition ``entered`` (for an exclusion criterion
    ``passed`` means *not excluded*); ``remaining`` goes on to the next step.
    """

    label: str
    kind: Literal["population", "inclusion", "exclusion"]
    entered: BitMap
    passed: BitMap
    failed: BitMap
    unknown: BitMap
    remaining: BitMap


@dataclass(frozen=True)
class AnswerSets:
    """The exact answer: the cohort, per site and region (every site of the population, empty
    ones included), and the funnel."""

    cohort: BitMap
    by_site: Mapping[str, BitMap]
    site_region: Mapping[str, str]
    by_region: Mapping[str, BitMap]
    funnel: Sequence[FunnelStepSets]


@dataclass(frozen=True)
class Cell:
    """One published count: ``value`` is None when the cell is withheld."""

    value: int | None
    display: str
    suppressed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "display": self.display, "suppressed": self.suppressed}


@dataclass(frozen=True)
class ProtectedAnswer:
    """What the sponsor sees."""

    total: Cell
    by_site: dict[str, Cell]
    by_region: dict[str, Cell]
    funnel: list[dict[str, Any]]
    rules: list[str]
    policy: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(),
            "by_site": {k: c.to_dict() for k, c in self.by_site.items()},
            "by_region": {k: c.to_dict() for k, c in self.by_region.items()},
            "funnel": [
                {k: v.to_dict() if isinstance(v, Cell) else v for k, v in step.items()}
                for step in self.funnel
            ],
            "rules": list(self.rules),
            "policy": dict(self.policy),
        }


@dataclass(frozen=True)
class ProtectionAudit:
    """Bookkeeping for the audit log only, never for the sponsor. Counts are of published cells.

    ``overlap_hits`` counts cells whose publication was taken from a *different* earlier set
    (overlap control fired) and whose display is news to the organisation for that question (a
    copy showing what it already saw for the same cell of the same question is no hit);
    ``repeated`` counts cells identical to an earlier publication; ``republished`` says the
    answer was the organisation's last answer to the question again, recorded nothing;
    ``unprotectable`` counts relations or cells that could not be protected further because every
    remaining candidate had been published before (the information was already out)."""

    cells: int = 0
    primary_suppressed: int = 0
    secondary_suppressed: int = 0
    overlap_hits: int = 0
    repeated: int = 0
    unprotectable: int = 0
    republished: bool = False

    @property
    def overlap_fired(self) -> bool:
        return self.overlap_hits > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cells": self.cells,
            "primary_suppressed": self.primary_suppressed,
            "secondary_suppressed": self.secondary_suppressed,
            "overlap_hits": self.overlap_hits,
            "repeated": self.repeated,
            "unprotectable": self.unprotectable,
            "republished": self.republished,
        }


# ----------------------------------------------------------------------------------- persistence

metadata = sa.MetaData()

publications_table = sa.Table(
    "dc_publications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("cardinality", sa.Integer, nullable=False, index=True),
    sa.Column("bitmap", sa.LargeBinary, nullable=False),
    sa.Column("value", sa.Integer, nullable=True),
    sa.Column("display", sa.Text, nullable=False),
    sa.Column("hidden", sa.Boolean, nullable=False),
    # the publication this one copies (overlap control), null for a fresh publication
    sa.Column("copied_from", sa.Integer, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

relations_table = sa.Table(
    "dc_relations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # publication ids: |parent| = sum of |children| (children as a JSON list, with repeats)
    sa.Column("parent", sa.Integer, nullable=False),
    sa.Column("children", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

overlap_events_table = sa.Table(
    "dc_overlap_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("hits", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_dc_overlap_events_org_at", "org", "at"),
)

# the last answer each organisation got to each question (its cells' displays and the policy,
# and per cell the last few displays it saw before): one row per (org, fingerprint), replaced
# when the answer changes
answers_table = sa.Table(
    "dc_answers",
    metadata,
    sa.Column("org", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, primary_key=True),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

#: Displays remembered per cell of a question for an organisation (an ad hoc answer and the
#: saved question's live answer to the same criteria alternate, each drifting on its own).
_SEEN_PER_CELL = 8

budget_queries_table = sa.Table(
    "dc_budget_queries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_dc_budget_queries_org_at", "org", "at"),
)

budget_locks_table = sa.Table(
    "dc_budget_locks",
    metadata,
    sa.Column("org", sa.Text, primary_key=True),
    sa.Column("locked", sa.Boolean, nullable=False),
    sa.Column("locked_at", sa.Float, nullable=True),
    sa.Column("unlocked_at", sa.Float, nullable=True),
)


def _engine(target: str | sa.Engine) -> sa.Engine:
    if isinstance(target, sa.Engine):
        engine = target
    else:
        url = sa.make_url(target)
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
        engine = sa.create_engine(url, **kwargs)
    metadata.create_all(engine)
    return engine


@dataclass(frozen=True)
class _Entry:
    id: int
    bits: FrozenBitMap
    value: int | None
    display: str
    hidden: bool
    fresh: bool


@dataclass(frozen=True)
class _Match:
    exact: bool
    entry: _Entry
    distance: int


class PublicationRegistry:
    """Every set ever published (value or withheld), global across sponsors so that colluding
    sponsors cannot difference each other's answers, with the org that asked. Publications are one
    SQL table (``dc_publications``); the relations between an answer's publications are a second
    (``dc_relations``); answers in which overlap control fired are a third
    (``dc_overlap_events``, read by :class:`QueryBudget`). An in-memory index by cardinality is
    loaded at start and topped up from the tables before each answer, so several processes
    sharing a database see each other's publications (lookups and recording are serialised per
    process; see the limitations in the threat-model document).

    ``PublicationRegistry("sqlite://")`` is an in-memory registry for tests. ``target`` may also
    be an existing SQLAlchemy engine (e.g. to share one in-memory database with a
    :class:`QueryBudget`). ``clock`` returns seconds since the epoch.
    """

    def __init__(
        self, target: str | sa.Engine = "sqlite://", *, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = _engine(target)
        self.clock = clock
        self.lock = threading.RLock()
        self._exact: dict[FrozenBitMap, _Entry] = {}
        self._fresh: dict[int, list[_Entry]] = {}
        self._by_id: dict[int, _Entry] = {}
        self._relations: dict[tuple[int, tuple[int, ...]], None] = {}
        self._relations_of: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        self._count = 0
        self._last_id = 0
        self._last_relation = 0
        self.refresh()

    def __len__(self) -> int:
        return self._count

    def refresh(self) -> None:
        """Load publications recorded since the last load (by this or another process)."""
        t = publications_table
        query = (
            sa.select(t.c.id, t.c.bitmap, t.c.value, t.c.display, t.c.hidden, t.c.copied_from)
            .where(t.c.id > self._last_id)
            .order_by(t.c.id)
        )
        with self.lock, self.engine.connect() as conn:
            for row in conn.execute(query):
                bits = FrozenBitMap.deserialize(row.bitmap)
                self._index(
                    _Entry(
                        row.id,
                        bits,
                        row.value,
                        row.display,
                        bool(row.hidden),
                        row.copied_from is None,
                    )
                )

        r = relations_table
        query = (
            sa.select(r.c.id, r.c.parent, r.c.children)
            .where(r.c.id > self._last_relation)
            .order_by(r.c.id)
        )
        with self.lock, self.engine.connect() as conn:
            for relation in conn.execute(query):
                self._last_relation = max(self._last_relation, relation.id)
                self._index_relation((relation.parent, tuple(json.loads(relation.children))))

    def _index_relation(self, relation: tuple[int, tuple[int, ...]]) -> None:
        if relation in self._relations:
            return
        self._relations[relation] = None
        for entry_id in {relation[0], *relation[1]}:
            self._relations_of.setdefault(entry_id, []).append(relation)

    def entry(self, entry_id: int) -> _Entry:
        return self._by_id[entry_id]

    def relations_of(self, entry_ids: Iterable[int]) -> list[tuple[int, tuple[int, ...]]]:
        """Relations recorded by earlier answers that involve any of these publications."""
        found: dict[tuple[int, tuple[int, ...]], None] = {}
        for entry_id in entry_ids:
            for relation in self._relations_of.get(entry_id, ()):
                found[relation] = None
        return list(found)

    def _index(self, entry: _Entry) -> None:
        self._by_id[entry.id] = entry
        self._last_id = max(self._last_id, entry.id)
        self._count += 1
        self._exact.setdefault(entry.bits, entry)  # the earliest publication of a set wins
        if entry.fresh:
            self._fresh.setdefault(len(entry.bits), []).append(entry)

    def match(self, bits: AbstractBitMap, threshold: int) -> _Match | None:
        """The publication a set must reuse, if any (rule 4): an identical set; else, among fresh
        publications fewer than ``threshold`` patients away, the nearest withheld one if any is
        withheld, otherwise the nearest shown one (ties: the earliest)."""
        frozen = bits if isinstance(bits, FrozenBitMap) else FrozenBitMap(bits)
        same = self._exact.get(frozen)
        if same is not None:
            return _Match(True, same, 0)
        n = len(frozen)
        best: dict[bool, tuple[int, int, _Entry]] = {}
        for cardinality in range(max(0, n - threshold + 1), n + threshold):
            for entry in self._fresh.get(cardinality, ()):
                distance = frozen.symmetric_difference_cardinality(entry.bits)
                if 0 < distance < threshold:
                    key = (distance, entry.id, entry)
                    if entry.hidden not in best or key[:2] < best[entry.hidden][:2]:
                        best[entry.hidden] = key
        chosen = best.get(True) or best.get(False)
        return None if chosen is None else _Match(False, chosen[2], chosen[0])

    def last_answer(self, org: str, fingerprint: str) -> dict[str, Any] | None:
        """The last answer published to ``org`` for the question ``fingerprint`` (as given to
        :meth:`record`), or None."""
        t = answers_table
        query = sa.select(t.c.answer).where(t.c.org == org, t.c.fingerprint == fingerprint)
        with self.lock, self.engine.connect() as conn:
            found = conn.execute(query).scalar()
        return None if found is None else dict(json.loads(found))

    def record(
        self,
        rows: Sequence[_NewPublication],
        org: str,
        fingerprint: str,
        overlap_hits: int,
        relations: Sequence[tuple[_Ref, Sequence[_Ref]]] = (),
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one answer's new publications, the relations between its publications (a
        reference is an existing publication id, or ``("new", i)`` for ``rows[i]``), an overlap
        event, and (when given) ``answer`` as the last one ``org`` got for ``fingerprint``, in
        one transaction."""
        t = publications_table
        now = self.clock()
        created = datetime.fromtimestamp(now, UTC)
        entries: list[_Entry] = []
        params = [
            {
                "org": org,
                "fingerprint": fingerprint,
                "cardinality": len(row.bits),
                "bitmap": row.bits.serialize(),
                "value": row.value,
                "display": row.display,
                "hidden": row.hidden,
                "copied_from": row.copied_from,
                "created_at": created,
            }
            for row in rows
        ]
        with self.lock, self.engine.begin() as conn:
            if params:
                inserted = conn.execute(
                    t.insert().returning(t.c.id, sort_by_parameter_order=True), params
                )
                for row, new_id in zip(rows, inserted.scalars(), strict=True):
                    entries.append(
                        _Entry(
                            int(new_id),
                            row.bits,
                            row.value,
                            row.display,
                            row.hidden,
                            row.copied_from is None,
                        )
                    )
            new_ids = [e.id for e in entries]

            def resolve(ref: _Ref) -> int:
                return new_ids[ref[1]] if isinstance(ref, tuple) else ref

            fresh_relations = []
            for parent, children in relations:
                relation = (resolve(parent), tuple(sorted(resolve(c) for c in children)))
                if relation not in self._relations and relation not in fresh_relations:
                    fresh_relations.append(relation)
            if fresh_relations:
                conn.execute(
                    relations_table.insert(),
                    [
                        {"parent": p, "children": json.dumps(list(c)), "created_at": created}
                        for p, c in fresh_relations
                    ],
                )
            if overlap_hits:
                conn.execute(
                    overlap_events_table.insert().values(
                        org=org, fingerprint=fingerprint, hits=overlap_hits, at=now
                    )
                )
            if answer is not None:
                a = answers_table
                conn.execute(a.delete().where(a.c.org == org, a.c.fingerprint == fingerprint))
                conn.execute(
                    a.insert().values(
                        org=org,
                        fingerprint=fingerprint,
                        answer=json.dumps(answer, sort_keys=True),
                        at=now,
                    )
                )
        for entry in entries:
            self._index(entry)
        for relation in fresh_relations:
            self._index_relation(relation)

    def close(self) -> None:
        self.engine.dispose()


_Ref = int | tuple[str, int]  # an existing publication id, or ("new", row index)


@dataclass(frozen=True)
class _NewPublication:
    bits: FrozenBitMap
    value: int | None
    display: str
    hidden: bool
    copied_from: int | None


# ---------------------------------------------------------------------------------------- budget


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
        self.engine = _engine(target)
        self.max_queries = max_queries
        self.window = seconds
        self.lockout_after = lockout_after
        self.clock = clock
        self._lock = threading.Lock()

    @classmethod
    def from_env(
        cls,
        target: str | sa.Engine = "sqlite://",
        *,
        window: timedelta | float = timedelta(hours=24),
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> QueryBudget:
        env = os.environ if environ is None else environ
        return cls(
            target,
            max_queries=_env_int(env, ENV_QUERY_BUDGET, 200),
            window=window,
            lockout_after=_env_int(env, ENV_LOCKOUT_AFTER, 20),
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
                conn.execute(q.insert().values(org=org, at=now))
                return self._status(conn, org, now, False)

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


# ------------------------------------------------------------------------------------- planning

#: How a unit (a distinct set) got its publication.
_FRESH = "fresh"  # shown: its own rounded count
_PRIMARY = "primary"  # withheld: a small cell (rule 1)
_SECONDARY = "secondary"  # withheld: complementary suppression (rule 3)
_REPEAT = "repeat"  # identical to a published set: published as before
_NEAR = "near"  # near a published set: published as that one (rule 4)
_STRUCTURAL = "structural"  # empty by definition (population step), shown as 0
_VIRTUAL = "virtual"  # an implied set (e.g. dropped at a step); never published


@dataclass
class _Unit:
    uid: int
    bits: FrozenBitMap
    count: int
    name: str
    origin: str
    hidden: bool = False
    exact: bool = False  # the shown value is this set's own (rounded) count
    value: int | None = None
    display: str = ""
    entry: int | None = None  # the registry entry reused (repeat, near)


@dataclass(frozen=True)
class _Relation:
    parent: int
    children: tuple[int, ...]


@dataclass(frozen=True)
class _Front:
    """An unknown remainder: its size, the known cells subtracted on the way, the unknown cells
    it consists of."""

    total: int
    known: tuple[int, ...]
    leaves: tuple[int, ...]

    def key(self, plan: _Plan) -> tuple[int, bool]:
        # smaller first; for equal sizes the one a reader could exploit (not all waived) first
        return (self.total, all(plan.waived(c) for c in self.leaves))


def _partition_error(what: str) -> ValueError:
    return ValueError(f"inconsistent answer sets: {what}")


class _Plan:
    """Cells (every published count, plus implied virtual ones), the units they belong to (one
    per distinct set), the relations between cells, and the fixed-point protection."""

    def __init__(self, answer: AnswerSets, policy: DisclosurePolicy) -> None:
        self.policy = policy
        self.names: list[str] = []
        self.cell_unit: list[int] = []
        self.units: list[_Unit] = []
        self._by_set: dict[FrozenBitMap, int] = {}
        self.relations: list[_Relation] = []
        self.unprotectable: set[tuple[str, int]] = set()
        self.sites = sorted(answer.by_site)
        self.regions = sorted(answer.by_region)
        self.output: dict[str, int] = {}
        self.missing_data: set[int] = set()
        self.external: set[int] = set()  # cells of earlier answers (imported relations)
        self.own_relations = 0
        self._build(answer)
        self.own_relations = len(self.relations)
        self._index_relations()

    def _index_relations(self) -> None:
        self.parent_rels: list[list[int]] = [[] for _ in self.names]
        self.member_rels: list[list[int]] = [[] for _ in self.names]
        self.unit_cells: list[list[int]] = [[] for _ in self.units]
        for c, uid in enumerate(self.cell_unit):
            self.unit_cells[uid].append(c)
        for ri, rel in enumerate(self.relations):
            self.parent_rels[rel.parent].append(ri)
            for c in {rel.parent, *rel.children}:
                self.member_rels[c].append(ri)

    # -- building
    def _cell(
        self, name: str, bits: AbstractBitMap, kind: str = "real", published: bool = True
    ) -> int:
        """Add a cell; ``kind`` is ``real`` (published), ``structural`` (published, empty by
        definition) or ``virtual`` (implied, never published). Equal sets share a unit."""
        frozen = bits if isinstance(bits, FrozenBitMap) else FrozenBitMap(bits)
        index = len(self.names)
        self.names.append(name)
        if kind == "structural":
            uid = len(self.units)
            self.units.append(
                _Unit(uid, frozen, 0, name, _STRUCTURAL, exact=True, value=0, display="0")
            )
        elif kind == "virtual":
            # its own variable: the reader knows only how it relates to published cells
            uid = len(self.units)
            self.units.append(_Unit(uid, frozen, len(frozen), name, _VIRTUAL))
        else:
            found = self._by_set.get(frozen)
            if found is None:
                found = len(self.units)
                self.units.append(_Unit(found, frozen, len(frozen), name, ""))
                self._by_set[frozen] = found
            uid = found
        self.cell_unit.append(uid)
        if published and kind != "virtual":
            self.output[name] = index
        return index

    def _relate(self, parent: int, children: Iterable[int]) -> None:
        rel = _Relation(parent, tuple(children))
        if rel.children and rel not in self.relations:
            self.relations.append(rel)

    def _build(self, answer: AnswerSets) -> None:
        cohort = FrozenBitMap(answer.cohort)
        # geography: sites partition the cohort (patients without a site form a virtual cell)
        for site in self.sites:
            if site not in answer.site_region:
                raise _partition_error(f"site {site!r} has no region")
        site_sets = {s: FrozenBitMap(answer.by_site[s]) for s in self.sites}
        covered = FrozenBitMap().union(*site_sets.values()) if site_sets else FrozenBitMap()
        if sum(len(b) for b in site_sets.values()) != len(covered):
            raise _partition_error("sites overlap")
        if not covered.issubset(cohort):
            raise _partition_error("a site holds patients outside the cohort")
        members: dict[str, list[str]] = {}
        for site in self.sites:
            members.setdefault(answer.site_region[site], []).append(site)
        if set(members) != set(self.regions):
            raise _partition_error("regions do not match the sites' regions")
        for region, region_sites in members.items():
            expected = FrozenBitMap().union(*(site_sets[s] for s in region_sites))
            if FrozenBitMap(answer.by_region[region]) != expected:
                raise _partition_error(f"region {region!r} is not the union of its sites")

        total = self._cell("total", cohort)
        regions = {r: self._cell(f"region:{r}", answer.by_region[r]) for r in self.regions}
        sites = {s: self._cell(f"site:{s}", site_sets[s]) for s in self.sites}

        # funnel
        steps: list[dict[str, int]] = []
        step_sets: list[dict[str, FrozenBitMap]] = []
        previous: FrozenBitMap | None = None
        for i, step in enumerate(answer.funnel):
            sets = {f: FrozenBitMap(getattr(step, f)) for f in FUNNEL_FIELDS}
            entered = sets["entered"]
            parts = [sets["passed"], sets["failed"], sets["unknown"]]
            if sum(len(p) for p in parts) != len(entered) or parts[0].union(*parts[1:]) != entered:
                raise _partition_error(
                    f"step {i}: passed, failed and unknown must partition entered"
                )
            if not sets["remaining"].issubset(entered):
                raise _partition_error(f"step {i}: remaining is not within entered")
            if previous is not None and entered != previous:
                raise _partition_error(f"step {i}: entered is not the previous step's remaining")
            previous = sets["remaining"]
            structural = step.kind == "population"
            cells: dict[str, int] = {}
            for f in FUNNEL_FIELDS:
                kind = (
                    "structural"
                    if structural and f in ("failed", "unknown") and not sets[f]
                    else "real"
                )
                cells[f] = self._cell(f"funnel:{i}:{f}", sets[f], kind)
            self.missing_data.add(cells["unknown"])
            steps.append(cells)
            step_sets.append(sets)

        # implied sets, never published: patients without a site, patients dropped at a step
        unsited = cohort - covered
        unsited_cell = self._cell("virtual:unsited", unsited, "virtual") if unsited else None
        extra = [unsited_cell] if unsited_cell is not None else []
        self._relate(total, [*regions.values(), *extra])
        self._relate(total, [*sites.values(), *extra])
        for region, names in sorted(members.items()):
            self._relate(regions[region], [sites[s] for s in names])

        for i, (cells, sets) in enumerate(zip(steps, step_sets, strict=True)):
            dropped = sets["entered"] - sets["remaining"]
            kind = (
                "structural" if answer.funnel[i].kind == "population" and not dropped else "virtual"
            )
            d = self._cell(f"virtual:{i}:dropped", dropped, kind, published=False)
            categories = ("passed", "failed", "unknown")
            self._relate(cells["entered"], [cells[c] for c in categories])
            self._relate(cells["entered"], [cells["remaining"], d])
            # What goes on: passed, or passed and unknown (exclusions that keep missing data).
            # A reader knows which from the question, so every reading that holds is a relation
            # (both when nobody is unknown); other shapes fall back to the smallest union.
            plausible: tuple[tuple[str, ...], ...] = (("passed",), ("passed", "unknown"))
            readings = [
                kept
                for kept in plausible
                if FrozenBitMap().union(*(sets[c] for c in kept)) == sets["remaining"]
            ]
            if not readings:
                fallback = self._union_of(sets["remaining"], sets, categories)
                readings = [fallback] if fallback is not None else []
            for kept in readings:
                self._relate(cells["remaining"], [cells[c] for c in kept])
                self._relate(d, [cells[c] for c in categories if c not in kept])
            if i + 1 < len(steps):
                self._relate(cells["remaining"], [steps[i + 1]["entered"]])
        if steps and step_sets[-1]["remaining"] == cohort:
            self._relate(steps[-1]["remaining"], [total])

    @staticmethod
    def _union_of(
        target: FrozenBitMap, sets: Mapping[str, FrozenBitMap], names: Sequence[str]
    ) -> tuple[str, ...] | None:
        for size in range(1, len(names) + 1):
            for combo in combinations(names, size):
                if FrozenBitMap().union(*(sets[c] for c in combo)) == target:
                    return combo
        return None

    # -- state
    def unit(self, c: int) -> _Unit:
        return self.units[self.cell_unit[c]]

    def known(self, c: int) -> bool:
        """Does a reader know this cell's count? Shown exactly; empty by definition; or a zero
        count of patients without data (often structurally zero: criteria on codes are never
        unknown), which is therefore never relied on to protect anything, although shown as
        withheld under ``suppress_zero``."""
        u = self.unit(c)
        if u.origin == _STRUCTURAL or (not u.hidden and u.exact):
            return True
        return u.count == 0 and (c in self.missing_data or c in self.external)

    def count(self, c: int) -> int:
        return self.unit(c).count

    def waived(self, c: int) -> bool:
        """A never-published (virtual) cell that may be derived: its count is not small."""
        u = self.unit(c)
        return u.origin == _VIRTUAL and not self.policy.is_small(u.count)

    def small_group(self, cells: Sequence[int]) -> bool:
        """Would knowing the total of ``cells`` disclose a small group? Fewer than the threshold
        and more than none; or none at all under ``suppress_zero``, unless every cell in it may be
        derived anyway."""
        total = sum(self.count(c) for c in cells)
        if total == 0:
            return self.policy.suppress_zero and any(not self.waived(c) for c in cells)
        return total < self.policy.threshold

    def movable(self, c: int) -> bool:
        """Shown fresh in this answer, so it can still be withheld."""
        u = self.unit(c)
        return u.origin == _FRESH and not u.hidden

    def _sort_key(self, c: int) -> tuple[int, str]:
        return (self.count(c), self.unit(c).name)

    def initialise(self, match: Callable[[FrozenBitMap], _Match | None]) -> None:
        policy = self.policy
        for u in self.units:
            if u.origin in (_STRUCTURAL, _VIRTUAL):
                continue
            found = match(u.bits)
            if found is not None:
                e = found.entry
                u.origin = _REPEAT if found.exact else _NEAR
                u.hidden, u.value, u.display, u.entry = e.hidden, e.value, e.display, e.id
                u.exact = found.exact and e.fresh and not e.hidden
            elif policy.is_small(u.count):
                u.origin, u.hidden, u.display = _PRIMARY, True, policy.suppressed_display
            else:
                u.origin, u.exact = _FRESH, True
                u.value = policy.rounded(u.count)
                u.display = str(u.value)

    def import_relations(self, registry: PublicationRegistry) -> None:
        """Relations recorded by earlier answers that involve sets this answer publishes again:
        a reader can combine them with this answer's. Their other sets become external cells
        (never published here, with their earlier publication)."""
        by_entry = {  # the empty set is everywhere: sharing it links nothing
            u.entry: self.unit_cells[u.uid][0]
            for u in self.units
            if u.origin == _REPEAT and u.entry is not None and u.count
        }
        if not by_entry:
            return
        own = set(by_entry)
        for parent, children in registry.relations_of(sorted(own)):
            # touching one set of this answer only, a relation adds nothing: its other sets keep
            # the publication they had when it was protected
            if len(own.intersection((parent, *children))) < 2:
                continue
            terms = []
            for entry_id in (parent, *children):
                if entry_id not in by_entry:
                    e = registry.entry(entry_id)
                    c = len(self.names)
                    self.names.append(f"external:{entry_id}")
                    uid = len(self.units)
                    self.units.append(
                        _Unit(
                            uid,
                            e.bits,
                            len(e.bits),
                            f"external:{entry_id}",
                            _REPEAT,
                            hidden=e.hidden,
                            exact=e.fresh and not e.hidden,
                            value=e.value,
                            display=e.display,
                            entry=entry_id,
                        )
                    )
                    self.cell_unit.append(uid)
                    self.external.add(c)
                    by_entry[entry_id] = c
                terms.append(by_entry[entry_id])
            self._relate(terms[0], terms[1:])
        self._index_relations()

    def _withhold(self, cells: Iterable[int]) -> None:
        for c in cells:
            u = self.unit(c)
            if u.origin == _FRESH and not u.hidden:
                u.origin, u.hidden, u.exact = _SECONDARY, True, False
                u.value, u.display = None, self.policy.suppressed_display

    # -- rule 3
    def _peel(self, withheld: int | None = None) -> set[int]:
        """Cells a reader pins down relation by relation (one unknown term left, repeatedly),
        if the unit ``withheld`` were withheld too. Cells that may be derived (``waived``) count
        as known once pinned; the others are returned."""
        unknown = [
            not self.known(c) or self.cell_unit[c] == withheld for c in range(len(self.names))
        ]
        open_terms = [
            sum(1 for c in {rel.parent, *rel.children} if unknown[c]) for rel in self.relations
        ]
        queue = [ri for ri, n in enumerate(open_terms) if n == 1]
        pinned: set[int] = set()
        while queue:
            rel = self.relations[queue.pop()]
            left = [c for c in {rel.parent, *rel.children} if unknown[c]]
            if len(left) != 1:
                continue
            c = left[0]
            unknown[c] = False
            if not self.waived(c):
                pinned.add(c)
            for ri in self.member_rels[c]:
                open_terms[ri] -= 1
                if open_terms[ri] == 1:
                    queue.append(ri)
        return pinned

    def _choice_key(self, c: int, baseline: set[int]) -> tuple[bool, bool, int, str]:
        """Prefer cells whose withholding lets a reader pin down nothing new (not even
        themselves), then parts over subtotals (a withheld subtotal opens deeper combinations),
        then the smallest, then by name."""
        uid = self.cell_unit[c]
        breaks = bool(self._peel(uid) - baseline)
        internal = any(self.parent_rels[d] for d in self.unit_cells[uid])
        return (breaks, internal, self.count(c), self.unit(c).name)

    def _options(self, parent: int, candidates: Sequence[int]) -> list[int]:
        """Which cells to withhold: the smallest fresh shown non-zero candidate (preferring those
        whose withholding breaks no other relation; ties by count, then name); else the parent;
        else every fresh shown candidate. Empty: nothing left that can be withheld."""
        fresh = sorted({c for c in candidates if self.movable(c)}, key=self._sort_key)
        non_zero = [c for c in fresh if self.count(c) > 0]
        if non_zero:
            if len(non_zero) == 1:
                return non_zero
            baseline = self._peel()
            return [min(non_zero, key=lambda c: self._choice_key(c, baseline))]
        if self.movable(parent):
            return [parent]
        return fresh

    def _local(self, rel: _Relation) -> list[int] | None:
        terms = (rel.parent, *rel.children)
        unknown = [c for c in terms if not self.known(c)]
        violated = len(unknown) == 1 and not self.waived(unknown[0])
        if not violated and self.known(rel.parent):
            hidden = [c for c in rel.children if not self.known(c)]
            violated = bool(hidden) and self.small_group(hidden)
        return self._options(rel.parent, rel.children) if violated else None

    def _expand(self, c: int, memo: dict[int, _Front], stack: set[int]) -> _Front:
        """The smallest unknown remainder of unknown cell ``c``: itself, or the unknown parts of
        one of its breakdowns (recursively), with the known cells met on the way."""
        if c in memo:
            return memo[c]
        best = _Front(self.count(c), (), (c,))
        if c in stack:
            return best
        stack.add(c)
        for ri in self.parent_rels[c]:
            option = self._frontier(self.relations[ri].children, memo, stack)
            if option.key(self) < best.key(self):
                best = option
        stack.discard(c)
        memo[c] = best
        return best

    def _frontier(
        self, children: Sequence[int], memo: dict[int, _Front], stack: set[int]
    ) -> _Front:
        total = 0
        known: list[int] = []
        leaves: list[int] = []
        for d in children:
            if self.known(d):
                known.append(d)
            else:
                part = self._expand(d, memo, stack)
                total += part.total
                known.extend(part.known)
                leaves.extend(part.leaves)
        return _Front(total, tuple(known), tuple(leaves))

    def _deep(self, rel: _Relation, memo: dict[int, _Front]) -> list[int] | None:
        """A known parent minus everything known below it through withheld cells must not leave
        a small group."""
        if not self.known(rel.parent) or all(self.known(c) for c in rel.children):
            return None
        front = self._frontier(rel.children, memo, set())
        if not self.small_group(front.leaves):
            return None
        return self._options(rel.parent, front.known)

    def _sweep(self) -> None:
        while True:
            changed = False
            memo: dict[int, _Front] = {}
            for rel in self.relations:
                options = self._local(rel)
                if options is None:
                    options = self._deep(rel, memo)
                if options is None:
                    continue
                if not options:
                    continue  # nothing left to withhold here; reported after the fixed point
                self._withhold(options)
                memo.clear()
                changed = True
            if not changed:
                return

    def _derivations(self) -> dict[int, set[int]]:
        """Unknown cells a reader can determine exactly from the shown ones, each with the
        known cells its derivation uses (waived cells left out)."""
        unknown = {c for c in range(len(self.names)) if not self.known(c)}
        rows: list[dict[int, int]] = []
        for rel in self.relations:
            row: dict[int, int] = {rel.parent: 1}
            for c in rel.children:
                row[c] = row.get(c, 0) - 1
            rows.append(row)
        return {
            c: witness for c, witness in _determined(rows, unknown).items() if not self.waived(c)
        }

    def _derivable(self) -> list[int]:
        return sorted(self._derivations())

    def _fix_derivable(self) -> bool:
        """Withhold a fresh cell that a derivation uses (smallest, as for the relations)."""
        for _, witness in sorted(self._derivations().items()):
            fresh = sorted({d for d in witness if self.movable(d)}, key=self._sort_key)
            if not fresh:
                continue  # derived from earlier publications only: reported as unprotectable
            non_zero = [d for d in fresh if self.count(d) > 0]
            baseline = self._peel()
            self._withhold([min(non_zero or fresh, key=lambda d: self._choice_key(d, baseline))])
            return True
        return False

    def _near_pairs(self) -> bool:
        """Two fresh shown sets of this answer closer than the threshold: withhold the later."""
        t = self.policy.threshold
        shown = [u for u in self.units if u.origin == _FRESH and not u.hidden]
        for j, later in enumerate(shown):
            for earlier in shown[:j]:
                if abs(later.count - earlier.count) >= t or earlier.hidden:
                    continue
                if 0 < later.bits.symmetric_difference_cardinality(earlier.bits) < t:
                    later.origin, later.hidden, later.exact = _SECONDARY, True, False
                    later.value, later.display = None, self.policy.suppressed_display
                    return True
        return False

    def solve(self) -> None:
        while True:
            self._sweep()
            if self._fix_derivable():
                continue
            if self._near_pairs():
                continue
            break
        # what could not be protected (every candidate had been published before)
        memo: dict[int, _Front] = {}
        self.unprotectable = {
            ("relation", ri)
            for ri, rel in enumerate(self.relations)
            if self._local(rel) is not None or self._deep(rel, memo) is not None
        }
        self.unprotectable |= {("cell", c) for c in self._derivable()}

    # -- output
    def cell(self, name: str) -> Cell:
        u = self.unit(self.output[name])
        if u.hidden:
            return Cell(None, u.display, True)
        return Cell(u.value, u.display, False)

    def publications(self) -> tuple[list[_NewPublication], list[tuple[_Ref, list[_Ref]]]]:
        """This answer's new publications, and its relations in terms of publications (relations
        with a never-published term are left out; structural zeros drop out of the sums)."""
        rows: list[_NewPublication] = []
        refs: dict[int, _Ref] = {}
        for u in self.units:
            if u.origin == _REPEAT and u.entry is not None:
                refs[u.uid] = u.entry
            if u.origin in (_STRUCTURAL, _VIRTUAL, _REPEAT):
                continue
            refs[u.uid] = ("new", len(rows))
            rows.append(
                _NewPublication(
                    bits=u.bits,
                    value=None if u.hidden else u.value,
                    display=u.display,
                    hidden=u.hidden,
                    copied_from=u.entry if u.origin == _NEAR else None,
                )
            )
        relations: list[tuple[_Ref, list[_Ref]]] = []
        for rel in self.relations[: self.own_relations]:
            parent_uid = self.cell_unit[rel.parent]
            child_uids = [self.cell_unit[c] for c in rel.children]
            if parent_uid not in refs or any(
                self.units[uid].origin == _VIRTUAL for uid in child_uids
            ):
                continue
            children = [refs[uid] for uid in child_uids if uid in refs]  # structural: 0
            if children and children != [refs[parent_uid]]:
                relations.append((refs[parent_uid], children))
        return rows, relations

    def displays(self) -> dict[str, str]:
        """What the reader sees of every published cell, by name."""
        return {name: self.unit(index).display for name, index in sorted(self.output.items())}

    def audit(self, seen: Mapping[str, Sequence[str]] | None = None) -> ProtectionAudit:
        """Counts for the audit log. ``seen``: per cell, the displays the organisation got for
        this question before; a copied cell showing one of them is a repeat to that reader, not
        an overlap hit."""
        counts = {k: 0 for k in (_PRIMARY, _SECONDARY, _NEAR, _REPEAT)}
        seen = seen or {}
        for name, index in self.output.items():
            unit = self.unit(index)
            if unit.origin == _NEAR and unit.display in seen.get(name, ()):
                continue
            if unit.origin in counts:
                counts[unit.origin] += 1
        return ProtectionAudit(
            cells=len(self.output),
            primary_suppressed=counts[_PRIMARY],
            secondary_suppressed=counts[_SECONDARY],
            overlap_hits=counts[_NEAR],
            repeated=counts[_REPEAT],
            unprotectable=len(self.unprotectable),
        )


def _determined(rows: Iterable[Mapping[int, int]], unknown: set[int]) -> dict[int, set[int]]:
    """Unknowns fixed by the linear relations ``rows`` (coefficients over all variables; those
    not in ``unknown`` are known), in exact arithmetic, each with the known variables its value
    is computed from. Reduced row-echelon form over the unknown columns: an unknown is fixed iff
    its pivot row has no other unknown entry."""
    pivots: dict[int, dict[int, Fraction]] = {}
    for raw in rows:
        row = {k: Fraction(v) for k, v in raw.items() if v}
        for p, prow in pivots.items():
            f = row.get(p)
            if f:
                _subtract(row, prow, f)
        free = [k for k in row if k in unknown]
        if not free:
            continue
        p = min(free)
        inverse = 1 / row[p]
        row = {k: v * inverse for k, v in row.items()}
        for qrow in pivots.values():
            f = qrow.get(p)
            if f:
                _subtract(qrow, row, f)
        pivots[p] = row
    return {
        p: {k for k in row if k not in unknown}
        for p, row in pivots.items()
        if all(k == p or k not in unknown for k in row)
    }


def _subtract(target: dict[int, Fraction], row: Mapping[int, Fraction], factor: Fraction) -> None:
    for k, v in row.items():
        value = target.get(k, Fraction(0)) - factor * v
        if value:
            target[k] = value
        else:
            target.pop(k, None)


# --------------------------------------------------------------------------------------- protect


def protect(
    answer: AnswerSets,
    policy: DisclosurePolicy,
    registry: PublicationRegistry | None,
    org: str,
    fingerprint: str,
) -> tuple[ProtectedAnswer, ProtectionAudit]:
    """The sponsor's view of ``answer`` under ``policy``, and the audit bookkeeping.

    With ``policy.overlap_control`` a ``registry`` is required (it fails closed): the answer is
    matched against every earlier publication, and its own publications are recorded for ``org``
    and the question ``fingerprint``. Raises ``ValueError`` if the sets are inconsistent (sites
    overlapping, a funnel step not partitioned, ...), since the protection relies on the relations
    between them.
    """
    if policy.overlap_control and registry is None:
        raise ValueError("overlap control is on: protect() needs a PublicationRegistry")
    plan = _Plan(answer, policy)
    used = registry if policy.overlap_control else None
    guard: AbstractContextManager[Any] = used.lock if used is not None else nullcontext()
    with guard:
        if used is not None:
            used.refresh()
            plan.initialise(lambda bits: used.match(bits, policy.threshold))
            plan.import_relations(used)
        else:
            plan.initialise(lambda bits: None)
        plan.solve()
        if used is None:
            audit = plan.audit()
        else:
            # the same question re-asked by the same organisation (polled live, or asked again
            # after the data drifted): what it saw before is no news (see rule 4)
            shown: dict[str, Any] = {"cells": plan.displays(), "policy": policy.to_dict()}
            last = used.last_answer(org, fingerprint)
            seen: dict[str, list[str]] = {}
            if last is not None and last.get("policy") == shown["policy"]:
                seen = {k: list(v) for k, v in last.get("seen", {}).items()}
                for name, display in last["cells"].items():
                    seen.setdefault(name, [])
                    if display not in seen[name]:
                        seen[name] = [*seen[name], display][-_SEEN_PER_CELL:]
            audit = plan.audit(seen)
            rows, relations = plan.publications()
            unchanged = last is not None and {k: last.get(k) for k in shown} == shown
            shown["seen"] = seen
            if unchanged and all(row.copied_from is not None for row in rows):
                # every set is an earlier publication or a copy of one, and the reader sees
                # exactly what it saw: nothing to record, nothing learnt
                audit = replace(audit, republished=True)
            else:
                # sets published fresh (as after a restart renumbered the patients) are recorded
                # even when their displays are unchanged: later neighbours must find them
                used.record(
                    rows,
                    org,
                    fingerprint,
                    audit.overlap_hits,
                    relations,
                    answer=None if unchanged else shown,
                )

    funnel: list[dict[str, Any]] = []
    for i, step in enumerate(answer.funnel):
        row: dict[str, Any] = {"label": step.label, "kind": step.kind}
        for f in FUNNEL_FIELDS:
            row[f] = plan.cell(f"funnel:{i}:{f}")
        funnel.append(row)
    protected = ProtectedAnswer(
        total=plan.cell("total"),
        by_site={s: plan.cell(f"site:{s}") for s in plan.sites},
        by_region={r: plan.cell(f"region:{r}") for r in plan.regions},
        funnel=funnel,
        rules=policy.rules(),
        policy=policy.to_dict(),
    )
    return protected, audit


__all__ = [
    "AnswerSets",
    "BudgetExceeded",
    "BudgetStatus",
    "Cell",
    "DisclosurePolicy",
    "FunnelStepSets",
    "LockedOut",
    "ProtectedAnswer",
    "ProtectionAudit",
    "PublicationRegistry",
    "QueryBudget",
    "protect",
]
