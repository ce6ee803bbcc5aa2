"""The reference engine: a plain per-patient interpreter of the criteria model.

Written to be read, not to be fast: every other engine is tested against it. The semantics it
implements are the ones documented in :mod:`feasibility.criteria`:

* events after the index instant T never count; a window keeps events dated in
  ``[anchor + start days, anchor + end days]``, both ends inclusive; records without a date
  count only when there is no window;
* condition, medication, procedure and device criteria are closed-world: no qualifying record
  is FALSE; ``min_count`` counts distinct resources;
* an observation criterion with a test reads the ``select``-ed testable observation in the
  window; none is UNKNOWN; "latest" is the greatest (date, resource key);
* values convert to the criterion's unit with :func:`feasibility.units.affine` (analyte from the
  LOINC code); a value whose unit does not convert is not testable;
* demographics missing (birth date, sex, site, region) are UNKNOWN;
* per step, the results its criteria skipped as unconvertible are counted
  (:func:`unconvertible`), so an answer can say how many results a unit kept out.
* the population at T is the patient view's (:meth:`core.patient_view.PatientView.in_population`):
  a live Patient, alive at T, not born after T's day.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from .. import units
from ..criteria import (
    EVENT_TYPES,
    AgeCriterion,
    AllOf,
    AnyCriterion,
    AnyOf,
    CancerStageCriterion,
    Code,
    ConditionCriterion,
    DeviceCriterion,
    EventCriterion,
    InclusionStep,
    MedicationCriterion,
    MolecularMarkerCriterion,
    Not,
    ObservationCriterion,
    ObservationLike,
    ProcedureCriterion,
    Question,
    RegionCriterion,
    SexCriterion,
    SiteCriterion,
    Window,
    iter_criteria,
)
from ..patient_data import Event, Measurement, ObservationRow, PatientData, Tokens, digest
from ..terminology import (
    AJCC,
    CONCEPTS,
    LOINC,
    MARKERS,
    canonical_system,
    normalise_code,
    prefix_covers,
    range_bounds,
    range_covers,
    stage_matches,
    system_of_data,
)
from ..terminology import token as make_token
from .base import Population, QueryEngine
from .results import PatientResult, Tri, kleene_and, kleene_not, kleene_or

DAY = 86400.0
CONDITION_EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
MEDICATION_EXCLUDED = frozenset({"entered-in-error", "cancelled", "not-taken"})
PROCEDURE_EXCLUDED = frozenset({"not-done", "entered-in-error", "preparation"})
OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected"})
DEVICE_EXCLUDED = frozenset({"entered-in-error"})


# --------------------------------------------------------------------------- codes


class _CodeTerm:
    """A coded term compiled once: the exact tokens it covers, or the system head with the
    prefix or range bounds it covers. ``Code`` is a frozen model, so terms are cached per code
    (:func:`compiled`): a term is compiled once, not on every record it is matched against."""

    __slots__ = ("bounds", "exact", "head", "prefix")

    def __init__(self, code: Code) -> None:
        self.exact: frozenset[str] | None = None
        self.head = ""
        self.prefix: str | None = None
        self.bounds: tuple[str, str] | None = None
        if code.needs_expansion:  # ECL or ValueSet: its expansion, fixed when compiled
            self.exact = code.expanded_tokens()
            return
        if code.concept is not None:
            self.exact = frozenset(
                make_token(system, c) for system, c in CONCEPTS[code.concept].codes
            )
            return
        system = canonical_system(code.system or "")
        if code.code is not None:
            self.exact = frozenset({make_token(system, code.code)})
            return
        self.head = f"{system}|"
        self.prefix = normalise_code(system, code.prefix) if code.prefix is not None else None
        self.bounds = range_bounds(system, code.range) if code.range is not None else None

    def matches(self, found: Tokens) -> bool:
        if self.exact is not None:
            return not self.exact.isdisjoint(found)
        head, prefix, bounds = self.head, self.prefix, self.bounds
        cut = len(head)
        for tok in found:
            if not tok.startswith(head):
                continue
            value = tok[cut:]
            if prefix is not None and prefix_covers(prefix, value):
                return True
            if bounds is not None and range_covers(*bounds, value):
                return True
        return False


#: Compiled terms by the identity of their ``Code``, which each entry keeps alive, so an id
#: cannot be reused by another object while its entry exists. Not an ``lru_cache`` on the code:
#: hashing and comparing pydantic models on every lookup cost more than the matching itself.
_TERMS: dict[int, tuple[Code, _CodeTerm]] = {}
_TERMS_MAX = 100_000


def compiled(code: Code) -> _CodeTerm:
    found = _TERMS.get(id(code))
    if found is not None and found[0] is code:
        return found[1]
    if len(_TERMS) >= _TERMS_MAX:
        _TERMS.clear()
    term = _CodeTerm(code)
    _TERMS[id(code)] = (code, term)
    return term


def code_matches(code: Code, found: Tokens) -> bool:
    """Whether any token in ``found`` is covered by the coded term ``code``."""
    return compiled(code).matches(found)


def any_code(codes: list[Code], found: Tokens) -> bool:
    # a plain loop: the generator of any() cost a fifth of the matching on the stream's path
    for code in codes:  # noqa: SIM110
        if compiled(code).matches(found):
            return True
    return False


def analyte_of(found: Tokens) -> str | None:
    head = f"{LOINC}|"
    for tok in sorted(found):
        if tok.startswith(head):
            analyte = units.analyte_for_loinc(tok[len(head) :])
            if analyte is not None:
                return analyte
    return None


# --------------------------------------------------------------------------- time


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


class _Context:
    def __init__(self, question: Question, data: PatientData, t: float) -> None:
        self.question = question
        self.data = data
        self.t = t
        # window anchors name event criteria (the criteria model checks it)
        self.ids: dict[str, EventCriterion] = {
            c.id: c
            for c in iter_criteria(question)
            if c.id is not None and isinstance(c, EVENT_TYPES)
        }
        self._anchors: dict[str, float | None] = {}
        #: a criterion's candidates (they do not depend on T), by the criterion's identity:
        #: the criteria live as long as this context, so ``id`` cannot be reused meanwhile
        self.candidates: dict[int, list[Any]] = {}

    def anchor(self, window: Window) -> float | None:
        if window.anchor == "index":
            return self.t
        if window.anchor not in self._anchors:
            criterion = self.ids[window.anchor]
            dates = [e.when for e in qualifying(criterion, self) if e.when is not None]
            self._anchors[window.anchor] = min(dates) if dates else None
        return self._anchors[window.anchor]

    def in_window(self, window: Window | None, when: float | None) -> bool:
        if when is None:
            return window is None
        if when > self.t:
            return False
        if window is None:
            return True
        anchor = self.anchor(window)
        if anchor is None:
            return False
        if window.start is not None and when < anchor + window.start * DAY:
            return False
        return not (window.end is not None and when > anchor + window.end * DAY)


# --------------------------------------------------------------------------- event criteria


def _candidates(criterion: EventCriterion, ctx: _Context) -> list[Any]:
    """Records of the criterion's kind that match its codes and statuses, before windows (read
    once per criterion and context: steps, counts of unconvertible results and the next-change
    instant all read them)."""
    found = ctx.candidates.get(id(criterion))
    if found is None:
        found = _read_candidates(criterion, ctx)
        ctx.candidates[id(criterion)] = found
    return found


def _read_candidates(criterion: EventCriterion, ctx: _Context) -> list[Any]:
    data = ctx.data
    if isinstance(criterion, ConditionCriterion):
        return [
            c
            for c in data.conditions
            if any_code(criterion.codes, c.tokens)
            and c.verification_status not in CONDITION_EXCLUDED_VERIFICATION
            and (
                criterion.clinical_status is None or c.clinical_status in criterion.clinical_status
            )
        ]
    if isinstance(criterion, MedicationCriterion):
        return [
            m
            for m in data.medications
            if any_code(criterion.codes, m.tokens)
            and (
                m.status in criterion.status
                if criterion.status is not None
                else m.status not in MEDICATION_EXCLUDED
            )
        ]
    if isinstance(criterion, ProcedureCriterion):
        return [
            p
            for p in data.procedures
            if any_code(criterion.codes, p.tokens)
            and (
                p.status in criterion.status
                if criterion.status is not None
                else p.status not in PROCEDURE_EXCLUDED
            )
        ]
    if isinstance(criterion, DeviceCriterion):
        manufacturers = {m.casefold() for m in criterion.manufacturer or ()}
        models = {m.casefold() for m in criterion.model or ()}
        return [
            d
            for d in data.devices
            if d.status not in DEVICE_EXCLUDED
            and (not criterion.device_types or any_code(criterion.device_types, d.tokens))
            and (not manufacturers or (d.manufacturer or "").casefold() in manufacturers)
            and (not models or (d.model or "").casefold() in models)
        ]
    if isinstance(
        criterion, ObservationCriterion | CancerStageCriterion | MolecularMarkerCriterion
    ):
        return _observation_rows(criterion, ctx)
    raise TypeError(f"not an event criterion: {type(criterion).__name__}")


def _observation_codes(criterion: ObservationLike) -> list[Code]:
    if isinstance(criterion, ObservationCriterion):
        return criterion.codes
    if isinstance(criterion, CancerStageCriterion):
        return [Code(concept="stage_group")]
    marker = MARKERS[criterion.marker.upper()]
    return [Code(system=LOINC, code=c) for c in marker.tests]


class _Reading:
    """One testable reading: an observation's value or one of its components."""

    def __init__(self, row: ObservationRow, measurement: Measurement, index: int) -> None:
        self.row = row
        self.key = row.key
        self.when = row.when
        self.measurement = measurement
        self.index = index
        self.order = (row.when if row.when is not None else float("-inf"), row.key, index)


