"""One patient's live facts, digested for per-patient evaluation.

The stream keeps, per patient, the latest version of each resource (``resource key -> entry``
with ``seq``, ``retracted`` and ``facts`` as JSON objects, see
:mod:`surveillance_stream.patient_state`). :func:`digest` turns those entries into plain rows
with parsed dates (epoch seconds, UTC) and match tokens (:func:`feasibility.terminology.token`),
which the reference and incremental engines read. Retracted resources contribute nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from core.contracts.facts import patient_site

from .terminology import token

Tokens = frozenset[str]


def epoch(value: str | None) -> float | None:
    """Epoch seconds of an ISO date-time (UTC when no offset), or None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def tokens(codings: Iterable[Mapping[str, Any]] | None) -> Tokens:
    return frozenset(token(c.get("system"), str(c.get("code", ""))) for c in codings or ())


def interpretation_codes(codings: Iterable[Mapping[str, Any]] | None) -> frozenset[str]:
    return frozenset(str(c.get("code", "")) for c in codings or ())


@dataclass(frozen=True)
class Event:
    """A dated record of one resource: what the event criteria read."""

    key: str
    when: float | None
    status: str | None
    tokens: Tokens


@dataclass(frozen=True)
class ConditionRow(Event):
    clinical_status: str | None = None
    verification_status: str | None = None


@dataclass(frozen=True)
class Measurement:
    """The value part of an observation or of one of its components."""

    tokens: Tokens
    value: float | None
    unit: str | None
    value_tokens: Tokens
    value_codes: tuple[tuple[str, str], ...]  # (system, code) as recorded, for stages
    interpretation: frozenset[str]


@dataclass(frozen=True)
class ObservationRow(Event):
    measurement: Measurement | None = None
    components: tuple[Measurement, ...] = ()


@dataclass(frozen=True)
class DeviceRow(Event):
    manufacturer: str | None = None
    model: str | None = None


@dataclass
class PatientData:
    patient: str
    birth_date: date | None = None
    sex: str = "unknown"
    deceased: bool = False
    deceased_at: float | None = None
    #: ODS code of the patient's site as the fact knew it (never a reference key).
    site: str | None = None
    #: Reference key of the managing organisation (shown to nobody: readers resolve it).
    site_key: str | None = None
    region: str | None = None
    has_demographics: bool = False
    conditions: list[ConditionRow] = field(default_factory=list)
    observations: list[ObservationRow] = field(default_factory=list)
    medications: list[Event] = field(default_factory=list)
    procedures: list[Event] = field(default_factory=list)
    devices: list[DeviceRow] = field(default_factory=list)
    research_opt_out: bool = False


def _measurement(fact: Mapping[str, Any]) -> Measurement:
    value = fact.get("value")
    return Measurement(
        tokens=tokens(fact.get("codes")),
        value=float(value) if value is not None else None,
        unit=fact.get("unit"),
        value_tokens=tokens(fact.get("value_codes")),
        value_codes=tuple(
            (str(c.get("system") or ""), str(c.get("code", "")))
            for c in fact.get("value_codes") or ()
        ),
        interpretation=interpretation_codes(fact.get("interpretation")),
    )


def add_fact(data: PatientData, key: str, fact: Mapping[str, Any]) -> None:
    """Add one fact of resource ``key`` to ``data``."""
    kind = fact.get("kind")
    if kind == "patient":
        # one Patient per pseudonym; with several sources the first key (sorted) wins
        data.has_demographics = True
        birth = fact.get("birth_date")
        data.birth_date = date.fromisoformat(birth) if birth else None
        data.sex = fact.get("sex") or "unknown"
        data.deceased = bool(fact.get("deceased"))
        data.deceased_at = epoch(fact.get("deceased_date"))
        data.site, data.site_key = patient_site(fact)
        region = fact.get("region")
        data.region = region if region and region != "Unknown" else None
    elif kind == "condition":
        data.conditions.append(
            ConditionRow(
                key=key,
                when=epoch(fact.get("onset")) or epoch(fact.get("recorded")),
                status=fact.get("clinical_status"),
                tokens=tokens(fact.get("codes")),
                clinical_status=fact.get("clinical_status"),
                verification_status=fact.get("verification_status"),
            )
        )
    elif kind == "observation":
        has_value = (
            fact.get("value") is not None
            or bool(fact.get("value_codes"))
            or bool(fact.get("interpretation"))
        )
        data.observations.append(
            ObservationRow(
                key=key,
                when=epoch(fact.get("effective")),
                status=fact.get("status"),
                tokens=tokens(fact.get("codes")),
                measurement=_measurement(fact) if has_value else None,
                components=tuple(_measurement(c) for c in fact.get("components") or ()),
            )
        )
    elif kind == "medication":
        data.medications.append(
            Event(key, epoch(fact.get("start")), fact.get("status"), tokens(fact.get("codes")))
        )
    elif kind == "procedure":
        data.procedures.append(
            Event(key, epoch(fact.get("performed")), fact.get("status"), tokens(fact.get("codes")))
        )
    elif kind == "device_exposure":
        device = fact.get("device") or {}
        data.devices.append(
            DeviceRow(
                key=key,
                when=epoch(fact.get("start")),
                status=fact.get("status"),
                tokens=tokens(device.get("type_codes")),
                manufacturer=device.get("manufacturer"),
                model=device.get("model"),
            )
        )
    elif kind == "consent" and fact.get("research_opt_out") and fact.get("status") == "active":
        data.research_opt_out = True


def digest(patient: str, entries: Mapping[str, Mapping[str, Any]]) -> PatientData:
    """A patient's data from their state entries (``resource key -> entry``)."""
    data = PatientData(patient)
    patient_seen = False
    for key in sorted(entries):
        entry = entries[key]
        if entry.get("retracted"):
            continue
        for fact in entry.get("facts") or ():
            if fact.get("kind") == "patient":
                if patient_seen:
                    continue
                patient_seen = True
            add_fact(data, key, fact)
    return data


def from_facts(patient: str, resources: Mapping[str, Iterable[Mapping[str, Any]]]) -> PatientData:
    """A patient's data from ``resource key -> facts`` (live resources only)."""
    return digest(patient, {k: {"facts": list(v)} for k, v in resources.items()})


__all__ = [
    "ConditionRow",
    "DeviceRow",
    "Event",
    "Measurement",
    "ObservationRow",
    "PatientData",
    "add_fact",
    "digest",
    "epoch",
    "from_facts",
    "tokens",
]
