"""The criteria model: what a feasibility question or a saved question asks, as JSON.

The shape follows the structured-query convention: **inclusion** is an AND of steps, each step an
OR of criteria; **exclusion** is an OR of steps, each step an AND of criteria; the cohort is
inclusion AND NOT exclusion. Each step is one line of the attrition funnel. Inside a step,
criteria nest freely with ``all_of`` / ``any_of`` / ``not``.

Every criterion evaluates per patient to TRUE, FALSE or UNKNOWN (no data to decide), with
Kleene's three-valued logic for the connectives. A patient is in the cohort when every inclusion
step is TRUE and no exclusion step is TRUE (with ``exclusion_unknown: "exclude"``, an UNKNOWN
exclusion step also excludes).

Time: every question has an **index instant** T: ``index_date`` (the end of that day, UTC) or,
when absent, the evaluation time ("now", which moves for saved questions). Events after T are
never considered. A window ``{"start": -180, "end": 0}`` keeps events whose date lies in
``[anchor + start days, anchor + end days]`` (both ends inclusive), where the anchor is T or,
with ``"anchor": "<criterion id>"``, the earliest qualifying event of that criterion ("after
diagnosis"). ``{"days_before": 180}`` is shorthand for ``{"start": -180, "end": 0}``.

The model is the single source of truth; engines (:mod:`feasibility.engines`), checks
(:mod:`feasibility.checks`) and rendering (:mod:`feasibility.render`) are separate readers of it.
The JSON schema is versioned by ``schema``: ``concierge.criteria/1``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time
from functools import cached_property
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError

from terminology import ecl

from . import terminology, units

SCHEMA = "concierge.criteria/1"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- codes


class Expansion(_Model):
    """The explicit codes an ECL expression or a ValueSet stood for when the question was
    compiled (:mod:`feasibility.expansion`), and the terminology versions they came from. The
    engines match these codes and nothing else; a saved question keeps them in its record, so
    the stream evaluates exactly what the sponsor was answered with."""

    #: canonical system URI -> codes (normalised, sorted)
    codes: dict[str, list[str]]
    #: The SNOMED CT release the expansion was resolved against (its version URI), if any.
    release: str | None = None
    #: ``url|version`` of the ValueSet expanded, if any.
    valueset: str | None = None
    #: ``expansion``: the ValueSet's own; ``compose`` or ``ecl``: expanded here.
    method: Literal["ecl", "compose", "expansion"]
    warnings: list[str] = Field(default_factory=list)

    def __hash__(self) -> int:  # the engines cache per coded term; dicts do not hash
        return hash(
            (
                self.release,
                self.valueset,
                self.method,
                self.size,
                tuple((s, tuple(c)) for s, c in sorted(self.codes.items())),
            )
        )

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.codes.values())

    @cached_property
    def tokens(self) -> frozenset[str]:
        """The match tokens (:func:`core.codes.token`) of every code."""
        return frozenset(terminology.token(s, c) for s, codes in self.codes.items() for c in codes)


class Code(_Model):
    """A coded term: exactly one of ``code``, ``prefix``, ``range`` (with a system),
    ``concept`` (a named code group from :data:`feasibility.terminology.CONCEPTS`), ``ecl``
    (an Expression Constraint Language expression over SNOMED CT) or ``valueset`` (a FHIR
    ValueSet's canonical URL, with ``version`` optionally). ``ecl`` and ``valueset`` are
    expanded to explicit codes (``expansion``) when the question is compiled; an engine given
    one that was not expanded refuses it."""

    system: str | None = None
    code: str | None = None
    prefix: str | None = None
    range: str | None = Field(default=None, description="Inclusive, e.g. 'E10-E14'")
    concept: str | None = None
    ecl: str | None = Field(
        default=None, description="SNOMED CT ECL, e.g. '<< 73211009 MINUS << 46635009'"
    )
    valueset: str | None = Field(default=None, description="A FHIR ValueSet's canonical URL")
    version: str | None = Field(default=None, description="The ValueSet's version")
    display: str | None = None
    expansion: Expansion | None = Field(
        default=None,
        description="Filled when the question is compiled: what the ecl or valueset stood for",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Code:
        given = [
            n for n in ("code", "prefix", "range", "concept", "ecl", "valueset") if getattr(self, n)
        ]
        if len(given) != 1:
            raise ValueError(
                "a code needs exactly one of code, prefix, range, concept, ecl or valueset"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.version is not None and self.valueset is None:
            raise ValueError("version goes with valueset (a ValueSet's version)")
        if self.expansion is not None and self.ecl is None and self.valueset is None:
            raise ValueError("expansion goes with ecl or valueset")
        if self.valueset is not None:
            if self.system is not None:
                raise ValueError("a valueset names its own systems; leave system out")
            return self
        if self.ecl is not None:
            if self.system is not None and terminology.canonical_system(self.system) != (
                terminology.SNOMED
            ):
                raise ValueError(f"ECL is for SNOMED CT (and dm+d) codes, not {self.system}")
            try:
                ecl.parse(self.ecl)
            except ecl.EclSyntaxError as exc:
                # raised at the expression itself, so its location is the ecl member's
                raise ValidationError.from_exception_data(
                    type(self).__name__,
                    [
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "ecl_syntax",
                                "{message}",
                                {"message": str(exc), "position": exc.position},
                            ),
                            loc=("ecl",),
                            input=self.ecl,
                        )
                    ],
                ) from None
            return self
        if self.concept is not None:
            if self.concept not in terminology.CONCEPTS:
                raise ValueError(
                    f"unknown concept {self.concept!r}; known: "
                    + ", ".join(sorted(terminology.CONCEPTS))
                )
            return self
        if not self.system:
            raise ValueError("a code, prefix or range needs a system (e.g. 'icd10', a URI)")
        system = terminology.canonical_system(self.system)
        if (self.prefix or self.range) and system not in terminology.CLASSIFICATIONS:
            raise ValueError(
                f"prefix and range matching is for ICD-10 and OPCS-4 codes, not {self.system}"
            )
        if self.range is not None:
            low, sep, high = self.range.partition("-")
            lo = terminology.normalise_code(system, low)
            hi = terminology.normalise_code(system, high)
            if not sep or not lo or not hi or len(lo) != len(hi) or lo > hi:
                raise ValueError(
                    f"range {self.range!r} must be 'LOW-HIGH' with bounds of equal length, "
                    "LOW <= HIGH (e.g. 'E10-E14')"
                )
        return self

    @property
    def canonical_system(self) -> str:
        assert self.system is not None
        return terminology.canonical_system(self.system)

    @property
    def needs_expansion(self) -> bool:
        """An ECL or ValueSet term: it matches only through its :attr:`expansion`."""
        return self.ecl is not None or self.valueset is not None

    def expanded_tokens(self) -> frozenset[str]:
        """The match tokens of an ECL or ValueSet term's expansion; :class:`NotExpanded` when
        the question was not compiled (an engine would otherwise match nothing, silently)."""
        if self.expansion is None:
            raise NotExpanded(
                f"{'ECL ' + repr(self.ecl) if self.ecl else 'ValueSet ' + str(self.valueset)} "
                "was not expanded: compile the question first (feasibility.expansion)"
            )
        return self.expansion.tokens


class NotExpanded(RuntimeError):
    """An engine was handed an ECL or ValueSet term without its expansion."""


Codes = Annotated[list[Code], Field(min_length=1)]


# --------------------------------------------------------------------------- time


def _days_before_shorthand(schema: JsonDict) -> None:
    """The schema of a window says what parsing accepts: ``days_before`` too."""
    properties = schema.get("properties")
    if isinstance(properties, dict):
        properties["days_before"] = {
            "type": "integer",
            "minimum": 0,
            "title": "Days Before",
            "description": "Shorthand for start -days_before, end 0 (not with start or end)",
        }


class Window(_Model):
    """Days relative to the anchor (T, or another criterion's first event); None: unbounded."""

    model_config = ConfigDict(json_schema_extra=_days_before_shorthand)

    start: int | None = None
    end: int | None = 0
    anchor: str = "index"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "days_before" in data:
            data = dict(data)
            days = data.pop("days_before")
            if "start" in data or "end" in data:
                raise ValueError("days_before cannot be combined with start/end")
            if not isinstance(days, int) or isinstance(days, bool) or days < 0:
                raise ValueError("days_before must be a non-negative whole number of days")
            data["start"], data["end"] = -days, 0
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError(f"window start ({self.start}) is after its end ({self.end})")
        return self


# --------------------------------------------------------------------------- criteria


def _type_is_required(schema: JsonDict) -> None:
    """``type`` has a default in Python (a criterion built in code knows its kind), but parsing
    JSON needs it to pick the kind (the discriminator): required in the schema, as it is."""
    required = schema.setdefault("required", [])
    if isinstance(required, list) and "type" not in required:
        required.insert(0, "type")


class _Criterion(_Model):
    model_config = ConfigDict(json_schema_extra=_type_is_required)

    #: Names the criterion so a window can be anchored on it.
    id: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    label: str | None = None


class _Events(_Criterion):
    window: Window | None = None
    min_count: int = Field(default=1, ge=1, description="At least this many qualifying records")


class ConditionCriterion(_Events):
    type: Literal["condition"] = "condition"
    codes: Codes
    #: Clinical statuses that count (None: any). Refuted and entered-in-error never count.
    clinical_status: list[str] | None = None


class ValueTest(_Model):
    """Bounds on a numeric value in ``unit`` (UCUM, or an alias :mod:`feasibility.units`
    accepts); values in other units are converted, and those that do not convert are not
    tested (counted per step as unconvertible)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    eq: float | None = None
    unit: str | None = None

    @field_validator("unit")
    @classmethod
    def _ucum(cls, unit: str | None) -> str | None:
        # A unit that does not parse converts from nothing: the step would be UNKNOWN for
        # every patient, an answer that looks like one. Refused instead.
        if unit is not None:
            try:
                units.parse(unit)
            except units.UnitError as exc:
                raise ValueError(f"{exc}; criteria take UCUM units (e.g. 'mmol/L')") from None
        return unit

    @model_validator(mode="after")
    def _some_bound(self) -> ValueTest:
        if all(getattr(self, b) is None for b in ("gt", "ge", "lt", "le", "eq")):
            raise ValueError("a value test needs at least one of gt, ge, lt, le, eq")
        return self

    def passes(self, value: float) -> bool:
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
            and (self.eq is None or value == self.eq)
        )


class ObservationCriterion(_Events):
    """A measurement or coded result. Without a test it asks whether one exists; with a test
    (value, value_codes, interpretation) the test applies to the ``select``-ed observation:
    ``latest`` (default; most recent in the window that can be tested), ``any`` (at least
    ``min_count`` pass), ``min`` / ``max`` (extreme converted value). No testable observation
    in the window: UNKNOWN."""

    type: Literal["observation"] = "observation"
    codes: Codes
    #: Test a component (e.g. systolic 8480-6 of a blood pressure panel) instead of the value.
    component: list[Code] | None = None
    value: ValueTest | None = None
    value_codes: list[Code] | None = None
    #: Interpretation codes (v3-ObservationInterpretation: H, L, N, A, ...).
    interpretation: list[str] | None = None
    select: Literal["latest", "any", "min", "max"] = "latest"

    @model_validator(mode="after")
    def _select_needs_value(self) -> ObservationCriterion:
        if self.select in ("min", "max") and self.value is None:
            raise ValueError(f"select '{self.select}' needs a value test")
        if self.has_test and self.select != "any" and self.min_count > 1:
            raise ValueError(
                f"min_count applies to existence or select 'any', not select '{self.select}'"
            )
        return self

    @model_validator(mode="after")
    def _unit_of_its_kind(self) -> ObservationCriterion:
        """The value test's unit must convert from the unit of at least one of the codes it
        tests (component codes when there are some), where the codes' units are known
        (:data:`feasibility.units.UNIT_BY_LOINC`): ``kg`` for HbA1c is refused. Codes whose
        unit is not known are not checked."""
        unit = self.value.unit if self.value is not None else None
        if unit is None:
            return self
        tested = self.component or self.codes
        known: list[tuple[str, str]] = []
        for term in tested:
            for code in _loinc_codes(term):
                fits = units.suits(unit, code)
                if fits:
                    return self
                if fits is False:
                    known.append((_term_name(term), units.UNIT_BY_LOINC[code]))
        if not known:
            return self
        names = ", ".join(dict.fromkeys(name for name, _ in known))
        reported = " or ".join(dict.fromkeys(unit for _, unit in known))
        message = (
            f"unit {unit!r} does not fit {names}: its results are reported in {reported}, "
            f"which do not convert to {unit!r}"
        )
        # raised as a validation error of the unit itself, so its location is the unit's
        raise ValidationError.from_exception_data(
            type(self).__name__,
            [
                InitErrorDetails(
                    type=PydanticCustomError("unit_kind", "{message}", {"message": message}),
                    loc=("value", "unit"),
                    input=unit,
                )
            ],
        )

    @property
    def has_test(self) -> bool:
        return bool(self.value or self.value_codes or self.interpretation)


def _loinc_codes(term: Code) -> list[str]:
    """The LOINC codes a coded term names (a concept's, or its code), for unit checks."""
    if term.concept is not None:
        return [c for system, c in terminology.CONCEPTS[term.concept].codes if system == LOINC]
    if term.code is not None and term.canonical_system == LOINC:
        return [term.code]
    return []


def _term_name(term: Code) -> str:
    if term.concept is not None:
        return f"{terminology.CONCEPTS[term.concept].display} (concept {term.concept})"
    return f"LOINC {term.code}"


LOINC = terminology.LOINC


class MedicationCriterion(_Events):
    type: Literal["medication"] = "medication"
    codes: Codes
    #: Statuses that count (None: all but entered-in-error, cancelled, not-taken).
    status: list[str] | None = None


class ProcedureCriterion(_Events):
    type: Literal["procedure"] = "procedure"
    codes: Codes
    status: list[str] | None = None


class DeviceCriterion(_Events):
    """Exposure to a device, by type code, manufacturer and/or model (any that is given must
    match; names compare case-insensitively)."""

    type: Literal["device"] = "device"
    device_types: list[Code] | None = None
    manufacturer: list[str] | None = None
    model: list[str] | None = None

    @model_validator(mode="after")
    def _something(self) -> DeviceCriterion:
        if not (self.device_types or self.manufacturer or self.model):
            raise ValueError("a device criterion needs device_types, manufacturer or model")
        return self


class AgeCriterion(_Criterion):
    """Age in completed years at the index instant, bounds inclusive."""

    type: Literal["age"] = "age"
    min: int | None = Field(default=None, ge=0, le=150)
    max: int | None = Field(default=None, ge=0, le=150)

    @model_validator(mode="after")
    def _bounds(self) -> AgeCriterion:
        if self.min is None and self.max is None:
            raise ValueError("an age criterion needs min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"age min ({self.min}) is above max ({self.max})")
        return self


class SexCriterion(_Criterion):
    type: Literal["sex"] = "sex"
    values: Annotated[list[Literal["male", "female", "other"]], Field(min_length=1)]


class SiteCriterion(_Criterion):
    type: Literal["site"] = "site"
    sites: Annotated[list[str], Field(min_length=1)]


class RegionCriterion(_Criterion):
    type: Literal["region"] = "region"
    regions: Annotated[list[str], Field(min_length=1)]


class CancerStageCriterion(_Events):
    """The latest recorded stage group (AJCC) is one of ``stages``; "III" covers IIIA-IIIC."""

    type: Literal["cancer_stage"] = "cancer_stage"
    stages: Annotated[list[str], Field(min_length=1)]

    @model_validator(mode="after")
    def _latest_only(self) -> CancerStageCriterion:
        if self.min_count > 1:
            raise ValueError("min_count does not apply: the latest recorded stage decides")
        return self

    @field_validator("stages")
    @classmethod
    def _known(cls, stages: list[str]) -> list[str]:
        out = []
        for stage in stages:
            s = stage.strip().upper().removeprefix("STAGE ").strip()
            if s not in terminology.STAGES:
                raise ValueError(f"unknown stage {stage!r}; one of {', '.join(terminology.STAGES)}")
            out.append(s)
        return out


class MolecularMarkerCriterion(_Events):
    """The latest result of a marker test (EGFR, KRAS, BRAF, ALK mutation; HER2 expression)."""

    type: Literal["molecular_marker"] = "molecular_marker"
    marker: str
    status: str

    @model_validator(mode="after")
    def _known(self) -> MolecularMarkerCriterion:
        if self.min_count > 1:
            raise ValueError("min_count does not apply: the latest result of the marker decides")
        marker = terminology.MARKERS.get(self.marker.upper())
        if marker is None:
            raise ValueError(
                f"unknown marker {self.marker!r}; one of {', '.join(terminology.MARKERS)}"
            )
        if self.status not in marker.answers:
            raise ValueError(
                f"{marker.name} status must be one of {', '.join(marker.answers)}, "
                f"not {self.status!r}"
            )
        return self


class AllOf(_Criterion):
    type: Literal["all_of"] = "all_of"
    criteria: Annotated[list[Criterion], Field(min_length=1)]


class AnyOf(_Criterion):
    type: Literal["any_of"] = "any_of"
    criteria: Annotated[list[Criterion], Field(min_length=1)]


class Not(_Criterion):
    type: Literal["not"] = "not"
    criterion: Criterion


Criterion = Annotated[
    Union[  # noqa: UP007 (a discriminated union of forward references reads better this way)
        ConditionCriterion,
        ObservationCriterion,
        MedicationCriterion,
        ProcedureCriterion,
        DeviceCriterion,
        AgeCriterion,
        SexCriterion,
        SiteCriterion,
        RegionCriterion,
        CancerStageCriterion,
        MolecularMarkerCriterion,
        AllOf,
        AnyOf,
        Not,
    ],
    Field(discriminator="type"),
]

#: The criteria that read dated records (the classes of :data:`EVENT_TYPES`), for annotations.
EventCriterion = (
    ConditionCriterion
    | ObservationCriterion
    | MedicationCriterion
    | ProcedureCriterion
    | DeviceCriterion
    | CancerStageCriterion
    | MolecularMarkerCriterion
)
#: The event criteria that read observations.
ObservationLike = ObservationCriterion | CancerStageCriterion | MolecularMarkerCriterion
#: Any criterion, for annotations (:data:`Criterion` is the same union with its discriminator,
#: for parsing).
AnyCriterion = (
    EventCriterion
    | AgeCriterion
    | SexCriterion
    | SiteCriterion
    | RegionCriterion
    | AllOf
    | AnyOf
    | Not
)

EVENT_TYPES = (
    ConditionCriterion,
    ObservationCriterion,
    MedicationCriterion,
    ProcedureCriterion,
    DeviceCriterion,
    CancerStageCriterion,
    MolecularMarkerCriterion,
)

AllOf.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()


# --------------------------------------------------------------------------- steps, question


def _wrap_step(data: Any, key: str) -> Any:
    """A step given as a bare criterion becomes a step of one criterion."""
    if isinstance(data, dict) and key not in data and "type" in data:
        return {"criteria_key_": key, key: [data], "label": data.get("label")}
    return data


def _step_or_criterion(
    key: str, core_schema: CoreSchema, handler: GetJsonSchemaHandler, description: str
) -> JsonSchemaValue:
    """A step's schema says what parsing accepts: the step, or a bare criterion (its only
    member); see :func:`_wrap_step`."""
    step = handler(core_schema)
    criterion = handler.resolve_ref_schema(step)["properties"][key]["items"]
    return {"anyOf": [step, criterion], "description": description}


class InclusionStep(_Model):
    """Patients pass when ANY of the criteria is TRUE."""

    label: str | None = None
    any_of: Annotated[list[Criterion], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        data = _wrap_step(data, "any_of")
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "criteria_key_"}
        return data

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return _step_or_criterion(
            "any_of",
            core_schema,
            handler,
            "Patients pass when ANY of the criteria is TRUE; a bare criterion is a step of one.",
        )


class ExclusionStep(_Model):
    """Patients are excluded when ALL of the criteria are TRUE."""

    label: str | None = None
    all_of: Annotated[list[Criterion], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        data = _wrap_step(data, "all_of")
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "criteria_key_"}
        return data

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return _step_or_criterion(
            "all_of",
            core_schema,
            handler,
            "Patients are excluded when ALL of the criteria are TRUE; a bare criterion is a "
            "step of one.",
        )


#: The index dates a question may name. The engines work in POSIX seconds (floats), and an
#: index instant (the day's last microsecond) further from 1970 rounds into the next day: ages
#: and windows would be a day late, and 9999-12-31's rounds into a year that is not (a
#: question dated then answered 500, found probing the API's contract).
FIRST_INDEX_DATE = date(1800, 1, 1)
LAST_INDEX_DATE = date(2199, 12, 31)


#: How deep all_of / any_of / not may nest. Every reader of a saved question parses its record
#: as JSON with a bounded recursion (pydantic's parser), so a deeper question would be accepted
#: and then skipped as unreadable by the registry, the worker and recruitment.
MAX_NESTING = 32


def _nesting(criterion: AnyCriterion) -> int:
    """How many connectives (all_of, any_of, not) deep the criterion goes."""
    if isinstance(criterion, AllOf | AnyOf):
        return 1 + max(_nesting(child) for child in criterion.criteria)
    if isinstance(criterion, Not):
        return 1 + _nesting(criterion.criterion)
    return 0


class Question(_Model):
    """A feasibility question: the criteria of a trial's cohort (all_of/any_of/not nest at
    most 32 deep)."""

    schema_: Literal["concierge.criteria/1"] = Field(default="concierge.criteria/1", alias="schema")
    title: str | None = None
    description: str | None = None
    #: The index date (its end, UTC). None: the evaluation time.
    index_date: date | None = Field(
        default=None,
        ge=FIRST_INDEX_DATE,
        le=LAST_INDEX_DATE,
        description="The date criteria are evaluated at (its end, UTC), 1800-01-01 to "
        "2199-12-31; none: the time of asking",
    )
    inclusion: Annotated[list[InclusionStep], Field(min_length=1)]
    exclusion: list[ExclusionStep] = Field(default_factory=list)
    #: Whether an exclusion step that is UNKNOWN keeps the patient (default) or excludes them.
    exclusion_unknown: Literal["keep", "exclude"] = "keep"

    @model_validator(mode="after")
    def _not_too_deep(self) -> Question:
        steps: list[tuple[str, int, list[AnyCriterion]]] = [
            *(("inclusion", n, list(step.any_of)) for n, step in enumerate(self.inclusion)),
            *(("exclusion", n, list(step.all_of)) for n, step in enumerate(self.exclusion)),
        ]
        for kind, n, criteria in steps:
            deepest = max(_nesting(criterion) for criterion in criteria)
            if deepest > MAX_NESTING:
                raise ValueError(
                    f"{kind} step {n} nests all_of/any_of/not {deepest} deep; at most {MAX_NESTING}"
                )
        return self

    @model_validator(mode="after")
    def _anchors(self) -> Question:
        ids: dict[str, Any] = {}
        for criterion in iter_criteria(self):
            if criterion.id is not None:
                if criterion.id in ids:
                    raise ValueError(f"criterion id {criterion.id!r} is used twice")
                ids[criterion.id] = criterion
        for criterion in iter_criteria(self):
            window = getattr(criterion, "window", None)
            if window is None or window.anchor == "index":
                continue
            anchor = ids.get(window.anchor)
            if anchor is None:
                raise ValueError(
                    f"window anchor {window.anchor!r} names no criterion "
                    f"(ids: {', '.join(sorted(ids)) or 'none'})"
                )
            if not isinstance(anchor, EVENT_TYPES):
                raise ValueError(f"window anchor {window.anchor!r} must be an event criterion")
            if anchor is criterion:
                raise ValueError(f"criterion {window.anchor!r} is anchored on itself")
            anchor_window = getattr(anchor, "window", None)
            if anchor_window is not None and anchor_window.anchor != "index":
                raise ValueError(
                    f"anchor {window.anchor!r} is itself anchored; anchors must be one level"
                )
        return self

    @property
    def steps(self) -> list[InclusionStep | ExclusionStep]:
        return [*self.inclusion, *self.exclusion]

    def index_instant(self, evaluation_time: datetime) -> datetime:
        """T: the end of ``index_date`` (UTC) or the evaluation time."""
        if self.index_date is None:
            if evaluation_time.tzinfo is None:
                return evaluation_time.replace(tzinfo=UTC)
            return evaluation_time.astimezone(UTC)
        return datetime.combine(self.index_date, time.max, UTC)  # the day's last instant

    def to_json(self) -> str:
        # None is meaningful (an open window end), so it is written out
        return self.model_dump_json(by_alias=True)


def iter_criteria(question: Question) -> list[AnyCriterion]:
    """Every criterion in the question, depth first, in order."""
    out: list[AnyCriterion] = []

    def walk(criterion: AnyCriterion) -> None:
        out.append(criterion)
        if isinstance(criterion, AllOf | AnyOf):
            for child in criterion.criteria:
                walk(child)
        elif isinstance(criterion, Not):
            walk(criterion.criterion)

    for step in question.inclusion:
        for criterion in step.any_of:
            walk(criterion)
    for xstep in question.exclusion:
        for criterion in xstep.all_of:
            walk(criterion)
    return out


def step_label(step: InclusionStep | ExclusionStep, index: int) -> str:
    if step.label:
        return step.label
    criteria = step.any_of if isinstance(step, InclusionStep) else step.all_of
    first = criteria[0]
    name = first.label or first.type.replace("_", " ")
    joiner = " or " if isinstance(step, InclusionStep) else " and "
    more = f"{joiner}{len(criteria) - 1} more" if len(criteria) > 1 else ""
    kind = "include" if isinstance(step, InclusionStep) else "exclude"
    return f"{index + 1}. {kind}: {name}{more}"


_QUESTION = TypeAdapter(Question)


class CriteriaError(ValueError):
    """Malformed criteria, with one readable line per problem (``errors``: ``loc``, the
    model's path; ``pointer``, a JSON pointer into the criteria as given; ``msg``)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__(
            "invalid criteria:\n"
            + "\n".join(
                f"  {e['loc'] or '(root)'}: {e['msg']}"
                + (f" (at {e['pointer']})" if e.get("pointer") else "")
                for e in errors
            )
        )


def json_pointer(body: Any, loc: Sequence[str | int]) -> str:
    """The JSON pointer (RFC 6901) into ``body`` of a validation error at ``loc``.

    The model's path and the body differ where the model adds what the body leaves out: the
    discriminator of a criterion (``...any_of.0.observation.value``) and the step around a
    bare criterion (``inclusion.0.any_of.0`` for ``inclusion[0] = {"type": ...}``). Those
    parts are skipped; a missing member named last is kept (it is what is missing)."""
    parts: list[str] = []
    node = body
    for n, part in enumerate(loc):
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        if in_list or in_dict:
            node = node[part]
        elif not (
            isinstance(node, dict)
            and n == len(loc) - 1
            and isinstance(part, str)
            and part != node.get("type")
            and part not in ("any_of", "all_of")
        ):
            continue  # a part the model adds (else: a missing member, pointed at)
        parts.append(str(part).replace("~", "~0").replace("/", "~1"))
    return "".join(f"/{p}" for p in parts)


def criteria_errors(
    errors: Sequence[Mapping[str, Any]], body: Any, prefix: Sequence[str | int] = ()
) -> list[dict[str, Any]]:
    """Pydantic's errors for criteria in ``body`` as :class:`CriteriaError` lines: ``loc``
    without ``prefix`` (where the criteria sit in a request), ``pointer`` into ``body``."""
    out = []
    for e in errors:
        loc = list(e["loc"])
        if loc[: len(prefix)] == list(prefix):
            loc = loc[len(prefix) :]
        out.append(
            {
                "loc": ".".join(str(p) for p in loc),
                "pointer": json_pointer(body, loc),
                "msg": str(e["msg"]).removeprefix("Value error, "),
            }
        )
    return out


def parse_question(data: str | bytes | dict[str, Any]) -> Question:
    """Parse criteria JSON (text or an object); raises :class:`CriteriaError`."""
    try:
        if isinstance(data, str | bytes):
            return _QUESTION.validate_json(data)
        return _QUESTION.validate_python(data)
    except ValidationError as exc:
        body: Any = data
        if isinstance(data, str | bytes):
            try:
                body = json.loads(data)
            except ValueError:
                body = None
        raise CriteriaError(criteria_errors(exc.errors(), body)) from None


def json_schema() -> dict[str, Any]:
    return _QUESTION.json_schema(by_alias=True)


__all__ = [
    "FIRST_INDEX_DATE",
    "LAST_INDEX_DATE",
    "MAX_NESTING",
    "SCHEMA",
    "AgeCriterion",
    "AllOf",
    "AnyCriterion",
    "AnyOf",
    "CancerStageCriterion",
    "Code",
    "ConditionCriterion",
    "CriteriaError",
    "Criterion",
    "DeviceCriterion",
    "EventCriterion",
    "ExclusionStep",
    "Expansion",
    "InclusionStep",
    "MedicationCriterion",
    "MolecularMarkerCriterion",
    "Not",
    "NotExpanded",
    "ObservationCriterion",
    "ObservationLike",
    "ProcedureCriterion",
    "Question",
    "RegionCriterion",
    "SexCriterion",
    "SiteCriterion",
    "ValueTest",
    "Window",
    "criteria_errors",
    "iter_criteria",
    "json_pointer",
    "json_schema",
    "parse_question",
    "step_label",
]
