"""What goes into disclosure control and what comes out: the exact answer as sets of patient ids
(:class:`AnswerSets`, its funnel as :class:`FunnelStepSets`), the sponsor's view
(:class:`ProtectedAnswer` of :class:`Cell`), and the audit's bookkeeping
(:class:`ProtectionAudit`). See ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pyroaring import BitMap

#: The cells of one funnel step, in the order they are published.
FUNNEL_FIELDS = ("entered", "passed", "failed", "unknown", "remaining")


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
class Breakdown:
    """A relation a reader knows between cells of an answer: ``parent`` is the disjoint union of
    ``parts`` and of the rest, the patients of ``parent`` in none of them (a never-published
    cell, protected like the patients without a site). Names are cells of the answer: ``total``,
    ``site:S``, ``region:R``, ``funnel:i:field`` or a name of :attr:`AnswerSets.extra`."""

    parent: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class AnswerSets:
    """The exact answer: the cohort, per site and region (every site of the population, empty
    ones included), and the funnel; and any further published sets (``extra``, by name: a
    profile's cells, each criterion's impact, site rates, a time series) with the relations a
    reader knows between them and the rest (``breakdowns``). Every set, extra or not, goes
    through the same rules in one plan, so no cell can be worked out from the others."""

    cohort: BitMap
    by_site: Mapping[str, BitMap]
    site_region: Mapping[str, str]
    by_region: Mapping[str, BitMap]
    funnel: Sequence[FunnelStepSets]
    extra: Mapping[str, BitMap] = field(default_factory=dict)
    breakdowns: Sequence[Breakdown] = ()
    #: Extra cells empty by definition: the question itself tells a reader that nobody can be
    #: in them (an age band outside the question's age limits). Shown as 0, like the funnel's
    #: structural zeros, and so never relied on to protect another cell (a withheld zero the
    #: reader knows protects nothing). A named cell that is not empty is an ordinary cell.
    structural: frozenset[str] = frozenset()

    def renumbered(self, number: Callable[[BitMap], BitMap]) -> AnswerSets:
        """The same answer with every set's patients renumbered by ``number`` (one-to-one, so
        sizes and relations are unchanged): the publication registry's numbers."""
        return replace(
            self,
            cohort=number(self.cohort),
            by_site={k: number(v) for k, v in self.by_site.items()},
            by_region={k: number(v) for k, v in self.by_region.items()},
            funnel=[
                replace(
                    step,
                    entered=number(step.entered),
                    passed=number(step.passed),
                    failed=number(step.failed),
                    unknown=number(step.unknown),
                    remaining=number(step.remaining),
                )
                for step in self.funnel
            ],
            extra={k: number(v) for k, v in self.extra.items()},
        )


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
    """What the sponsor sees. Each funnel row has its cells, ``label``, ``kind`` and ``note``
    (which of its cells are withheld, in words, or None); ``notes`` says in words, for the
    sites, the regions and each funnel row, what cannot all be shown."""

    total: Cell
    by_site: dict[str, Cell]
    by_region: dict[str, Cell]
    funnel: list[dict[str, Any]]
    rules: list[str]
    policy: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    #: The cells of :attr:`AnswerSets.extra`, by name (not part of :meth:`to_dict`: each
    #: output that publishes them lays them out itself).
    extra: dict[str, Cell] = field(default_factory=dict)

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
            "notes": list(self.notes),
        }


#: Why a cell is withheld, in the words every withheld cell gets (small or not: they look alike).
WHY_WITHHELD = "to protect small counts"


def _listed(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def withheld_parts(names: Sequence[str]) -> str | None:
    """The withheld cells of one row, named, in words; None when every cell is shown."""
    if not names:
        return None
    verb = "is" if len(names) == 1 else "are"
    return f"{_listed(names)} {verb} withheld {WHY_WITHHELD}"


def withheld_among(cells: Mapping[str, Cell], singular: str, plural: str) -> str | None:
    """How many of a breakdown's cells are withheld, in words (``2 of 5 sites are withheld to
    protect small counts``); None when every one is shown."""
    k = sum(1 for c in cells.values() if c.suppressed)
    if not k:
        return None
    n = len(cells)
    noun, verb = singular if n == 1 else plural, "is" if k == 1 else "are"
    return f"{k} of {n} {noun} {verb} withheld {WHY_WITHHELD}"


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


__all__ = [
    "FUNNEL_FIELDS",
    "AnswerSets",
    "Breakdown",
    "Cell",
    "FunnelStepSets",
    "ProtectedAnswer",
    "ProtectionAudit",
    "withheld_among",
    "withheld_parts",
]
