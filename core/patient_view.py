"""The patient view: the one fold of a patient's facts that every engine and counter reads.

A patient's facts arrive as versions of resources (``concierge.facts/1`` envelopes, see
``core/contracts/facts.py``; here as plain JSON objects: ``seq``, ``retracted``, ``facts``,
``provenance``). Per resource key the version with the highest ``seq`` counts; a retracted
version is a tombstone (its resource contributes nothing). :class:`PatientView` is what the live
versions mean, typed and normalised once:

* **demographics** (:class:`Demographics`), by one rule: the first patient fact of the *latest*
  live Patient version, latest by ``(provenance.last_updated, seq, resource key)``; a version
  without ``last_updated`` ranks below every dated one (``ingested_at`` is not part of the
  state: two ingestions of the same data must give the same view). Birth, sex, death, site
  (the ODS code as the fact knew it, never a reference key: :func:`patient_site`), the
  managing organisation's key, GP practice and GPs all come from that one fact. **Region
  "Unknown" is not a region**: it (and an empty region) is ``None`` everywhere, which criteria
  read as UNKNOWN and counters as ``unknown``;
* **records**: conditions, observations, medications, procedures, device exposures, adverse
  events and consents, each a typed item with its codes as match tokens
  (:func:`core.codes.token`), its date as epoch microseconds and seconds (UTC; naive times are
  UTC), and its provenance (:class:`Source`: resource key, type, id, version, ``seq``,
  ``last_updated``). Items are in resource-key order, then fact order within a resource.

The fold is built two ways that give the same view (a property test holds them to it):
in batch (:func:`build_view` from the stream's state shape ``resource key -> entry``,
:func:`view_of_envelopes` from envelopes in any order, replays included) and per event
(:class:`PatientFold`, which the stream worker keeps per patient: it parses only the changed
resource and assembles the view when asked). :func:`parse_resource` is the per-resource half,
which the columnar snapshot reads resource by resource. See ``docs/explanation/architecture.md``.

This module is shared core: it imports nothing of the domain packages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar, dataclass_transform

from .codes import token

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, eq_default=True, order_default=False)
def record(cls: type[_T] | None = None, /, *, order: bool = False) -> Any:
    """``@record`` to the type checker; at run time a slotted
    dataclass with a hash but without the frozen ``__init__``.

    Why: the patient view is built for every resource the stream and the snapshot read, and a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, which made
    item construction about four times slower (measured: 9 vs 2 microseconds for a 9-field
    item) and the snapshot build twice as slow as before the view existed. Immutability is kept
    where it matters, in review: mypy reports any assignment to a field (``frozen_default``),
    and items stay hashable and comparable as before.
    """

    def wrap(klass: type[_T]) -> type[_T]:
        return dataclass(slots=True, eq=True, unsafe_hash=True, order=order)(klass)

    return wrap if cls is None else wrap(cls)


Tokens = frozenset[str]
_EMPTY: Tokens = frozenset()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Rank of a version without ``last_updated`` (below every real instant).
_UNDATED = -(2**63)


# --------------------------------------------------------------------------- parsing


def _us_of(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@lru_cache(maxsize=262_144)
def _parse_us(text: str) -> int:
    return _us_of(datetime.fromisoformat(text))


def epoch_us(value: Any) -> int | None:
    """Epoch microseconds of an ISO date-time, ``datetime`` or ``date`` (UTC when no offset;
    a date is its midnight), or None for a missing value."""
    if not value:
        return None
    if isinstance(value, str):
        return _parse_us(value)
    if isinstance(value, datetime):
        return _us_of(value)
    if isinstance(value, date):
        return _us_of(datetime(value.year, value.month, value.day))
    raise TypeError(f"not a date-time: {value!r}")


def seconds(us: int | None) -> float | None:
    """Float epoch seconds of epoch microseconds, exactly ``datetime.timestamp()`` (a correctly
    rounded ``us / 10**6``)."""
    return None if us is None else us / 1_000_000


def instant(us: int | None) -> datetime | None:
    """The aware UTC datetime of epoch microseconds."""
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def epoch(value: Any) -> float | None:
    """Epoch seconds of an ISO date-time (UTC when no offset), or None."""
    return seconds(epoch_us(value))


def _birth(value: Any) -> date | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


#: One shared frozenset per single token: most codings hold one code, and the same few codes
#: recur across millions of records (an HbA1c, a diagnosis), so sharing the set saves both the
#: allocation per record and the memory of every view and snapshot row that keeps it.
_SINGLE: dict[str, Tokens] = {}
_SINGLE_MAX = 1_000_000


def tokens(codings: Iterable[Mapping[str, Any]] | None) -> Tokens:
    """Match tokens of a list of codings (see :func:`core.codes.token`)."""
    if not codings:
        return _EMPTY
    if isinstance(codings, list) and len(codings) == 1:
        c = codings[0]
        tok = token(c.get("system"), str(c.get("code", "")))
        found = _SINGLE.get(tok)
        if found is None:
            if len(_SINGLE) >= _SINGLE_MAX:
                _SINGLE.clear()
            found = _SINGLE[tok] = frozenset((tok,))
        return found
    return frozenset([token(c.get("system"), str(c.get("code", ""))) for c in codings])


def interpretation_codes(codings: Iterable[Mapping[str, Any]] | None) -> frozenset[str]:
    return frozenset(str(c.get("code", "")) for c in codings or ())


def patient_site(fact: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(ODS code, organisation key)`` of a patient fact given as a plain object: the one
    reading of a patient's site. Facts written before ``site_key`` existed hold the
    organisation's key in ``site`` when it was unknown at ingestion: that is a key, not an ODS
    code."""
    site, key = fact.get("site"), fact.get("site_key")
    if isinstance(site, str) and "|Organization|" in site:
        return None, key if isinstance(key, str) else site
    return (site if isinstance(site, str) and site else None), (
        key if isinstance(key, str) and key else None
    )