def _observation_rows(criterion: ObservationLike, ctx: _Context) -> list[_Reading]:
    codes = _observation_codes(criterion)
    component = criterion.component if isinstance(criterion, ObservationCriterion) else None
    out: list[_Reading] = []
    for row in ctx.data.observations:
        if row.status not in OBSERVATION_STATUSES or not any_code(codes, row.tokens):
            continue
        if component:
            for i, comp in enumerate(row.components):
                if any_code(component, comp.tokens):
                    out.append(_Reading(row, comp, i))
        else:
            empty = Measurement(frozenset(), None, None, frozenset(), (), frozenset())
            out.append(_Reading(row, row.measurement or empty, -1))
    return out


def converted(criterion: ObservationCriterion, reading: _Reading) -> float | None:
    """The reading's value in the criterion's unit, or None when it cannot be tested."""
    value_test = criterion.value
    m = reading.measurement
    if value_test is None or m.value is None:
        return None
    if value_test.unit is None:
        return m.value
    if m.unit is None:
        return None
    found = m.tokens if criterion.component else reading.row.tokens
    factor = units.affine(m.unit, value_test.unit, analyte_of(found))
    if factor is None:
        return None
    scale, offset = factor
    return m.value * scale + offset


def _testable(criterion: ObservationCriterion, reading: _Reading) -> bool:
    m = reading.measurement
    if criterion.value is not None and converted(criterion, reading) is None:
        return False
    if criterion.value_codes and not m.value_tokens:
        return False
    return not (criterion.interpretation and not m.interpretation)


