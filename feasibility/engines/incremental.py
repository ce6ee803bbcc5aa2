"""The incremental engine: per-patient evaluation for saved questions in the stream.

The stream re-evaluates a patient for a saved question only when something that could change
the answer happens, so this engine adds two things to per-patient evaluation:

* **relevance**: :meth:`CompiledQuestion.relevant` says whether a fact can affect the question
  at all (its codes meet one of the question's code terms, or it is demographics). A new lab
  result that no saved question mentions costs one set lookup, not an evaluation;
* **time**: :meth:`CompiledQuestion.evaluate` also returns the next instant at which the answer
  could change with no new data (a result leaving a window, a birthday, a dated record coming
  into range). The stream sets a timer for it, so time windows age as time passes.

The evaluation itself is the reference semantics (:mod:`.reference`), on the patient's digested
data; the generative tests check the engines agree and that the answer does not change before
the next-change instant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from core.patient_view import PatientView, build_view

from ..criteria import (
    EVENT_TYPES,
    AgeCriterion,
    AnyCriterion,
    CancerStageCriterion,
    Code,
    MolecularMarkerCriterion,
    Question,
    iter_criteria,
)
from ..patient_data import PatientData, digest, tokens
from ..terminology import (
    CONCEPTS,
    LOINC,
    MARKERS,
    canonical_system,
    normalise_code,
    prefix_covers,
    range_bounds,
    range_covers,
)
from ..terminology import token as make_token
from . import reference
from .base import Population, QueryEngine
from .results import PatientResult

DAY = reference.DAY
#: Fact kinds every question depends on: demographics decide the population, site and region.
ALWAYS_RELEVANT = frozenset({"patient"})
EPSILON = 1e-6


class _Matcher:
    """The code terms of a question, compiled for fast relevance checks."""

    def __init__(self, codes: Iterable[Code]) -> None:
        self.exact: set[str] = set()
        self.prefixes: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str, str]] = []
        for code in codes:
            self.add(code)

    def add(self, code: Code) -> None:
        if code.needs_expansion:  # ECL or ValueSet: its expansion, fixed when compiled
            self.exact.update(code.expanded_tokens())
            return
        if code.concept is not None:
            self.exact.update(make_token(s, c) for s, c in CONCEPTS[code.concept].codes)
            return
        system = canonical_system(code.system or "")
        if code.code is not None:
            self.exact.add(make_token(system, code.code))
        elif code.prefix is not None:
            self.prefixes.append((f"{system}|", normalise_code(system, code.prefix)))
        elif code.range is not None:
            self.ranges.append((f"{system}|", *range_bounds(system, code.range)))

    def hits(self, found: Iterable[str]) -> bool:
        for tok in found:
            if tok in self.exact:
                return True
            for head, prefix in self.prefixes:
                if tok.startswith(head) and prefix_covers(prefix, tok[len(head) :]):
                    return True
            for head, lo, hi in self.ranges:
                if tok.startswith(head) and range_covers(lo, hi, tok[len(head) :]):
                    return True
        return False


def _codes_of(criterion: AnyCriterion) -> list[Code]:
    codes: list[Code] = []
    for name in ("codes", "component", "value_codes", "device_types"):
        codes.extend(getattr(criterion, name, None) or ())
    if isinstance(criterion, CancerStageCriterion):
        codes.append(Code(concept="stage_group"))
    if isinstance(criterion, MolecularMarkerCriterion):
        marker = MARKERS[criterion.marker.upper()]
        codes.extend(Code(system=LOINC, code=c) for c in marker.tests)
    return codes


def fact_tokens(fact: Mapping[str, Any]) -> set[str]:
    """Every match token a fact carries (codes, component codes, device types)."""
    found: set[str] = set(tokens(fact.get("codes")))
    for comp in fact.get("components") or ():
        found |= tokens(comp.get("codes"))
    device = fact.get("device")
    if isinstance(device, Mapping):
        found |= tokens(device.get("type_codes"))
    return found


class CompiledQuestion:
    """A question ready for per-patient, per-event evaluation."""

    def __init__(self, question: Question) -> None:
        self.question = question
        criteria = iter_criteria(question)
        self.matcher = _Matcher(c for criterion in criteria for c in _codes_of(criterion))
        self.devices_by_name = any(
            criterion.type == "device" and (criterion.manufacturer or criterion.model)
            for criterion in criteria
        )
        self.moves_with_time = question.index_date is None
        self.gate = _gate(question)

    def may_pass_first_step(self, patient_tokens: set[str]) -> bool:
        """False when the first inclusion step is certainly FALSE for a patient with these
        tokens, whatever the time: every criterion of that step is closed-world (no matching
        record: FALSE) and none of the patient's codes matches it. Patients who fail it are
        never in the cohort, so the stream need not evaluate them."""
        return self.gate is None or self.gate.hits(patient_tokens)

    def relevant(self, fact: Mapping[str, Any]) -> bool:
        """Whether this fact (in any version) can change the question's answer."""
        kind = fact.get("kind")
        if kind in ALWAYS_RELEVANT:
            return True
        if kind == "device_exposure" and self.devices_by_name:
            return True
        if kind in ("consent", "adverse_event"):
            return False
        return self.matcher.hits(fact_tokens(fact))

    def evaluate(
        self, data: PatientData, at: datetime, *, count_unconvertible: bool = False
    ) -> tuple[PatientResult, float | None]:
        """The patient's result at ``at`` and the next instant (epoch seconds) at which it could
        change without new data, or None. The per-step counts of unconvertible results are
        left out unless asked for: the live cohort does not publish them (ad hoc answers do)."""
        t = self.question.index_instant(at).timestamp()
        ctx = reference._Context(self.question, data, t)
        result = reference.evaluate_in(ctx, count_unconvertible)
        if not self.moves_with_time:
            return result, None
        return result, next_change(self.question, data, t, ctx)

    def evaluate_entries(
        self,
        patient: str,
        entries: Mapping[str, Mapping[str, Any]],
        at: datetime,
        *,
        count_unconvertible: bool = True,
    ) -> tuple[PatientResult, float | None]:
        return self.evaluate(digest(patient, entries), at, count_unconvertible=count_unconvertible)


