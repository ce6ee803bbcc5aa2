"""Device surveillance: each patient's contribution to the device counters, as pure functions.

A patient's view (:mod:`core.patient_view`: the one fold of the patient's live resources, which
the stream keeps per patient, see :mod:`.store`) determines everything the device counters need
from that patient; codes are compared through the one code normaliser (:mod:`core.codes`):

* :func:`exposures`: one :class:`Exposure` per device the patient carries, merged from Device,
  DeviceUseStatement/DeviceUsage and implant/revision Procedure facts, placed in the device
  hierarchy (class, manufacturer, model, lot) with implant and explant dates, site and region;
* :func:`outcomes`: the :class:`Outcome` events attributed to those exposures, from adverse events
  naming the device and from :class:`OutcomeDefinition` rules over conditions and procedures in a
  window after implant;
* :func:`contribution`: the whole, canonical :class:`Contribution` of the patient: the multiset of
  counter keys it adds one to, its person-time per node, and the provenance behind every key.

Nothing here increments anything. The stream keeps, per patient, the last contribution and applies
``diff(old, new)`` to the aggregate :class:`Counters`; since a contribution is a function of the
patient's state alone, and that state is an idempotent fold of the facts topic, a replay, a
duplicate, an out-of-order version or a restart produces the same contribution again and a zero
diff: the counters equal :meth:`Counters.rebuild` over the current state at every moment
(``docs/explanation/device-surveillance.md``).

Person-time is kept in a form that does not depend on the evaluation time: closed exposures add
their length in days, open ones add one to a count and their start day to a sum, so the exposure
time of a node at any day ``t`` is ``closed + count * t - sum`` (:class:`PersonTime`). Time passing
therefore changes no contribution, and no timer has to revisit every exposed patient every day.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from core.codes import ICD10, OPCS4, SNOMED, code_of
from core.contracts.devices import (
    STRATUM_PARTS,
    UNKNOWN_STRATUM,
    ZERO_TIME,
    Contribution,
    CounterKey,
    PersonTime,
    TimeKey,
    age_band,
    stratum_of,
    stratum_parts,
)
from core.patient_view import (
    Demographics,
    DeviceExposure,
    PatientView,
    Source,
    build_view,
)

__all__ = [
    "DEFAULT_DEVICE_CLASSES",
    "DEFAULT_OUTCOMES",
    "EXPOSED",
    "ICD10",
    "LEVELS",
    "METHODS",
    "OPCS4",
    "OTHER",
    "SNOMED",
    "STRATIFIERS",
    "STRATUM_PARTS",
    "UNKNOWN",
    "UNKNOWN_STRATUM",
    "WINDOW_MARK",
    "Contribution",
    "CounterKey",
    "Counters",
    "Delta",
    "DeviceClass",
    "Exposure",
    "Outcome",
    "OutcomeDefinition",
    "PatientState",
    "PersonTime",
    "Source",
    "TimeKey",
    "code",
    "contribution",
    "device_classes_from_json",
    "diff",
    "exposures",
    "node_path",
    "outcome_definitions_from_json",
    "outcomes",
    "parse_node",
    "period_matches",
    "project_stratum",
    "quarter",
    "stratum_parts",
    "view_of",
    "window_outcome",
]

#: Levels of the device hierarchy, from the root down. A node is the path of its first n levels.
LEVELS: tuple[str, ...] = ("class", "manufacturer", "model", "lot")
#: The "outcome" of the denominator keys: one per exposure.
EXPOSED = "exposed"
#: Stands in for a missing hierarchy value, period or site.
UNKNOWN = "unknown"
#: The class of a device whose type matches no :class:`DeviceClass`.
OTHER = "other"

Code = tuple[str, str]

_FACT_KINDS = frozenset({"condition", "procedure", "adverse_event"})
#: Statuses that mean the thing did not (yet) happen or was recorded in error.
_NOT_EXPOSED = frozenset({"entered-in-error", "intended", "not-done"})
_NOT_PERFORMED = frozenset({"entered-in-error", "not-done", "preparation"})
_NOT_A_DIAGNOSIS = frozenset({"refuted", "entered-in-error"})


# --------------------------------------------------------------------------- codes and dates


def code(system: str, value: str) -> Code:
    """A coding as ``(system, code)``, normalised by the one code normaliser
    (:mod:`core.codes`): system aliases and URIs (the NHS OPCS-4 URI, ICD-10-UK, ...) resolve to
    the canonical system, and ICD-10 and OPCS-4 codes compare without dots, upper case (``T84.5``
    and ``t845`` are the same code)."""
    return code_of(system, value.strip())


def _tokens(codes: Iterable[Code]) -> frozenset[str]:
    """Match tokens (:func:`core.codes.token`) of normalised codes: what the patient view's
    items carry."""
    return frozenset(f"{system}|{value}" for system, value in codes)


def _code_set(items: Iterable[Code | str]) -> frozenset[Code]:
    out: set[Code] = set()
    for item in items:
        if isinstance(item, str):
            system, sep, value = item.rpartition("|")
            if not sep or not system or not value:
                raise ValueError(f"a code must be 'system|code' or (system, code), got {item!r}")
            out.add(code(system, value))
        else:
            system, value = item
            out.add(code(system, value))
    return frozenset(out)


def _instant(value: object) -> datetime | None:
    """A fact's date-time as an aware UTC datetime (naive values are taken as UTC)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time())
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _cutoff(as_of: date | datetime | None) -> datetime | None:
    """The exclusive upper bound of what is known at ``as_of`` (a date means its end)."""
    if as_of is None:
        return None
    if isinstance(as_of, datetime):
        moment = _instant(as_of)
        assert moment is not None
        return moment + timedelta(microseconds=1)
    return datetime.combine(as_of + timedelta(days=1), time(), UTC)


def _known(moment: datetime | None, cutoff: datetime | None) -> bool:
    return cutoff is None or moment is None or moment < cutoff