def region_of(value: Any) -> str | None:
    """A patient's region: ``None`` for a missing, empty or ``"Unknown"`` region."""
    return value if isinstance(value, str) and value and value != "Unknown" else None


# --------------------------------------------------------------------------- provenance


@record(order=True)
class Source:
    """One version of one resource whose facts were used: enough to fetch it again."""

    resource: str  # resource key: source|Type|id
    resource_type: str
    resource_id: str
    version: str
    seq: int
    last_updated: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "version": self.version,
            "seq": self.seq,
            "last_updated": self.last_updated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Source:
        return cls(
            resource=str(data["resource"]),
            resource_type=str(data["resource_type"]),
            resource_id=str(data["resource_id"]),
            version=str(data["version"]),
            seq=int(data["seq"]),
            last_updated=data.get("last_updated"),
        )


def source_of(key: str, entry: Mapping[str, Any]) -> Source:
    """The :class:`Source` of a resource version (type and id from the key when the provenance
    lacks them)."""
    provenance = entry.get("provenance") or {}
    updated = provenance.get("last_updated")
    if isinstance(updated, datetime):
        updated = updated.isoformat()
    resource_type = provenance.get("resource_type")
    resource_id = provenance.get("resource_id")
    if not resource_type or not resource_id:
        parts = key.split("|")
        resource_type = resource_type or (parts[-2] if len(parts) > 2 else "")
        resource_id = resource_id or parts[-1]
    return Source(
        resource=key,
        resource_type=str(resource_type),
        resource_id=str(resource_id),
        version=str(provenance.get("version", "")),
        seq=int(entry.get("seq", 0)),
        last_updated=None if updated is None else str(updated),
    )


# --------------------------------------------------------------------------- items


@record
class Demographics:
    """A patient's demographics, from one patient fact (see the module docstring's rule)."""

    birth_date: date | None
    sex: str
    deceased: bool
    deceased_us: int | None
    #: ODS code of the site as the fact knew it (never a reference key).
    site: str | None
    #: Reference key of the managing organisation (readers resolve it to a site).
    site_key: str | None
    #: ``None`` for "Unknown".
    region: str | None
    gp_practice: str | None
    general_practitioners: tuple[str, ...]
    #: ``provenance.last_updated`` of the version, epoch microseconds (None: undated).
    effective_us: int | None
    source: Source
    #: position of the fact in its resource
    index: int = 0

    @property
    def deceased_at(self) -> float | None:
        return seconds(self.deceased_us)

    @property
    def rank(self) -> tuple[int, int, str]:
        """The order "latest" is taken in: ``(last_updated, seq, resource key)``."""
        effective = _UNDATED if self.effective_us is None else self.effective_us
        return (effective, self.source.seq, self.source.resource)


