"""The publication registry (rule 4, overlap control): every set ever published to any sponsor,
the relations between an answer's publications, answers in which overlap control fired, and each
organisation's last answer to each question. See ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pyroaring import AbstractBitMap, FrozenBitMap

from core.db import ProcessLock

from .policy import WITHHELD
from .tables import (
    answers_table,
    open_engine,
    overlap_events_table,
    patient_numbers_table,
    publications_table,
    relations_table,
)

#: Displays remembered per cell of a question for an organisation (an ad hoc answer and the
#: saved question's live answer to the same criteria alternate, each drifting on its own).
SEEN_PER_CELL = 8


def current_display(display: str) -> str:
    """A display as it reads now: publications recorded before withheld cells read
    ``withheld`` hold ``<threshold`` (shown displays are digits)."""
    return WITHHELD if display.startswith("<") else display


PublicationRef = int | tuple[str, int]  # an existing publication id, or ("new", row index)


@dataclass(frozen=True)
class NewPublication:
    """A set this answer publishes for the first time (``copied_from``: the publication it
    copies under overlap control, None when fresh)."""

    bits: FrozenBitMap
    value: int | None
    display: str
    hidden: bool
    copied_from: int | None


@dataclass(frozen=True)
class Publication:
    """A recorded publication (``fresh``: the set's own value, not a copy)."""

    id: int
    bits: FrozenBitMap
    value: int | None
    display: str
    hidden: bool
    fresh: bool


@dataclass(frozen=True)
class RegistryMatch:
    """The publication a set must reuse: the same set (``exact``) or a near one."""

    exact: bool
    entry: Publication
    distance: int


class PublicationRegistry:
    """Every set ever published (value or withheld), global across sponsors so that colluding
    sponsors cannot difference each other's answers, with the org that asked. Publications are one
    SQL table (``dc_publications``); the relations between an answer's publications are a second
    (``dc_relations``); answers in which overlap control fired are a third
    (``dc_overlap_events``, read by :class:`QueryBudget`). An in-memory index by cardinality is
    loaded at start and topped up from the tables before each answer, so several processes
    sharing a database see each other's publications. :attr:`lock` is held across those
    processes (:class:`~core.db.ProcessLock`): an answer's refresh, lookups and recording
    happen while no other process records, so two answers given at once by two API processes
    cannot both publish near sets without seeing each other, and publication ids are committed
    in order (the refresh's ``id >`` the last one loaded misses none).

    ``PublicationRegistry("sqlite://")`` is an in-memory registry for tests. ``target`` may also
    be an existing SQLAlchemy engine (e.g. to share one in-memory database with a
    :class:`QueryBudget`). ``clock`` returns seconds since the epoch.
    """

    def __init__(
        self, target: str | sa.Engine = "sqlite://", *, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = open_engine(target)
        self.clock = clock
        self.lock = ProcessLock(self.engine, "disclosure-registry")
        self._exact: dict[FrozenBitMap, Publication] = {}
        self._fresh: dict[int, list[Publication]] = {}
        self._by_id: dict[int, Publication] = {}
        self._relations: dict[tuple[int, tuple[int, ...]], None] = {}
        self._relations_of: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        self._count = 0
        self._last_id = 0
        self._last_relation = 0
        self._numbers: dict[str, int] = {}
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
                    Publication(
                        row.id,
                        bits,
                        row.value,
                        WITHHELD if row.hidden else row.display,
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

    def numbers(self, patients: Sequence[str]) -> list[int]:
        """The registry's number of each patient pseudonym, the same in every process on the
        database (given on first sight, kept for good): bitmaps matched and recorded here
        must be of these, since a snapshot's own ids differ between processes and restarts."""
        missing = [p for p in dict.fromkeys(patients) if p not in self._numbers]
        if missing:
            t = patient_numbers_table
            with self.lock:
                for start in range(0, len(missing), 5000):
                    chunk = missing[start : start + 5000]
                    with self.engine.begin() as conn:
                        known = {
                            row.patient
                            for row in conn.execute(
                                sa.select(t.c.patient).where(t.c.patient.in_(chunk))
                            )
                        }
                        new = [{"patient": p} for p in chunk if p not in known]
                        if new:  # under the lock: no other process inserts meanwhile
                            conn.execute(t.insert(), new)
                        for row in conn.execute(
                            sa.select(t.c.patient, t.c.number).where(t.c.patient.in_(chunk))
                        ):
                            self._numbers[row.patient] = int(row.number)
        return [self._numbers[p] for p in patients]

    def _index_relation(self, relation: tuple[int, tuple[int, ...]]) -> None:
        if relation in self._relations:
            return
        self._relations[relation] = None
        for entry_id in {relation[0], *relation[1]}:
            self._relations_of.setdefault(entry_id, []).append(relation)

    def entry(self, entry_id: int) -> Publication:
        return self._by_id[entry_id]

    def relations_of(self, entry_ids: Iterable[int]) -> list[tuple[int, tuple[int, ...]]]:
        """Relations recorded by earlier answers that involve any of these publications."""
        found: dict[tuple[int, tuple[int, ...]], None] = {}
        for entry_id in entry_ids:
            for relation in self._relations_of.get(entry_id, ()):
                found[relation] = None
        return list(found)

    def _index(self, entry: Publication) -> None:
        self._by_id[entry.id] = entry
        self._last_id = max(self._last_id, entry.id)
        self._count += 1
        self._exact.setdefault(entry.bits, entry)  # the earliest publication of a set wins
        if entry.fresh:
            self._fresh.setdefault(len(entry.bits), []).append(entry)

    def match(self, bits: AbstractBitMap, threshold: int) -> RegistryMatch | None:
        """The publication a set must reuse, if any (rule 4): an identical set; else, among fresh
        publications fewer than ``threshold`` patients away, the nearest withheld one if any is
        withheld, otherwise the nearest shown one (ties: the earliest)."""
        frozen = bits if isinstance(bits, FrozenBitMap) else FrozenBitMap(bits)
        same = self._exact.get(frozen)
        if same is not None:
            return RegistryMatch(True, same, 0)
        n = len(frozen)
        best: dict[bool, tuple[int, int, Publication]] = {}
        for cardinality in range(max(0, n - threshold + 1), n + threshold):
            for entry in self._fresh.get(cardinality, ()):
                distance = frozen.symmetric_difference_cardinality(entry.bits)
                if 0 < distance < threshold:
                    key = (distance, entry.id, entry)
                    if entry.hidden not in best or key[:2] < best[entry.hidden][:2]:
                        best[entry.hidden] = key
        chosen = best.get(True) or best.get(False)
        return None if chosen is None else RegistryMatch(False, chosen[2], chosen[0])

    def last_answer(self, org: str, fingerprint: str) -> dict[str, Any] | None:
        """The last answer published to ``org`` for the question ``fingerprint`` (as given to
        :meth:`record`), or None."""
        t = answers_table
        query = sa.select(t.c.answer).where(t.c.org == org, t.c.fingerprint == fingerprint)
        with self.lock, self.engine.connect() as conn:
            found = conn.execute(query).scalar()
        if found is None:
            return None
        answer = dict(json.loads(found))
        answer["cells"] = {k: current_display(v) for k, v in answer.get("cells", {}).items()}
        answer["seen"] = {
            k: list(dict.fromkeys(current_display(d) for d in v))
            for k, v in answer.get("seen", {}).items()
        }
        return answer

    def record(
        self,
        rows: Sequence[NewPublication],
        org: str,
        fingerprint: str,
        overlap_hits: int,
        relations: Sequence[tuple[PublicationRef, Sequence[PublicationRef]]] = (),
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one answer's new publications, the relations between its publications (a
        reference is an existing publication id, or ``("new", i)`` for ``rows[i]``), an overlap
        event, and (when given) ``answer`` as the last one ``org`` got for ``fingerprint``, in
        one transaction."""
        now = self.clock()
        created = datetime.fromtimestamp(now, UTC)
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
        with self.lock:
            # what other processes recorded first, so that this answer's ids follow theirs
            self.refresh()
            self._insert(rows, params, org, fingerprint, overlap_hits, relations, answer, now)

    def _insert(
        self,
        rows: Sequence[NewPublication],
        params: list[dict[str, Any]],
        org: str,
        fingerprint: str,
        overlap_hits: int,
        relations: Sequence[tuple[PublicationRef, Sequence[PublicationRef]]],
        answer: Mapping[str, Any] | None,
        now: float,
    ) -> None:
        t = publications_table
        created = datetime.fromtimestamp(now, UTC)
        entries: list[Publication] = []
        with self.engine.begin() as conn:
            if params:
                inserted = conn.execute(
                    t.insert().returning(t.c.id, sort_by_parameter_order=True), params
                )
                for row, new_id in zip(rows, inserted.scalars(), strict=True):
                    entries.append(
                        Publication(
                            int(new_id),
                            row.bits,
                            row.value,
                            row.display,
                            row.hidden,
                            row.copied_from is None,
                        )
                    )
            new_ids = [e.id for e in entries]

            def resolve(ref: PublicationRef) -> int:
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


__all__ = [
    "NewPublication",
    "Publication",
    "PublicationRef",
    "PublicationRegistry",
    "RegistryMatch",
]