def quarter(moment: date | datetime | None) -> str:
    """The calendar quarter of a date, e.g. ``"2023Q1"``; ``"unknown"`` for ``None``."""
    if moment is None:
        return UNKNOWN
    return f"{moment.year}Q{(moment.month - 1) // 3 + 1}"


def period_matches(spec: str | Collection[str] | None, period: str) -> bool:
    """Whether a period (a quarter such as ``"2023Q1"``) is selected by ``spec``.

    ``None`` selects everything; ``"2023Q1"`` one quarter; ``"2023"`` a year; ``"2023Q1.."``,
    ``"..2024Q4"`` and ``"2023Q1..2024Q4"`` ranges (inclusive; ranges never select ``unknown``);
    a collection of quarters selects its members.
    """
    if spec is None:
        return True
    if isinstance(spec, str):
        if ".." in spec:
            if period == UNKNOWN:
                return False
            low, _, high = spec.partition("..")
            return (not low or period >= low) and (not high or period <= high)
        if len(spec) == 4 and spec.isdigit():
            return period.startswith(spec + "Q")
        return period == spec
    return period in spec


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


def _unescape(part: str) -> str:
    return part.replace("%2F", "/").replace("%25", "%")


def node_path(*parts: str | None) -> str:
    """The node of a hierarchy path: ``"hip/Orthomedica/Acetabulon X2"`` (``/`` in a name is
    escaped as ``%2F``; a missing value is ``unknown``)."""
    return "/".join(_escape(part if part else UNKNOWN) for part in parts)


def parse_node(node: str) -> tuple[str, tuple[str, ...]]:
    """``(level, parts)`` of a node path; the level follows from the number of parts."""
    parts = tuple(_unescape(part) for part in node.split("/"))
    if not node or len(parts) > len(LEVELS):
        raise ValueError(
            f"a node is 1 to {len(LEVELS)} '/'-separated parts ({', '.join(LEVELS)}), got {node!r}"
        )
    return LEVELS[len(parts) - 1], parts


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DeviceClass:
    """One device class of the hierarchy's first level, recognised by the device's type code
    (SNOMED CT) or, for a device only known from procedures, by its implant or revision codes.

    Implant codes date the start of an exposure; revision (explant, replacement) codes on a later
    procedure naming the device end it.
    """

    name: str
    type_codes: frozenset[Code]
    implant_codes: frozenset[Code] = frozenset()
    revision_codes: frozenset[Code] = frozenset()
    #: the same codes as match tokens (derived)
    type_tokens: frozenset[str] = field(init=False, repr=False, compare=False)
    implant_tokens: frozenset[str] = field(init=False, repr=False, compare=False)
    revision_tokens: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a device class name must be non-empty without '/': {self.name!r}")
        for name in ("type", "implant", "revision"):
            codes = _code_set(getattr(self, f"{name}_codes"))
            object.__setattr__(self, f"{name}_codes", codes)
            object.__setattr__(self, f"{name}_tokens", _tokens(codes))


def _class(
    name: str, snomed_type: str, implant: tuple[str, str], revision: tuple[str, str]
) -> DeviceClass:
    return DeviceClass(
        name,
        frozenset({code(SNOMED, snomed_type)}),
        frozenset({code(OPCS4, implant[0]), code(SNOMED, implant[1])}),
        frozenset({code(OPCS4, revision[0]), code(SNOMED, revision[1])}),
    )


#: The default class table (codes as in ``docs/reference/synthetic-population.md``). The insulin
#: pump's replacement has the same codes as its initiation: the first such procedure starts the
#: exposure, a later one ends it.
DEFAULT_DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    _class("hip", "304120007", ("W37.1", "52734007"), ("W37.3", "179344006")),
    _class("knee", "304121006", ("W40.1", "609588000"), ("W40.3", "443682002")),
    _class("pacemaker", "14106009", ("K60.1", "307280005"), ("K60.6", "233180008")),
    _class("insulin_pump", "69805005", ("X50.9", "225286007"), ("X50.9", "225286007")),
)