@record
class Event:
    """A dated record of one resource: what event criteria and counters read."""

    key: str
    #: epoch seconds (float, exactly ``datetime.timestamp()``) and microseconds of its date
    when: float | None
    status: str | None
    tokens: Tokens
    when_us: int | None = None
    source: Source | None = None
    #: position of the fact in its resource
    index: int = 0

    @property
    def at(self) -> datetime | None:
        """The date as an aware UTC datetime."""
        return instant(self.when_us)


@record
class Condition(Event):
    """``when`` is the onset, else the recorded date."""

    clinical_status: str | None = None
    verification_status: str | None = None


@record
class Measurement:
    """The value part of an observation or of one of its components."""

    tokens: Tokens
    value: float | None
    unit: str | None
    value_tokens: Tokens
    value_codes: tuple[tuple[str, str], ...]  # (system, code) as recorded, for stages
    interpretation: frozenset[str]

    @property
    def has_value(self) -> bool:
        return self.value is not None or bool(self.value_codes) or bool(self.interpretation)


_NO_MEASUREMENT = Measurement(_EMPTY, None, None, _EMPTY, (), frozenset())


@record
class Observation(Event):
    """``when`` is the effective date; ``result`` the observation's own value (even when empty),
    ``components`` its components' values."""

    result: Measurement = _NO_MEASUREMENT
    components: tuple[Measurement, ...] = ()

    @property
    def measurement(self) -> Measurement | None:
        """The observation's own value, or None when it records none."""
        return self.result if self.result.has_value else None


@record
class Medication(Event):
    """``when`` is the start."""


@record
class Procedure(Event):
    """``when`` is the performed date; ``devices`` the keys of devices it manipulated."""

    devices: tuple[str, ...] = ()


@record
class DeviceExposure(Event):
    """``when`` is the start, ``tokens`` the device's type codes."""

    device: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    lot: str | None = None
    udi: str | None = None
    end_us: int | None = None
    #: ``device``, ``use_statement`` or ``usage``
    origin: str | None = None

    @property
    def end(self) -> datetime | None:
        return instant(self.end_us)


@record
class AdverseEvent(Event):
    """``when`` is the event's date, ``status`` its actuality."""

    suspect_devices: tuple[str, ...] = ()


@record
class TextFinding(Event):
    """A device problem read from free text (``from_text``): ``when`` is the text's date,
    ``status`` the problem category, ``tokens`` the outcome codes it stands for, ``devices`` the
    keys of devices its resource names, ``element`` and ``start``/``end`` where the words are."""

    devices: tuple[str, ...] = ()
    element: str = ""
    start: int = 0
    end: int = 0


@record
class Consent(Event):
    research_opt_out: bool = False


# --------------------------------------------------------------------------- resources


@record
class ResourceVersion:
    """One version of one resource, parsed: the unit the view is assembled from."""

    key: str
    seq: int
    retracted: bool
    patients: tuple[Demographics, ...] = ()
    conditions: tuple[Condition, ...] = ()
    observations: tuple[Observation, ...] = ()
    medications: tuple[Medication, ...] = ()
    procedures: tuple[Procedure, ...] = ()
    exposures: tuple[DeviceExposure, ...] = ()
    adverse_events: tuple[AdverseEvent, ...] = ()
    text_findings: tuple[TextFinding, ...] = ()
    consents: tuple[Consent, ...] = ()