def _passes(criterion: ObservationCriterion, reading: _Reading) -> bool:
    m = reading.measurement
    if criterion.value is not None:
        value = converted(criterion, reading)
        if value is None or not criterion.value.passes(value):
            return False
    if criterion.value_codes and not any_code(criterion.value_codes, m.value_tokens):
        return False
    return not (criterion.interpretation and not (set(criterion.interpretation) & m.interpretation))


def qualifying(criterion: EventCriterion, ctx: _Context) -> list[Any]:
    """Records that qualify for an event criterion (in its window, passing its tests): what
    ``min_count`` counts and what an anchor's date is taken from."""
    rows = [r for r in _candidates(criterion, ctx) if ctx.in_window(criterion.window, r.when)]
    if isinstance(criterion, ObservationCriterion) and criterion.has_test:
        rows = [r for r in rows if _testable(criterion, r) and _passes(criterion, r)]
    return rows


def _distinct(rows: list[Any]) -> int:
    return len({r.key for r in rows})


def _event(criterion: EventCriterion, ctx: _Context) -> Tri:
    if isinstance(criterion, ObservationCriterion):
        return _observation(criterion, ctx)
    if isinstance(criterion, CancerStageCriterion):
        return _stage(criterion, ctx)
    if isinstance(criterion, MolecularMarkerCriterion):
        return _marker(criterion, ctx)
    rows: list[Event] = qualifying(criterion, ctx)
    return _distinct(rows) >= criterion.min_count