@dataclass(frozen=True)
class OutcomeDefinition:
    """A rule that turns facts into an outcome of an exposure.

    * ``name``: the outcome's name in the counters. Several definitions may share a name (e.g. one
      per class): an exposure has the outcome when any of them matches.
    * ``codes``: ``(system, code)`` pairs or ``"system|code"`` strings; empty means any code,
      which only adverse events may use.
    * ``kinds``: fact kinds it reads, among ``condition``, ``procedure``, ``adverse_event``.
    * ``device_class``: a class name or names the outcome applies to (``None``: every class).
    * ``window_days``: the outcome must fall in ``(implant, implant + window_days]`` (``None``:
      any time after implant). Without a device named by the fact the outcome must also fall
      before the exposure's end.
    * ``method``: the sequential test the monitor runs live on the outcome: ``poisson`` (the
      Poisson MaxSPRT against the comparator's adjusted expectation, the default), ``binomial``
      (the binomial MaxSPRT of a self-controlled risk interval: events in ``risk_window``
      against events in ``control_window`` of the same exposures, both in days after implant,
      inclusive) or ``cusum`` (the risk-adjusted Bernoulli CUSUM by implant quarter).
    """

    name: str
    codes: Collection[Code | str] = frozenset()
    kinds: Collection[str] = frozenset({"condition"})
    device_class: str | Collection[str] | None = None
    window_days: int | None = None
    method: str = "poisson"
    risk_window: tuple[int, int] | None = None
    control_window: tuple[int, int] | None = None
    #: the codes as match tokens (derived)
    tokens: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or self.name == EXPOSED:
            raise ValueError(f"an outcome name must be non-empty and not {EXPOSED!r}")
        object.__setattr__(self, "codes", _code_set(self.codes))
        object.__setattr__(self, "tokens", _tokens(self.code_set))
        kinds = frozenset(self.kinds)
        if not kinds or not kinds <= _FACT_KINDS:
            raise ValueError(
                f"kinds must be a non-empty subset of {sorted(_FACT_KINDS)}, got {sorted(kinds)}"
            )
        object.__setattr__(self, "kinds", kinds)
        if not self.codes and kinds != {"adverse_event"}:
            raise ValueError(f"{self.name!r}: only adverse-event outcomes may match any code")
        if isinstance(self.device_class, str):
            object.__setattr__(self, "device_class", frozenset({self.device_class}))
        elif self.device_class is not None:
            object.__setattr__(self, "device_class", frozenset(self.device_class))
        if self.window_days is not None and self.window_days < 0:
            raise ValueError(f"{self.name!r}: window_days must be >= 0")
        if WINDOW_MARK in self.name:
            raise ValueError(f"an outcome name may not contain {WINDOW_MARK!r}: {self.name!r}")
        if self.method not in METHODS:
            raise ValueError(f"{self.name!r}: method must be one of {', '.join(METHODS)}")
        for which in ("risk_window", "control_window"):
            window = getattr(self, which)
            if window is None:
                continue
            first, last = (int(x) for x in window)
            if not 0 <= first <= last:
                raise ValueError(
                    f"{self.name!r}: {which} must be [first, last] days, 0 <= first <= last"
                )
            object.__setattr__(self, which, (first, last))
        if self.method == "binomial":
            if self.risk_window is None or self.control_window is None:
                raise ValueError(f"{self.name!r}: the binomial method needs both windows")
            risk, control = self.risk_window, self.control_window
            if not (risk[1] < control[0] or control[1] < risk[0]):
                raise ValueError(f"{self.name!r}: the risk and control windows overlap")

    @property
    def z(self) -> float | None:
        """Control window length over risk window length (the binomial MaxSPRT's ``z``)."""
        if self.risk_window is None or self.control_window is None:
            return None
        risk = self.risk_window[1] - self.risk_window[0] + 1
        control = self.control_window[1] - self.control_window[0] + 1
        return control / risk

    def window_of(self, days: int) -> str | None:
        """``risk`` or ``control``: the window a day after implant falls in (binomial only)."""
        if self.method != "binomial":
            return None
        for name, window in (("risk", self.risk_window), ("control", self.control_window)):
            if window is not None and window[0] <= days <= window[1]:
                return name
        return None

    @property
    def code_set(self) -> frozenset[Code]:
        return cast(frozenset[Code], self.codes)  # normalised in __post_init__

    @property
    def classes(self) -> frozenset[str] | None:
        return None if self.device_class is None else frozenset(self.device_class)

    def applies_to(self, device_class: str) -> bool:
        classes = self.classes
        return classes is None or device_class in classes

    def matches(self, kind: str, tokens: frozenset[str]) -> bool:
        """Whether a record of ``kind`` with these match tokens is this outcome."""
        return kind in self.kinds and (not self.codes or bool(self.tokens & tokens))


_THREE_YEARS = 3 * 365
#: Sequential tests an outcome definition can choose (:attr:`OutcomeDefinition.method`).
METHODS: tuple[str, ...] = ("poisson", "binomial", "cusum")
#: Joins an outcome's name and a self-controlled window in a counter key
#: (``"device infection@risk"``): the binomial MaxSPRT's cases and controls.
WINDOW_MARK = "@"


#: Marks an outcome counted from free text (:class:`core.contracts.facts.TextFindingFact`): a
#: candidate outcome, counted apart from the coded one (``"device infection (from text)"``).
FROM_TEXT = " (from text)"
#: The record kind of a device problem read from text.
TEXT = "text"


def text_outcome(name: str) -> str:
    """The counter key's outcome for candidate events of ``name`` read from free text."""
    return f"{name}{FROM_TEXT}"


def from_text(outcome: str) -> bool:
    """Whether an outcome name counts device problems read from text (not coded outcomes)."""
    return outcome.split(WINDOW_MARK, 1)[0].endswith(FROM_TEXT)


def window_outcome(name: str, window: str) -> str:
    """The counter key's outcome for events of ``name`` in a window (``risk`` or ``control``)."""
    return f"{name}{WINDOW_MARK}{window}"


#: The default outcome definitions (see ``docs/explanation/device-surveillance.md``).
DEFAULT_OUTCOMES: tuple[OutcomeDefinition, ...] = (
    OutcomeDefinition("adverse event", kinds={"adverse_event"}),
    OutcomeDefinition(
        "hip revision within 1 year",
        codes={code(OPCS4, "W37.3"), code(SNOMED, "179344006")},
        kinds={"procedure"},
        device_class="hip",
        window_days=365,
    ),
    OutcomeDefinition(
        "knee revision within 1 year",
        codes={code(OPCS4, "W40.3"), code(SNOMED, "443682002")},
        kinds={"procedure"},
        device_class="knee",
        window_days=365,
    ),
    OutcomeDefinition(
        "device infection",
        codes={code(ICD10, "T84.5")},
        kinds={"condition", "adverse_event"},
        device_class={"hip", "knee"},
        window_days=_THREE_YEARS,
    ),
    OutcomeDefinition(
        "device infection",
        codes={code(ICD10, "T82.7")},
        kinds={"condition", "adverse_event"},
        device_class="pacemaker",
        window_days=_THREE_YEARS,
    ),
    OutcomeDefinition(
        "device infection",
        codes={code(ICD10, "T85.7")},
        kinds={"condition", "adverse_event"},
        device_class="insulin_pump",
        window_days=_THREE_YEARS,
    ),
    OutcomeDefinition(
        "pacemaker lead failure",
        codes={code(ICD10, "T82.1")},
        kinds={"condition", "adverse_event"},
        device_class="pacemaker",
        window_days=_THREE_YEARS,
    ),
    OutcomeDefinition(
        "joint mechanical complication",
        codes={code(ICD10, "T84.0")},
        kinds={"condition", "adverse_event"},
        device_class={"hip", "knee"},
        window_days=_THREE_YEARS,
    ),
    OutcomeDefinition(
        "insulin pump malfunction",
        codes={code(ICD10, "T85.6")},
        kinds={"condition", "adverse_event"},
        device_class="insulin_pump",
        window_days=_THREE_YEARS,
    ),
)