def _measurement(fact: Mapping[str, Any], codes: Tokens | None = None) -> Measurement:
    """The value part of an observation fact or of a component (``codes``: its tokens, when
    the caller has them already)."""
    value = fact.get("value")
    value_codes = fact.get("value_codes")
    interpretation = fact.get("interpretation")
    unit = fact.get("unit")
    if value is None and not value_codes and not interpretation and unit is None:
        # nothing measured (a coded-only observation): one shared empty value part per code set
        return _bare(tokens(fact.get("codes")) if codes is None else codes)
    return Measurement(
        tokens=tokens(fact.get("codes")) if codes is None else codes,
        value=float(value) if value is not None else None,
        unit=unit,
        value_tokens=tokens(value_codes),
        value_codes=tuple((str(c.get("system") or ""), str(c.get("code", ""))) for c in value_codes)
        if value_codes
        else (),
        interpretation=interpretation_codes(interpretation) if interpretation else _EMPTY,
    )


_BARE: dict[Tokens, Measurement] = {}


def _bare(codes: Tokens) -> Measurement:
    found = _BARE.get(codes)
    if found is None:
        if len(_BARE) >= _SINGLE_MAX:
            _BARE.clear()
        found = _BARE[codes] = Measurement(codes, None, None, _EMPTY, (), _EMPTY)
    return found


def _keys(values: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in values or ())


def parse_resource(key: str, entry: Mapping[str, Any]) -> ResourceVersion:
    """One resource version (``seq``, ``retracted``, ``facts``, ``provenance``) as typed items.
    A retracted version has no items."""
    seq = int(entry.get("seq", 1))
    retracted = bool(entry.get("retracted"))
    facts = entry.get("facts")
    if retracted or not facts:
        return ResourceVersion(key, seq, retracted)
    source = source_of(key, entry)
    out: dict[str, list[Any]] = {}
    for index, fact in enumerate(facts):
        if not isinstance(fact, Mapping):
            continue
        kind = fact.get("kind")
        if kind == "observation":
            when_us = epoch_us(fact.get("effective"))
            codes = tokens(fact.get("codes"))
            components = fact.get("components")
            item: Any = Observation(
                key,
                seconds(when_us),
                fact.get("status"),
                codes,
                when_us,
                source,
                index,
                result=_measurement(fact, codes),
                components=tuple(_measurement(c) for c in components) if components else (),
            )
            name = "observations"
        elif kind == "condition":
            # ``onset or recorded``: an onset at epoch 0 falls through to recorded
            when_us = epoch_us(fact.get("onset")) or epoch_us(fact.get("recorded"))
            item = Condition(
                key,
                seconds(when_us),
                fact.get("clinical_status"),
                tokens(fact.get("codes")),
                when_us,
                source,
                index,
                clinical_status=fact.get("clinical_status"),
                verification_status=fact.get("verification_status"),
            )
            name = "conditions"
        elif kind == "medication":
            when_us = epoch_us(fact.get("start"))
            item = Medication(
                key, seconds(when_us), fact.get("status"), tokens(fact.get("codes")), when_us,
                source, index,
            )  # fmt: skip
            name = "medications"
        elif kind == "procedure":
            when_us = epoch_us(fact.get("performed"))
            item = Procedure(
                key, seconds(when_us), fact.get("status"), tokens(fact.get("codes")), when_us,
                source, index, devices=_keys(fact.get("devices")),
            )  # fmt: skip
            name = "procedures"
        elif kind == "device_exposure":
            device = fact.get("device") or {}
            when_us = epoch_us(fact.get("start"))
            device_key = device.get("device")
            item = DeviceExposure(
                key,
                seconds(when_us),
                fact.get("status"),
                tokens(device.get("type_codes")),
                when_us,
                source,
                index,
                device=str(device_key) if device_key else None,
                manufacturer=device.get("manufacturer"),
                model=device.get("model"),
                lot=device.get("lot"),
                udi=device.get("udi"),
                end_us=epoch_us(fact.get("end")),
                origin=fact.get("source"),
            )
            name = "exposures"
        elif kind == "adverse_event":
            when_us = epoch_us(fact.get("date"))
            item = AdverseEvent(
                key,
                seconds(when_us),
                fact.get("actuality"),
                tokens(fact.get("codes")),
                when_us,
                source,
                index,
                suspect_devices=tuple(
                    str(d["device"])
                    for d in fact.get("suspect_devices") or ()
                    if isinstance(d, Mapping) and d.get("device")
                ),
            )
            name = "adverse_events"
        elif kind == "text_finding":
            when_us = epoch_us(fact.get("date"))
            item = TextFinding(
                key, seconds(when_us), fact.get("problem"), tokens(fact.get("codes")), when_us,
                source, index, devices=_keys(fact.get("devices")),
                element=str(fact.get("element") or ""),
                start=int(fact.get("start") or 0), end=int(fact.get("end") or 0),
            )  # fmt: skip
            name = "text_findings"
        elif kind == "consent":
            when_us = epoch_us(fact.get("date"))
            item = Consent(
                key, seconds(when_us), fact.get("status"), _EMPTY, when_us, source, index,
                research_opt_out=bool(fact.get("research_opt_out")),
            )  # fmt: skip
            name = "consents"
        elif kind == "patient":
            site, site_key = patient_site(fact)
            updated = (entry.get("provenance") or {}).get("last_updated")
            item = Demographics(
                birth_date=_birth(fact.get("birth_date")),
                sex=fact.get("sex") or "unknown",
                deceased=bool(fact.get("deceased")),
                deceased_us=epoch_us(fact.get("deceased_date")),
                site=site,
                site_key=site_key,
                region=region_of(fact.get("region")),
                gp_practice=fact.get("gp_practice") or None,
                general_practitioners=_keys(fact.get("general_practitioners")),
                effective_us=epoch_us(updated),
                source=source,
                index=index,
            )
            name = "patients"
        else:
            continue
        out.setdefault(name, []).append(item)
    return ResourceVersion(key, seq, False, **{k: tuple(v) for k, v in out.items()})