#: Criteria that are FALSE for a patient without a record matching their codes.
_CLOSED_WORLD = ("condition", "medication", "procedure")


def _gate(question: Question) -> _Matcher | None:
    step = question.inclusion[0].any_of
    codes: list[Code] = []
    for criterion in step:
        closed = criterion.type in _CLOSED_WORLD or (
            criterion.type == "observation" and not criterion.has_test
        )
        if not closed:
            return None
        codes.extend(getattr(criterion, "codes", ()))
    return _Matcher(codes)


def patient_tokens(view: PatientView | Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Every match token of a patient's live resources (from their view, or their state
    entries through the view)."""
    if not isinstance(view, PatientView):
        view = build_view("", view)
    return view.tokens()


def _next_birthday(birth: date, after: float) -> float:
    day = datetime.fromtimestamp(after, UTC).date()
    for year in (day.year, day.year + 1):
        try:
            candidate = birth.replace(year=year)
        except ValueError:  # 29 February in a common year: the age changes on 1 March
            candidate = date(year, 3, 1)
        instant = datetime.combine(candidate, time(), UTC).timestamp()
        if instant > after:
            return instant
    return datetime.combine(day + timedelta(days=366), time(), UTC).timestamp()


def next_change(
    question: Question, data: PatientData, t: float, ctx: reference._Context | None = None
) -> float | None:
    """A conservative next instant after ``t`` at which any criterion could change value.

    As T moves, an event dated ``w`` enters ``[T + start, T + end]`` at ``T = w - end`` and
    leaves after ``T = w - start``; any event dated after T enters at ``T = w``; an age changes
    at a birthday; the population changes at a future date of death or birth. Every such
    instant after ``t`` is a candidate; the earliest is returned (re-evaluating early is
    harmless, late is not).
    """
    candidates: list[float] = []
    if data.deceased_at is not None and data.deceased_at > t:
        candidates.append(data.deceased_at + EPSILON)
    if data.birth_date is not None:
        # a patient born after T's day joins the population at the start of their birth day
        candidates.append(datetime.combine(data.birth_date, time(), UTC).timestamp())
    criteria = iter_criteria(question)
    if data.birth_date is not None and any(isinstance(c, AgeCriterion) for c in criteria):
        candidates.append(_next_birthday(data.birth_date, t))
    if ctx is None or ctx.t != t:
        ctx = reference._Context(question, data, t)
    for criterion in criteria:
        if not isinstance(criterion, EVENT_TYPES):
            continue
        window = criterion.window
        for row in reference._candidates(criterion, ctx):
            w = row.when
            if w is None:
                continue
            if w > t:
                candidates.append(w)
            if window is not None and window.anchor == "index":
                if window.end is not None:
                    candidates.append(w - window.end * DAY)
                if window.start is not None:
                    candidates.append(w - window.start * DAY + EPSILON)
    after = [c for c in candidates if c > t]
    return min(after) if after else None


class IncrementalEngine:
    """The engine interface over a whole population (for spec and agreement tests)."""

    name = "incremental"

    def evaluate(
        self,
        question: Question,
        population: Population,
        at: datetime,
    ) -> dict[str, PatientResult]:
        compiled = CompiledQuestion(question)
        return {
            patient: compiled.evaluate_entries(patient, entries, at)[0]
            for patient, entries in population.items()
        }


#: Checked by mypy: the incremental engine is a :class:`~.base.QueryEngine`.
_engine: type[QueryEngine] = IncrementalEngine

__all__ = [
    "CompiledQuestion",
    "IncrementalEngine",
    "fact_tokens",
    "next_change",
    "patient_tokens",
]