def outcome_definitions_from_json(
    document: Sequence[Mapping[str, Any]],
) -> tuple[OutcomeDefinition, ...]:
    """Definitions from plain objects (e.g. a JSON file):
    ``[{"name", "codes": ["system|code", ...], "kinds", "device_class", "window_days",
    "method", "risk_window": [first, last], "control_window": [first, last]}]``."""
    return tuple(
        OutcomeDefinition(
            name=str(item["name"]),
            codes=[str(c) for c in item.get("codes", ())],
            kinds=[str(k) for k in item.get("kinds", ("condition",))],
            device_class=item.get("device_class"),
            window_days=item.get("window_days"),
            method=str(item.get("method", "poisson")),
            risk_window=_window(item.get("risk_window")),
            control_window=_window(item.get("control_window")),
        )
        for item in document
    )


def _window(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    first, last = value
    return (int(first), int(last))


def device_classes_from_json(document: Sequence[Mapping[str, Any]]) -> tuple[DeviceClass, ...]:
    """Classes from plain objects: ``[{"name", "type_codes": ["system|code", ...],
    "implant_codes": [...], "revision_codes": [...]}]``."""
    return tuple(
        DeviceClass(
            name=str(item["name"]),
            type_codes=_code_set(str(c) for c in item.get("type_codes", ())),
            implant_codes=_code_set(str(c) for c in item.get("implant_codes", ())),
            revision_codes=_code_set(str(c) for c in item.get("revision_codes", ())),
        )
        for item in document
    )


# --------------------------------------------------------------------------- provenance


# ``Source`` (one resource version behind a count) is the patient view's provenance
# (:class:`core.patient_view.Source`), re-exported here.


# --------------------------------------------------------------------------- exposures


@dataclass(frozen=True)
class Exposure:
    """A patient's exposure to one device, placed in the device hierarchy."""

    patient: str
    device: str  # reference key of the Device resource
    device_class: str
    manufacturer: str | None
    model: str | None
    lot: str | None
    udi: str | None
    start: datetime | None
    end: datetime | None
    site: str | None
    region: str | None
    sources: tuple[Source, ...]
    #: the patient's sex and age in whole years at implant (the stratum of indirect
    #: standardisation; ``None`` without a birth date or an implant date)
    sex: str = "unknown"
    age: int | None = None

    @property
    def stratum(self) -> str:
        """Age band at implant, sex and region: ``"65-74|female|London"``."""
        return stratum_of(age_band(self.age), self.sex, self.region or UNKNOWN)

    @property
    def period(self) -> str:
        """Calendar quarter of the implant (``unknown`` without a start date)."""
        return quarter(self.start)

    @property
    def site_key(self) -> str:
        return self.site or UNKNOWN

    def nodes(self) -> tuple[tuple[str, str], ...]:
        """``(level, node)`` for each level of the hierarchy, root first."""
        parts = (self.device_class, self.manufacturer, self.model, self.lot)
        return tuple((LEVELS[i], node_path(*parts[: i + 1])) for i in range(len(LEVELS)))


@dataclass
class _Evidence:
    descriptions: list[tuple[int, str, DeviceExposure]] = field(default_factory=list)
    starts: list[datetime] = field(default_factory=list)
    ends: list[datetime] = field(default_factory=list)
    procedures: list[tuple[datetime | None, frozenset[str], Source]] = field(default_factory=list)
    sources: set[Source] = field(default_factory=set)


_DESCRIPTION_PRIORITY = {"device": 0, "use_statement": 1, "usage": 1}

#: What the device functions read of a patient: their view, or their state entries (``resource
#: key -> entry``), which are read through the view.
PatientState = PatientView | Mapping[str, Mapping[str, Any]]


def view_of(patient: str, state: PatientState) -> PatientView:
    """The patient view of ``state`` (built with :func:`core.patient_view.build_view` from
    state entries)."""
    return state if isinstance(state, PatientView) else build_view(patient, state)


def _patient_place(
    demographics: Demographics | None,
) -> tuple[str | None, str | None, Source | None]:
    """Site (ODS code), region (None for "Unknown") and provenance of the patient's
    demographics, by the patient view's one rule."""
    if demographics is None:
        return None, None, None
    return demographics.site, demographics.region, demographics.source


def _coded(tokens: frozenset[str]) -> bool:
    """Whether any token has both a system and a code."""
    return any(not t.startswith("|") and not t.endswith("|") for t in tokens)


def _classify(
    descriptions: Sequence[DeviceExposure],
    procedure_codes: frozenset[str],
    classes: Sequence[DeviceClass],
) -> DeviceClass | None:
    """The class of the first description (in source priority) whose type codes name one; for a
    device without type codes, the class of its procedures' implant or revision codes."""
    typed = False
    for description in descriptions:
        type_codes = description.tokens
        typed = typed or _coded(type_codes)
        for device_class in classes:
            if device_class.type_tokens & type_codes:
                return device_class
    if not typed:
        for device_class in classes:
            if (device_class.implant_tokens | device_class.revision_tokens) & procedure_codes:
                return device_class
    return None


def _first(descriptions: Sequence[DeviceExposure], name: str) -> str | None:
    for description in descriptions:
        value = getattr(description, name)
        if value not in (None, ""):
            return str(value)
    return None


def exposures(
    patient: str,
    entries: PatientState,
    *,
    classes: Sequence[DeviceClass] = DEFAULT_DEVICE_CLASSES,
    as_of: date | datetime | None = None,
) -> list[Exposure]:
    """One exposure per distinct device key named by the patient's live device-exposure records
    (Device, DeviceUseStatement, DeviceUsage) or procedures (``focalDevice``), read from the
    patient view (``entries``: the view, or state entries read through it).

    * Hierarchy values come from the Device resource's facts first, then from use statements.
    * Class: the first class whose type codes the device has; for a device without type codes, the
      class whose implant or revision codes a procedure on it has; otherwise ``other``.
    * Start: the earliest exposure-fact start or implant-coded procedure (a device with neither
      takes its earliest procedure that is not a revision). End: the earliest exposure-fact end or
      revision-coded procedure after the start.
    * Site and region: the patient view's demographics (one rule for every consumer).
    * ``as_of`` cuts off what is known: an exposure starting later is left out, a later end is
      treated as still open. Retracted resources contribute nothing.
    """
    view = view_of(patient, entries)
    cutoff = _cutoff(as_of)
    site, region, place_source = _patient_place(view.demographics)
    birth = view.demographics.birth_date if view.demographics else None
    sex = view.demographics.sex if view.demographics else UNKNOWN
    evidence: dict[str, _Evidence] = {}
    for exposure_item in view.exposures:
        if exposure_item.status in _NOT_EXPOSED or not exposure_item.device:
            continue
        source = exposure_item.source
        assert source is not None
        item = evidence.setdefault(exposure_item.device, _Evidence())
        priority = _DESCRIPTION_PRIORITY.get(str(exposure_item.origin), 2)
        item.descriptions.append((priority, source.resource, exposure_item))
        start, end = exposure_item.at, exposure_item.end
        if start is not None:
            item.starts.append(start)
        if end is not None:
            item.ends.append(end)
        item.sources.add(source)
    for procedure in view.procedures:
        if procedure.status in _NOT_PERFORMED or not procedure.devices:
            continue
        source = procedure.source
        assert source is not None
        performed = procedure.at
        for key in procedure.devices:
            item = evidence.setdefault(key, _Evidence())
            item.procedures.append((performed, procedure.tokens, source))
    found: list[Exposure] = []
    for key, item in evidence.items():
        exposure = _exposure(
            patient, key, item, classes, cutoff, site, region, place_source, sex or UNKNOWN, birth
        )
        if exposure is not None:
            found.append(exposure)
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(found, key=lambda e: (e.start or far, e.device))


def _age(birth: date | None, at: datetime | None) -> int | None:
    """Whole years from birth to ``at`` (``None`` when either is missing)."""
    if birth is None or at is None:
        return None
    day = at.date()
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _exposure(
    patient: str,
    key: str,
    item: _Evidence,
    classes: Sequence[DeviceClass],
    cutoff: datetime | None,
    site: str | None,
    region: str | None,
    place_source: Source | None,
    sex: str = UNKNOWN,
    birth: date | None = None,
) -> Exposure | None:
    descriptions = [d for _, _, d in sorted(item.descriptions, key=lambda t: (t[0], t[1]))]
    procedure_codes = frozenset(c for _, codes, _ in item.procedures for c in codes)
    device_class = _classify(descriptions, procedure_codes, classes)
    implant = device_class.implant_tokens if device_class else frozenset()
    revision = device_class.revision_tokens if device_class else frozenset()
    implants = sorted(
        (when, s.resource) for when, codes, s in item.procedures if when and codes & implant
    )
    # The implant itself never ends the exposure, even when revisions share its codes (pumps).
    implant_resource = implants[0][1] if implants else None
    starts = list(item.starts) + [when for when, _ in implants]
    if not starts:
        starts = [when for when, codes, _ in item.procedures if when and not codes & revision]
    start = min(starts) if starts else None
    if start is not None and not _known(start, cutoff):
        return None  # not implanted yet at as_of
    ends = list(item.ends)
    ends += [
        when
        for when, codes, s in item.procedures
        if when
        and codes & revision
        and s.resource != implant_resource
        and (start is None or when > start)
    ]
    ends = [when for when in ends if _known(when, cutoff) and (start is None or when >= start)]
    end = min(ends) if ends else None
    sources = set(item.sources)
    sources.update(s for when, _, s in item.procedures if _known(when, cutoff))
    if not sources:
        return None
    if place_source is not None:
        sources.add(place_source)
    return Exposure(
        patient=patient,
        device=key,
        device_class=device_class.name if device_class else OTHER,
        manufacturer=_first(descriptions, "manufacturer"),
        model=_first(descriptions, "model"),
        lot=_first(descriptions, "lot"),
        udi=_first(descriptions, "udi"),
        start=start,
        end=end,
        site=site,
        region=region,
        sources=tuple(sorted(sources)),
        sex=sex,
        age=_age(birth, start),
    )


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """An outcome counted against one exposure."""

    name: str
    device: str  # the exposure's device key
    date: datetime | None
    kind: str  # condition, procedure, adverse_event or text (read from a note: a candidate)
    #: ``device``: the fact names the device; ``window``: by class and window after implant
    #: (when the patient has several such exposures, each of them gets the outcome).
    attribution: str
    source: Source


#: ``(kind, date, tokens, named device keys, source)`` of a record that may be an outcome
_OutcomeRecord = tuple[str, datetime | None, frozenset[str], tuple[str, ...], Source]


def _outcome_records(view: PatientView) -> list[_OutcomeRecord]:
    """The patient's records that may be outcomes, in resource-key order: conditions (not
    refuted or in error), procedures (performed), actual adverse events naming a device, and
    device problems read from text (candidates)."""
    found: list[tuple[str, int, _OutcomeRecord]] = []
    for condition in view.conditions:
        if condition.verification_status in _NOT_A_DIAGNOSIS:
            continue
        assert condition.source is not None
        record: _OutcomeRecord = ("condition", condition.at, condition.tokens, (), condition.source)
        found.append((condition.key, condition.index, record))
    for procedure in view.procedures:
        if procedure.status in _NOT_PERFORMED:
            continue
        assert procedure.source is not None
        record = ("procedure", procedure.at, procedure.tokens, procedure.devices, procedure.source)
        found.append((procedure.key, procedure.index, record))
    for event in view.adverse_events:
        if event.status != "actual" or not event.suspect_devices:
            continue  # a device outcome names its device
        assert event.source is not None
        record = ("adverse_event", event.at, event.tokens, event.suspect_devices, event.source)
        found.append((event.key, event.index, record))
    for finding in view.text_findings:
        assert finding.source is not None
        record = (TEXT, finding.at, finding.tokens, finding.devices, finding.source)
        found.append((finding.key, finding.index, record))
    found.sort(key=lambda t: (t[0], t[1]))
    return [record for _, _, record in found]


def _in_window(
    when: datetime | None, exposure: Exposure, window_days: int | None, named: bool
) -> bool:
    start = exposure.start
    if when is None or start is None:
        return named and window_days is None
    if when <= start:
        return False
    if window_days is not None and when > start + timedelta(days=window_days):
        return False
    return named or exposure.end is None or when <= exposure.end


def outcomes(
    patient: str,
    entries: PatientState,
    exposures: Sequence[Exposure],
    definitions: Sequence[OutcomeDefinition] = DEFAULT_OUTCOMES,
    *,
    as_of: date | datetime | None = None,
) -> list[Outcome]:
    """The patient's outcomes, each attributed to the exposure(s) it belongs to, read from the
    patient view (``entries``: the view, or state entries read through it).

    A fact that names devices (a procedure's ``focalDevice``, an adverse event's suspect device)
    counts for those devices only; a condition counts for the patient's exposures of the
    definition's classes whose window holds its date. Only actual adverse events that name a
    device count. Outcomes dated after ``as_of`` are left out.
    """
    view = view_of(patient, entries)
    cutoff = _cutoff(as_of)
    by_device = {e.device: e for e in exposures}
    found: dict[tuple[str, str, str], Outcome] = {}
    for kind, when, codes, named, source in _outcome_records(view):
        if not _known(when, cutoff):
            continue
        for definition in definitions:
            if kind == TEXT:
                # a problem read from text is the outcome its codes name, whatever kind of fact
                # the definition reads, counted under its own name
                if not definition.tokens & codes:
                    continue
                name = text_outcome(definition.name)
            elif definition.matches(kind, codes):
                name = definition.name
            else:
                continue
            if named:
                candidates = [by_device[k] for k in named if k in by_device]
            else:
                candidates = list(exposures)
            for exposure in candidates:
                if not definition.applies_to(exposure.device_class):
                    continue
                if not _in_window(when, exposure, definition.window_days, bool(named)):
                    continue
                key = (name, exposure.device, source.resource)
                found.setdefault(
                    key,
                    Outcome(
                        name=name,
                        device=exposure.device,
                        date=when,
                        kind=kind,
                        attribution="device" if named else "window",
                        source=source,
                    ),
                )
    return [found[k] for k in sorted(found)]


def contribution(
    patient: str,
    entries: PatientState,
    definitions: Sequence[OutcomeDefinition] = DEFAULT_OUTCOMES,
    as_of: date | datetime | None = None,
    *,
    classes: Sequence[DeviceClass] = DEFAULT_DEVICE_CLASSES,
) -> Contribution:
    """The patient's whole contribution to the device counters: a pure function of its patient
    view (``entries``: the view, or its live resources ``resource key -> entry`` read through
    it), the definitions and ``as_of`` (``None``: everything known counts, the stream's
    choice)."""
    view = view_of(patient, entries)
    found = exposures(patient, view, classes=classes, as_of=as_of)
    events = outcomes(patient, view, found, definitions, as_of=as_of)
    windowed = {d.name: d for d in definitions if d.method == "binomial"}
    keys: list[CounterKey] = []
    sources: dict[CounterKey, set[Source]] = {}
    person_time: dict[TimeKey, PersonTime] = {}
    days: list[int] = []
    for exposure in found:
        mine = [o for o in events if o.device == exposure.device]
        names = sorted({o.name for o in mine})
        if windowed and exposure.start is not None:
            names = sorted(names + _windows(exposure, mine, windowed))
        period, site, stratum = exposure.period, exposure.site_key, exposure.stratum
        for level, node in exposure.nodes():
            exposed: CounterKey = (level, node, EXPOSED, period, site, stratum)
            keys.append(exposed)
            sources.setdefault(exposed, set()).update(exposure.sources)
            for name in names:
                key: CounterKey = (level, node, name, period, site, stratum)
                keys.append(key)
                bucket = sources.setdefault(key, set())
                bucket.update(exposure.sources)
                plain = name.split(WINDOW_MARK, 1)[0]
                bucket.update(o.source for o in mine if o.name == plain)
            if exposure.start is not None:
                time_key: TimeKey = (level, node, period, site, stratum)
                spent = PersonTime.of(exposure.start, exposure.end)
                person_time[time_key] = person_time.get(time_key, ZERO_TIME) + spent
        days.extend(d.date().toordinal() for d in (exposure.start, exposure.end) if d)
        days.extend(o.date.date().toordinal() for o in mine if o.date)
    return Contribution(
        patient=patient,
        keys=tuple(sorted(keys)),
        person_time=tuple(sorted(person_time.items())),
        sources=tuple((k, tuple(sorted(v))) for k, v in sorted(sources.items())),
        latest=max(days) if days else None,
    )


def _windows(
    exposure: Exposure, mine: Sequence[Outcome], windowed: Mapping[str, OutcomeDefinition]
) -> list[str]:
    """The self-controlled window keys of an exposure: for each binomial outcome, the window
    (risk or control) its first event falls in, if any."""
    assert exposure.start is not None
    found = []
    for name, definition in windowed.items():
        days = sorted(
            (o.date - exposure.start).days for o in mine if o.name == name and o.date is not None
        )
        window = definition.window_of(days[0]) if days else None
        if window is not None:
            found.append(window_outcome(name, window))
    return found


# --------------------------------------------------------------------------- diffs and counters


@dataclass(frozen=True)
class Delta:
    """What replacing a patient's contribution changes: ``counts`` is the ``key -> +/-n`` diff
    of the counter keys; ``person_time`` and ``latest`` (a multiset of days) change alongside."""

    patient: str
    counts: dict[CounterKey, int]
    person_time: dict[TimeKey, PersonTime]
    latest: dict[int, int]

    def __bool__(self) -> bool:
        return bool(self.counts or self.person_time or self.latest)


def diff(old: Contribution | None, new: Contribution | None) -> Delta:
    """``new - old`` (either may be ``None``: a patient's first contribution, or its removal)."""
    if new is not None:
        patient = new.patient
    elif old is not None:
        patient = old.patient
    else:
        raise ValueError("diff needs at least one contribution")
    if old is not None and new is not None and old.patient != new.patient:
        raise ValueError(f"cannot diff contributions of {old.patient!r} and {new.patient!r}")
    counts: Counter[CounterKey] = Counter(new.keys if new else ())
    counts.subtract(old.keys if old else ())
    time_delta: dict[TimeKey, PersonTime] = dict(new.person_time) if new else {}
    for key, spent in old.person_time if old else ():
        time_delta[key] = time_delta.get(key, ZERO_TIME) - spent
    latest: Counter[int] = Counter()
    if new is not None and new.latest is not None:
        latest[new.latest] += 1
    if old is not None and old.latest is not None:
        latest[old.latest] -= 1
    return Delta(
        patient=patient,
        counts={k: v for k, v in sorted(counts.items()) if v},
        person_time={k: v for k, v in sorted(time_delta.items()) if v},
        latest={k: v for k, v in sorted(latest.items()) if v},
    )


def _select(value: str, spec: str | Collection[str] | None) -> bool:
    if spec is None:
        return True
    if isinstance(spec, str):
        return value == spec
    return value in spec


class Counters:
    """Aggregate device counters: counts per key, person-time per node, and per key the patients
    counted (pseudonyms, with multiplicity) so every count can be traced to its patients and,
    through their contributions, to resource versions.

    Only :meth:`apply` changes it; :meth:`rebuild` builds it from contributions. Applying a delta
    that would make anything negative raises (a diff applied twice, or against the wrong base).
    """

    def __init__(self) -> None:
        self.counts: dict[CounterKey, int] = {}
        self.person_time: dict[TimeKey, PersonTime] = {}
        self._patients: dict[CounterKey, dict[str, int]] = {}
        self._latest: dict[int, int] = {}
        # (level, node, outcome) -> (period, site, stratum) -> count; (level, node) -> ... -> time
        self._by_node: dict[tuple[str, str, str], dict[tuple[str, str, str], int]] = {}
        self._time_by_node: dict[tuple[str, str], dict[tuple[str, str, str], PersonTime]] = {}
        # a version per (level, node), moved by every change to it: the stratified sums over all
        # periods and sites are cached against it (the live assessments ask for them repeatedly)
        self._versions: dict[tuple[str, str], int] = {}
        self._cache: dict[tuple[Any, ...], tuple[int, Any]] = {}

    @classmethod
    def rebuild(cls, contributions: Iterable[Contribution]) -> Counters:
        """Counters from scratch: the sum of the contributions."""
        counters = cls()
        for item in contributions:
            counters.apply(diff(None, item))
        return counters

    def apply(self, delta: Delta) -> None:
        for key, change in delta.counts.items():
            self._check(self.counts.get(key, 0) + change >= 0, key)
            holders = self._patients.get(key, {})
            self._check(holders.get(delta.patient, 0) + change >= 0, key, delta.patient)
        for time_key, spent in delta.person_time.items():
            total = self.person_time.get(time_key, ZERO_TIME) + spent
            self._check(total.closed_days >= 0 and total.open_count >= 0, time_key)
        for day, change in delta.latest.items():
            self._check(self._latest.get(day, 0) + change >= 0, ("latest", day))
        for key, change in delta.counts.items():
            _bump(self.counts, key, change)
            holders = self._patients.setdefault(key, {})
            _bump(holders, delta.patient, change)
            if not holders:
                del self._patients[key]
            level, node, outcome, period, site, stratum = key
            cell = self._by_node.setdefault((level, node, outcome), {})
            _bump(cell, (period, site, stratum), change)
            if not cell:
                del self._by_node[(level, node, outcome)]
            self._versions[(level, node)] = self._versions.get((level, node), 0) + 1
        for time_key, spent in delta.person_time.items():
            level, node, period, site, stratum = time_key
            _add_time(self.person_time, time_key, spent)
            cells = self._time_by_node.setdefault((level, node), {})
            _add_time(cells, (period, site, stratum), spent)
            if not cells:
                del self._time_by_node[(level, node)]
            self._versions[(level, node)] = self._versions.get((level, node), 0) + 1
        for day, change in delta.latest.items():
            _bump(self._latest, day, change)

    def update(self, old: Contribution | None, new: Contribution | None) -> Delta:
        """Apply ``diff(old, new)`` and return it (the stream's one call per patient change)."""
        delta = diff(old, new)
        self.apply(delta)
        return delta

    @staticmethod
    def _check(ok: bool, *where: object) -> None:
        if not ok:
            raise ValueError(
                f"applying this delta would make {where!r} negative: it was applied twice, "
                "or against a different previous contribution"
            )

    # ------------------------------------------------------------------ queries

    def count(
        self,
        level: str,
        node: str,
        outcome: str,
        period: str | Collection[str] | None = None,
        site: str | Collection[str] | None = None,
    ) -> int:
        """Exposures of a node (``outcome="exposed"``) or those with an outcome, optionally for
        implant periods (see :func:`period_matches`) and sites."""
        if period is None and site is None:
            return sum(self.stratified(level, node, outcome, by=()).values())
        cells = self._by_node.get((level, node, outcome), {})
        return sum(
            n for (p, s, _), n in cells.items() if period_matches(period, p) and _select(s, site)
        )

    def person_days(
        self,
        level: str,
        node: str,
        at: date | datetime,
        period: str | Collection[str] | None = None,
        site: str | Collection[str] | None = None,
    ) -> int:
        """Person-days of exposure of a node at day ``at``."""
        if period is None and site is None:
            return sum(t.days(at) for t in self.stratified_time(level, node, by=()).values())
        cells = self._time_by_node.get((level, node), {})
        total = ZERO_TIME
        for (p, s, _), spent in cells.items():
            if period_matches(period, p) and _select(s, site):
                total = total + spent
        return total.days(at)

    def _cached(self, key: tuple[Any, ...], level: str, node: str, compute: Any) -> Any:
        version = self._versions.get((level, node), 0)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = compute()
        self._cache[key] = (version, value)
        return value

    def stratified(
        self,
        level: str,
        node: str,
        outcome: str,
        period: str | Collection[str] | None = None,
        site: str | Collection[str] | None = None,
        by: Sequence[str] = ("age", "sex"),
    ) -> dict[tuple[str, ...], int]:
        """:meth:`count` per stratum, the stratum projected on the parts ``by`` (of ``age``,
        ``sex``, ``region`` and ``site``; ``()``: one stratum, the total)."""
        parts = tuple(by)

        def compute() -> dict[tuple[str, ...], int]:
            out: dict[tuple[str, ...], int] = {}
            for (p, s, stratum), n in self._by_node.get((level, node, outcome), {}).items():
                if period_matches(period, p) and _select(s, site):
                    key = project_stratum(stratum, s, parts)
                    out[key] = out.get(key, 0) + n
            return out

        if period is None and site is None:
            return cast(
                dict[tuple[str, ...], int],
                self._cached(("n", level, node, outcome, parts), level, node, compute),
            )
        return compute()

    def stratified_time(
        self,
        level: str,
        node: str,
        period: str | Collection[str] | None = None,
        site: str | Collection[str] | None = None,
        by: Sequence[str] = ("age", "sex"),
    ) -> dict[tuple[str, ...], PersonTime]:
        """Person-time per stratum (see :meth:`stratified`); ``.days(at)`` of each value gives
        its person-days."""
        parts = tuple(by)

        def compute() -> dict[tuple[str, ...], PersonTime]:
            out: dict[tuple[str, ...], PersonTime] = {}
            for (p, s, stratum), spent in self._time_by_node.get((level, node), {}).items():
                if period_matches(period, p) and _select(s, site):
                    key = project_stratum(stratum, s, parts)
                    out[key] = out.get(key, ZERO_TIME) + spent
            return out

        if period is None and site is None:
            return cast(
                dict[tuple[str, ...], PersonTime],
                self._cached(("t", level, node, parts), level, node, compute),
            )
        return compute()

    def patients(self, key: CounterKey) -> tuple[str, ...]:
        """Pseudonyms of the patients counted in a key (drill-down)."""
        return tuple(sorted(self._patients.get(key, {})))

    def patients_of(
        self,
        level: str,
        node: str,
        outcome: str,
        period: str | Collection[str] | None = None,
        site: str | Collection[str] | None = None,
    ) -> tuple[str, ...]:
        """Pseudonyms behind :meth:`count` with the same arguments."""
        found: set[str] = set()
        for p, s, stratum in self._by_node.get((level, node, outcome), {}):
            if period_matches(period, p) and _select(s, site):
                found.update(self._patients.get((level, node, outcome, p, s, stratum), {}))
        return tuple(sorted(found))

    def periods(self, level: str, node: str) -> list[str]:
        """Implant periods with exposures of a node, sorted."""
        return sorted({p for p, _, _ in self._by_node.get((level, node, EXPOSED), {})})

    def sites(self, level: str, node: str) -> list[str]:
        """Sites with exposures of a node, sorted."""
        return sorted({s for _, s, _ in self._by_node.get((level, node, EXPOSED), {})})

    def nodes(self, level: str | None = None) -> list[tuple[str, str]]:
        """``(level, node)`` of every node with exposures, sorted."""
        return sorted(
            (lv, node)
            for (lv, node, outcome) in self._by_node
            if outcome == EXPOSED and (level is None or lv == level)
        )

    def outcome_names(self, level: str | None = None, node: str | None = None) -> list[str]:
        """Outcome names counted (anywhere, or for one node)."""
        return sorted(
            {
                outcome
                for (lv, nd, outcome) in self._by_node
                if outcome != EXPOSED
                and WINDOW_MARK not in outcome
                and (level is None or lv == level)
                and (node is None or nd == node)
            }
        )

    @property
    def latest_day(self) -> date | None:
        """The latest date any counted contribution used (the default evaluation day)."""
        return date.fromordinal(max(self._latest)) if self._latest else None

    def to_dict(self) -> dict[str, Any]:
        """A canonical plain snapshot (sorted; zero entries dropped)."""
        return {
            "counts": [[list(k), v] for k, v in sorted(self.counts.items())],
            "person_time": [[list(k), v.to_list()] for k, v in sorted(self.person_time.items())],
            "patients": [[list(k), sorted(v.items())] for k, v in sorted(self._patients.items())],
            "latest": sorted(self._latest.items()),
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Counters):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


#: The parts a stratum can be projected on: the contribution's own (age band, sex, region) and
#: the counter key's site.
STRATIFIERS: tuple[str, ...] = (*STRATUM_PARTS, "site")


def project_stratum(stratum: str, site: str, by: Sequence[str]) -> tuple[str, ...]:
    """The values of the parts ``by`` (see :data:`STRATIFIERS`) of a stratum and its site."""
    if not by:
        return ()
    parts = stratum_parts(stratum)
    parts["site"] = site
    return tuple(parts[name] for name in by)


def _bump(table: dict[Any, int], key: Any, change: int) -> None:
    value = table.get(key, 0) + change
    if value:
        table[key] = value
    else:
        table.pop(key, None)


def _add_time(table: dict[Any, PersonTime], key: Any, spent: PersonTime) -> None:
    value = table.get(key, ZERO_TIME) + spent
    if value:
        table[key] = value
    else:
        table.pop(key, None)