# --------------------------------------------------------------------------- the view


@record
class PatientView:
    """Everything the product reads of one patient (see the module docstring)."""

    patient: str
    demographics: Demographics | None = None
    conditions: tuple[Condition, ...] = ()
    observations: tuple[Observation, ...] = ()
    medications: tuple[Medication, ...] = ()
    procedures: tuple[Procedure, ...] = ()
    exposures: tuple[DeviceExposure, ...] = ()
    adverse_events: tuple[AdverseEvent, ...] = ()
    #: device problems read from free text: candidate outcomes, never coded ones
    text_findings: tuple[TextFinding, ...] = ()
    consents: tuple[Consent, ...] = ()

    # demographics, flattened for criteria (None / "unknown" without a Patient)

    @property
    def has_demographics(self) -> bool:
        return self.demographics is not None

    @property
    def birth_date(self) -> date | None:
        return self.demographics.birth_date if self.demographics else None

    @property
    def sex(self) -> str:
        return self.demographics.sex if self.demographics else "unknown"

    @property
    def deceased(self) -> bool:
        return self.demographics.deceased if self.demographics else False

    @property
    def deceased_at(self) -> float | None:
        return self.demographics.deceased_at if self.demographics else None

    @property
    def site(self) -> str | None:
        return self.demographics.site if self.demographics else None

    @property
    def site_key(self) -> str | None:
        return self.demographics.site_key if self.demographics else None

    @property
    def region(self) -> str | None:
        return self.demographics.region if self.demographics else None

    @property
    def devices(self) -> tuple[DeviceExposure, ...]:
        return self.exposures

    @property
    def research_opt_out(self) -> bool:
        """An active consent records a research opt-out."""
        return any(c.research_opt_out and c.status == "active" for c in self.consents)

    def in_population(self, t: float) -> bool:
        """Whether the patient is in the population at instant ``t`` (epoch seconds): known
        (a live Patient), alive at ``t`` (a date of death after ``t``, or none and not recorded
        deceased) and born by then (a birth date after ``t``'s UTC day is not born yet; an
        unknown birth date does not exclude)."""
        demographics = self.demographics
        if demographics is None:
            return False
        birth = demographics.birth_date
        if birth is not None and birth > datetime.fromtimestamp(t, UTC).date():
            return False
        if demographics.deceased_us is not None:
            return seconds(demographics.deceased_us) > t  # type: ignore[operator]
        return not demographics.deceased

    def tokens(self) -> set[str]:
        """Every match token of the patient's records (codes, component codes, device types)."""
        found: set[str] = set()
        for group in (self.conditions, self.medications, self.procedures, self.exposures):
            for item in group:
                found |= item.tokens
        for obs in self.observations:
            found |= obs.tokens
            for comp in obs.components:
                found |= comp.tokens
        for event in self.adverse_events:
            found |= event.tokens
        return found


