"""What an engine promises: the Protocols the service and the tests program against.

Every engine evaluates a :class:`~feasibility.criteria.Question` for a population at an index
time and returns, per patient, a :class:`~feasibility.engines.results.PatientResult`
(:class:`QueryEngine`); an engine that also answers over a columnar snapshot, as the sponsor
API needs, returns the per-patient step frame (:class:`FrameEngine`). Each engine module
declares which it satisfies, so mypy checks the promise. See docs/explanation/ for how the
engines are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

import polars as pl

from ..criteria import Question
from ..snapshot import SnapshotFrames
from .results import PatientResult

#: A population as facts keep it: patient -> resource key -> fact entry (a JSON object).
Population = Mapping[str, Mapping[str, Mapping[str, Any]]]


class QueryEngine(Protocol):
    """Evaluates a question over a population (the reference, incremental and polars engines;
    the spec and agreement tests compare them through this)."""

    @property
    def name(self) -> str:
        """How answers and benchmarks name the engine."""
        ...

    def evaluate(
        self, question: Question, population: Population, at: datetime
    ) -> dict[str, PatientResult]:
        """Each patient's result at ``at`` (the question's index instant is taken from it)."""
        ...


class FrameEngine(QueryEngine, Protocol):
    """A :class:`QueryEngine` that also evaluates over a snapshot's frames: what
    :class:`~feasibility.service.FeasibilityService` answers with."""

    def evaluate_frames(
        self, question: Question, frames: SnapshotFrames, at: datetime
    ) -> pl.DataFrame:
        """The step frame, one row per patient of ``frames`` in pid order: ``pid``,
        ``patient``, ``in_population``, ``s0``..``sN`` (1/0/null), ``u0``..``uN`` (results
        skipped as unconvertible), ``site``, ``region``, ``member``."""
        ...


__all__ = ["FrameEngine", "Population", "QueryEngine"]
