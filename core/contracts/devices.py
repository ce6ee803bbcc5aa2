"""A patient's device contribution: what the stream worker publishes per patient on the device
contributions topic (the changelog of its ``devices`` table, keyed by patient) and the signal
monitor sums into counters. Both sides are in ``surveillance_stream``; the value crosses a topic,
so it is defined here, once. Meaning of the counters: ``docs/explanation/device-surveillance.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from core.patient_view import Source

#: The contribution's schema. Version 2 added the stratum (the last element of every counter and
#: person-time key) so expected counts can be standardised indirectly; a version-1 value (no
#: ``schema``, five-part keys) reads as stratum :data:`UNKNOWN_STRATUM`.
CONTRIBUTION_SCHEMA = "concierge.device-contribution/2"

#: ``(level, node, outcome or "exposed", period, site, stratum)``
CounterKey = tuple[str, str, str, str, str, str]
#: ``(level, node, period, site, stratum)``
TimeKey = tuple[str, str, str, str, str]

#: Age bands (years at implant) of the stratum: ``(label, lowest age)``, youngest first.
AGE_BANDS: tuple[tuple[str, int], ...] = (
    ("0-44", 0),
    ("45-54", 45),
    ("55-64", 55),
    ("65-74", 65),
    ("75-84", 75),
    ("85+", 85),
)
#: The parts of a stratum, in the order they are written (``"65-74|female|London"``).
STRATUM_PARTS: tuple[str, ...] = ("age", "sex", "region")
UNKNOWN_STRATUM = "unknown|unknown|unknown"


def age_band(age: int | None) -> str:
    """The band of an age in whole years (``"unknown"`` for ``None`` or a negative age)."""
    if age is None or age < 0:
        return "unknown"
    label = AGE_BANDS[0][0]
    for name, lowest in AGE_BANDS:
        if age >= lowest:
            label = name
    return label


def stratum_of(age: str, sex: str, region: str) -> str:
    """The stratum string of an exposure: age band at implant, sex and region (``|`` and
    missing values are written ``unknown``)."""
    parts = (age, sex, region)
    return "|".join((p or "unknown").replace("|", "/") for p in parts)


def stratum_parts(stratum: str) -> dict[str, str]:
    """``{"age": ..., "sex": ..., "region": ...}`` of a stratum string."""
    values = stratum.split("|")
    values += ["unknown"] * (len(STRATUM_PARTS) - len(values))
    return dict(zip(STRATUM_PARTS, values, strict=False))


# --------------------------------------------------------------------------- person-time


@dataclass(frozen=True, order=True)
class PersonTime:
    """Exposure time that ages by itself: at day ``t`` (a proleptic ordinal, see
    :meth:`datetime.date.toordinal`) it is ``closed_days + open_count * t - open_start_sum`` days.

    Integers throughout, so sums and differences are exact and diffs cancel exactly.
    """

    closed_days: int = 0
    open_count: int = 0
    open_start_sum: int = 0

    @classmethod
    def of(cls, start: datetime, end: datetime | None) -> PersonTime:
        first = start.date().toordinal()
        if end is None:
            return cls(0, 1, first)
        return cls(max(0, end.date().toordinal() - first), 0, 0)

    def __add__(self, other: PersonTime) -> PersonTime:
        return PersonTime(
            self.closed_days + other.closed_days,
            self.open_count + other.open_count,
            self.open_start_sum + other.open_start_sum,
        )

    def __sub__(self, other: PersonTime) -> PersonTime:
        return PersonTime(
            self.closed_days - other.closed_days,
            self.open_count - other.open_count,
            self.open_start_sum - other.open_start_sum,
        )

    def __bool__(self) -> bool:
        return bool(self.closed_days or self.open_count or self.open_start_sum)

    def days(self, at: date | datetime) -> int:
        """Person-days at ``at`` (meaningful for ``at`` on or after every open exposure's start)."""
        day = at.date() if isinstance(at, datetime) else at
        return self.closed_days + self.open_count * day.toordinal() - self.open_start_sum

    def to_list(self) -> list[int]:
        return [self.closed_days, self.open_count, self.open_start_sum]


ZERO_TIME = PersonTime()


# --------------------------------------------------------------------------- contributions


@dataclass(frozen=True)
class Contribution:
    """All a patient adds to the device counters, canonical (sorted, so equal states give equal
    contributions).

    * ``keys``: the counter keys it adds one to, with repeats (two exposures in one node add two).
      Each exposure adds ``(level, node, "exposed", period, site)`` at every level, and
      ``(level, node, outcome, period, site)`` for each distinct outcome it has.
    * ``person_time``: per ``(level, node, period, site)``.
    * ``sources``: per key, the resource versions behind it (the exposure's facts, and the outcome
      facts for an outcome key): the drill-down from a count to source records.
    * ``latest``: the latest day (ordinal) of any date used, the default evaluation day.
    """

    patient: str
    keys: tuple[CounterKey, ...] = ()
    person_time: tuple[tuple[TimeKey, PersonTime], ...] = ()
    sources: tuple[tuple[CounterKey, tuple[Source, ...]], ...] = ()
    latest: int | None = None

    def sources_for(self, key: CounterKey) -> tuple[Source, ...]:
        for candidate, sources in self.sources:
            if candidate == key:
                return sources
        return ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe object (for a table value)."""
        return {
            "schema": CONTRIBUTION_SCHEMA,
            "patient": self.patient,
            "keys": [list(k) for k in self.keys],
            "person_time": [[list(k), t.to_list()] for k, t in self.person_time],
            "sources": [[list(k), [s.to_dict() for s in ss]] for k, ss in self.sources],
            "latest": self.latest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Contribution:
        schema = data.get("schema")
        if schema not in (None, CONTRIBUTION_SCHEMA):
            raise ValueError(f"unknown device contribution schema {schema!r}")
        return cls(
            patient=str(data["patient"]),
            keys=tuple(_counter_key(k) for k in data.get("keys", ())),
            person_time=tuple(
                (_time_key(k), PersonTime(*(int(x) for x in t)))
                for k, t in data.get("person_time", ())
            ),
            sources=tuple(
                (_counter_key(k), tuple(Source.from_dict(s) for s in ss))
                for k, ss in data.get("sources", ())
            ),
            latest=data.get("latest"),
        )


def _counter_key(value: Sequence[Any]) -> CounterKey:
    parts = [str(v) for v in value]
    if len(parts) == 5:  # schema 1: no stratum
        parts.append(UNKNOWN_STRATUM)
    level, node, outcome, period, site, stratum = parts
    return (level, node, outcome, period, site, stratum)


def _time_key(value: Sequence[Any]) -> TimeKey:
    parts = [str(v) for v in value]
    if len(parts) == 4:  # schema 1: no stratum
        parts.append(UNKNOWN_STRATUM)
    level, node, period, site, stratum = parts
    return (level, node, period, site, stratum)


__all__ = [
    "AGE_BANDS",
    "CONTRIBUTION_SCHEMA",
    "STRATUM_PARTS",
    "UNKNOWN_STRATUM",
    "ZERO_TIME",
    "Contribution",
    "CounterKey",
    "PersonTime",
    "TimeKey",
    "age_band",
    "stratum_of",
    "stratum_parts",
]