def latest_demographics(items: Iterable[Demographics]) -> Demographics | None:
    """The demographics rule: the latest version's first patient fact."""
    best: Demographics | None = None
    for item in items:
        if best is None or item.rank > best.rank:
            best = item
    return best


def assemble(patient: str, versions: Mapping[str, ResourceVersion]) -> PatientView:
    """The view of a patient's parsed versions (retracted ones contribute nothing)."""
    live = [versions[k] for k in sorted(versions) if not versions[k].retracted]
    demographics = latest_demographics(v.patients[0] for v in live if v.patients)
    return PatientView(
        patient=patient,
        demographics=demographics,
        conditions=tuple(i for v in live for i in v.conditions),
        observations=tuple(i for v in live for i in v.observations),
        medications=tuple(i for v in live for i in v.medications),
        procedures=tuple(i for v in live for i in v.procedures),
        exposures=tuple(i for v in live for i in v.exposures),
        adverse_events=tuple(i for v in live for i in v.adverse_events),
        text_findings=tuple(i for v in live for i in v.text_findings),
        consents=tuple(i for v in live for i in v.consents),
    )


def build_view(patient: str, entries: Mapping[str, Mapping[str, Any]]) -> PatientView:
    """The view of a patient's state (``resource key -> entry``, one entry per resource, as the
    stream keeps it)."""
    return assemble(patient, {key: parse_resource(key, e) for key, e in entries.items()})


def view_of_envelopes(patient: str, envelopes: Iterable[Mapping[str, Any]]) -> PatientView:
    """The view of a patient's envelopes in any order and multiplicity (per key the highest
    ``seq`` wins; an equal ``seq`` again changes nothing)."""
    fold = PatientFold(patient)
    for envelope in envelopes:
        fold.apply(str(envelope["key"]), envelope)
    return fold.view()


class PatientFold:
    """The view kept per event: per resource key the parsed version with the highest ``seq``,
    and the assembled :class:`PatientView`, rebuilt only when asked after a change. Only the
    changed resource is parsed per event."""

    __slots__ = ("_versions", "_view", "patient")

    def __init__(self, patient: str) -> None:
        self.patient = patient
        self._versions: dict[str, ResourceVersion] = {}
        self._view: PatientView | None = None

    @classmethod
    def from_entries(cls, patient: str, entries: Mapping[str, Mapping[str, Any]]) -> PatientFold:
        fold = cls(patient)
        for key, entry in entries.items():
            fold.apply(key, entry)
        return fold

    def apply(self, key: str, entry: Mapping[str, Any]) -> bool:
        """Fold one version of resource ``key`` in; True when it replaced what was there."""
        current = self._versions.get(key)
        if current is not None and int(entry.get("seq", 1)) <= current.seq:
            return False
        self._versions[key] = parse_resource(key, entry)
        self._view = None
        return True

    def version(self, key: str) -> ResourceVersion | None:
        return self._versions.get(key)

    def view(self) -> PatientView:
        if self._view is None:
            self._view = assemble(self.patient, self._versions)
        return self._view


__all__ = [
    "AdverseEvent",
    "Condition",
    "Consent",
    "Demographics",
    "DeviceExposure",
    "Event",
    "Measurement",
    "Medication",
    "Observation",
    "PatientFold",
    "PatientView",
    "Procedure",
    "ResourceVersion",
    "Source",
    "TextFinding",
    "Tokens",
    "assemble",
    "build_view",
    "epoch",
    "epoch_us",
    "instant",
    "interpretation_codes",
    "latest_demographics",
    "parse_resource",
    "patient_site",
    "region_of",
    "seconds",
    "source_of",
    "tokens",
    "view_of_envelopes",
]
