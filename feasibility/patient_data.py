"""One patient's data as the feasibility engines read it: the patient view.

The reference and incremental engines evaluate criteria over :class:`core.patient_view.PatientView`
(the one fold of a patient's facts, shared with the columnar snapshot, device surveillance and
recruitment). This module keeps the names the engines were written against; :func:`digest`
builds the view from the stream's state shape (``resource key -> entry``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.patient_view import (
    Condition,
    DeviceExposure,
    Event,
    Measurement,
    Observation,
    PatientView,
    Tokens,
    build_view,
    epoch,
    tokens,
)

PatientData = PatientView
ConditionRow = Condition
ObservationRow = Observation
DeviceRow = DeviceExposure


def digest(patient: str, entries: Mapping[str, Mapping[str, Any]]) -> PatientView:
    """A patient's view from their state entries (``resource key -> entry``)."""
    return build_view(patient, entries)


def from_facts(patient: str, resources: Mapping[str, Iterable[Mapping[str, Any]]]) -> PatientView:
    """A patient's view from ``resource key -> facts`` (live resources only)."""
    return build_view(patient, {k: {"facts": list(v)} for k, v in resources.items()})


__all__ = [
    "ConditionRow",
    "DeviceRow",
    "Event",
    "Measurement",
    "ObservationRow",
    "PatientData",
    "Tokens",
    "digest",
    "epoch",
    "from_facts",
    "tokens",
]