def _observation(criterion: ObservationCriterion, ctx: _Context) -> Tri:
    in_window = [r for r in _candidates(criterion, ctx) if ctx.in_window(criterion.window, r.when)]
    if not criterion.has_test:
        return _distinct(in_window) >= criterion.min_count
    testable = [r for r in in_window if _testable(criterion, r)]
    if not testable:
        return None
    if criterion.select == "any":
        return _distinct([r for r in testable if _passes(criterion, r)]) >= criterion.min_count
    if criterion.select == "latest":
        chosen = max(testable, key=lambda r: r.order)
    else:
        pick: Callable[..., Any] = min if criterion.select == "min" else max
        value = pick(converted(criterion, r) for r in testable)
        chosen = max(
            (r for r in testable if converted(criterion, r) == value), key=lambda r: r.order
        )
    return _passes(criterion, chosen)


def _latest_coded(criterion: ObservationLike, ctx: _Context) -> _Reading | None:
    rows = [
        r
        for r in _candidates(criterion, ctx)
        if ctx.in_window(criterion.window, r.when) and r.measurement.value_codes
    ]
    return max(rows, key=lambda r: r.order) if rows else None


def _stage(criterion: CancerStageCriterion, ctx: _Context) -> Tri:
    latest = _latest_coded(criterion, ctx)
    if latest is None:
        return None
    stages = [
        code for system, code in latest.measurement.value_codes if system_of_data(system) == AJCC
    ]
    if not stages:
        return None
    return any(stage_matches(w, s) for w in criterion.stages for s in stages)


def _marker(criterion: MolecularMarkerCriterion, ctx: _Context) -> Tri:
    latest = _latest_coded(criterion, ctx)
    if latest is None:
        return None
    marker = MARKERS[criterion.marker.upper()]
    answers = {make_token(LOINC, a): status for status, codes in marker.answers.items()
               for a in codes}  # fmt: skip
    statuses = {answers[t] for t in latest.measurement.value_tokens if t in answers}
    if criterion.status in statuses:
        return True
    return False if statuses else None


# --------------------------------------------------------------------------- the rest


def evaluate_criterion(criterion: AnyCriterion, ctx: _Context) -> Tri:
    data = ctx.data
    if isinstance(criterion, AllOf):
        return kleene_and([evaluate_criterion(c, ctx) for c in criterion.criteria])
    if isinstance(criterion, AnyOf):
        return kleene_or([evaluate_criterion(c, ctx) for c in criterion.criteria])
    if isinstance(criterion, Not):
        return kleene_not(evaluate_criterion(criterion.criterion, ctx))
    if isinstance(criterion, AgeCriterion):
        if data.birth_date is None:
            return None
        age = age_on(data.birth_date, datetime.fromtimestamp(ctx.t, UTC).date())
        return (criterion.min is None or age >= criterion.min) and (
            criterion.max is None or age <= criterion.max
        )
    if isinstance(criterion, SexCriterion):
        return None if data.sex == "unknown" else data.sex in criterion.values
    if isinstance(criterion, SiteCriterion):
        return None if data.site is None else data.site in criterion.sites
    if isinstance(criterion, RegionCriterion):
        return None if data.region is None else data.region in criterion.regions
    return _event(criterion, ctx)


