"""The messages recruitment reads, decoded into small typed values.

* trials topic: ``concierge.trial/1``, :class:`core.contracts.trials.TrialRecord`, criteria kept
  as an opaque JSON object;
* cohort topic: :mod:`core.contracts.cohorts` (``concierge.cohort/1``); the worker's bookkeeping
  keys are skipped;
* facts topic: one ``concierge.facts/1`` envelope, or a ``concierge.factbatch/1`` object holding
  several (read with :func:`core.contracts.facts.envelopes_of`); only Patient and Consent
  resources matter here, so everything else is skipped before it is validated;
* reference topic: ``concierge.reference/1`` records (practitioners, roles, organisations).

Trial and cohort records are read tolerantly (unknown fields are ignored); facts and reference
records are validated by their owner's types (:mod:`core.contracts.facts`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from core.contracts.cohorts import CohortKeyError, CohortRecord, split_record_key
from core.contracts.facts import ReferenceRecord, ResourceFacts, decode_reference, envelopes_of
from core.contracts.trials import OpaqueTrialRecord

#: Resource types on the facts topic that recruitment reads.
FACT_RESOURCE_TYPES = frozenset({"Patient", "Consent"})
#: Resource types on the reference topic that recruitment reads.
REFERENCE_RESOURCE_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization"})


class MessageError(ValueError):
    """A message that cannot be read; the consumer records it and moves on."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


def _json(value: bytes | str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MessageError(f"invalid {model.__name__}: {_short(exc)}") from None


def _short(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid"
    where = ".".join(str(p) for p in errors[0]["loc"])
    return f"{len(errors)} error(s), first at {where or '(root)'}: {errors[0]['msg']}"


def decode_trial(value: bytes | str | None, key: str | None) -> OpaqueTrialRecord | None:
    """A trial record; None for a tombstone (the trial is gone)."""
    if value is None:
        return None
    record: OpaqueTrialRecord = _validate(OpaqueTrialRecord, _json(value))
    if key is not None and key != record.id:
        raise MessageError(f"trial record for {record.id!r} under key {key!r}")
    return record


def split_cohort_key(key: str) -> tuple[str, str] | None:
    """``(trial, patient)`` from a cohort key; None for the worker's bookkeeping keys."""
    try:
        return split_record_key(key)
    except CohortKeyError as exc:
        raise MessageError(str(exc)) from None


def decode_cohort(value: bytes | str | None, key: str) -> CohortRecord | None:
    """A cohort record; None for a tombstone (treat as ``member: false``)."""
    if value is None:
        return None
    record: CohortRecord = _validate(CohortRecord, _json(value))
    parts = split_cohort_key(key)
    if parts is not None and parts != (record.trial, record.patient):
        raise MessageError(f"cohort record for {record.trial}|{record.patient} under key {key!r}")
    return record


def resource_type_of(key: str) -> str | None:
    parts = key.split("|")
    return parts[-2] if len(parts) >= 3 else None


def decode_facts(value: bytes | str | None) -> list[ResourceFacts]:
    """The Patient and Consent envelopes in a facts message (one envelope or a batch)."""
    if value is None:
        return []
    try:
        items = envelopes_of(value)
    except ValueError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    envelopes = []
    for item in items:
        key = item.get("key")
        if not isinstance(key, str) or resource_type_of(key) not in FACT_RESOURCE_TYPES:
            continue
        envelopes.append(_validate(ResourceFacts, item))
    return envelopes


def decode_reference_record(value: bytes | str | None, key: str | None) -> ReferenceRecord | None:
    """A practitioner, role or organisation record; None for anything recruitment ignores."""
    if key is not None and resource_type_of(key) not in REFERENCE_RESOURCE_TYPES:
        return None
    if value is None:
        return None
    try:
        record = decode_reference(value)
    except ValidationError as exc:
        raise MessageError(f"invalid ReferenceRecord: {_short(exc)}") from None
    except ValueError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if resource_type_of(record.key) not in REFERENCE_RESOURCE_TYPES:
        return None
    return record


__all__ = [
    "MessageError",
    "decode_cohort",
    "decode_facts",
    "decode_reference_record",
    "decode_trial",
    "split_cohort_key",
]