def walk_criterion(criterion: AnyCriterion) -> list[AnyCriterion]:
    """``criterion`` and every criterion nested in it, depth first."""
    if isinstance(criterion, AllOf | AnyOf):
        return [criterion, *(c for child in criterion.criteria for c in walk_criterion(child))]
    if isinstance(criterion, Not):
        return [criterion, *walk_criterion(criterion.criterion)]
    return [criterion]


def unconvertible(criteria: Sequence[AnyCriterion], ctx: _Context) -> int:
    """Results that the criteria (of one step) read but could not test because their unit
    does not convert to the criterion's (or they have none): distinct (resource key,
    component) with a value, in the criterion's window."""
    skipped: set[tuple[str, int]] = set()
    for criterion in (c for top in criteria for c in walk_criterion(top)):
        if not isinstance(criterion, ObservationCriterion) or criterion.value is None:
            continue
        if criterion.value.unit is None:
            continue
        for reading in _candidates(criterion, ctx):
            if (
                reading.measurement.value is not None
                and ctx.in_window(criterion.window, reading.when)
                and converted(criterion, reading) is None
            ):
                skipped.add((reading.key, reading.index))
    return len(skipped)


def alive(data: PatientData, t: float) -> bool:
    """In the population at ``t``: the patient view's rule (known, alive, born by then)."""
    return data.in_population(t)


def evaluate_patient(
    question: Question, data: PatientData, at: datetime, *, count_unconvertible: bool = True
) -> PatientResult:
    """One patient's result at ``at``. ``count_unconvertible=False`` leaves the per-step counts
    of unconvertible results out (empty): the stream's live cohorts do not publish them."""
    return evaluate_in(_Context(question, data, question.index_instant(at).timestamp()),
                       count_unconvertible)  # fmt: skip


def evaluate_in(ctx: _Context, count_unconvertible: bool = True) -> PatientResult:
    """The patient's result in an evaluation context (its question, data and instant)."""
    question, data, t = ctx.question, ctx.data, ctx.t
    steps: list[Tri] = [
        kleene_or([evaluate_criterion(c, ctx) for c in step.any_of]) for step in question.inclusion
    ]
    steps += [
        kleene_and([evaluate_criterion(c, ctx) for c in step.all_of]) for step in question.exclusion
    ]
    skipped = (
        tuple(
            unconvertible(step.any_of if isinstance(step, InclusionStep) else step.all_of, ctx)
            for step in question.steps
        )
        if count_unconvertible
        else ()
    )
    return PatientResult(alive(data, t), tuple(steps), data.site, data.region, skipped)


class ReferenceEngine:
    name = "reference"

    def evaluate(
        self,
        question: Question,
        population: Population,
        at: datetime,
    ) -> dict[str, PatientResult]:
        """Evaluate every patient of ``population`` (patient -> resource key -> entry)."""
        return {
            patient: evaluate_patient(question, digest(patient, entries), at)
            for patient, entries in population.items()
        }


#: Checked by mypy: the reference engine is a :class:`~.base.QueryEngine`.
_engine: type[QueryEngine] = ReferenceEngine

__all__ = [
    "ReferenceEngine",
    "age_on",
    "alive",
    "any_code",
    "code_matches",
    "evaluate_in",
    "evaluate_patient",
    "qualifying",
    "unconvertible",
    "walk_criterion",
]
