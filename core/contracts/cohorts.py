"""The cohort topic (``concierge.cohort/1``): live membership of saved questions, written by the
stream worker's cohort table and read by the API (``feasibility.live``) and recruitment.

Keys are written by the table as JSON strings. ``trial|patient`` keys hold a
:class:`CohortRecord` (a tombstone means the patient is no longer tracked: ``member: false``).
Keys beginning with ``\\x00`` are the worker's bookkeeping, one of:

* ``\\x00watermark|<partition>`` -> :class:`Watermark`: how far in stream time and facts offset
  that partition's cohorts are;
* ``\\x00evaluated|<trial>|<partition>`` -> :class:`EvaluatedMark`: the partition has evaluated
  every patient at that version of the trial (before it, counting records at the new version
  would undercount without saying so).

The worker writes plain dicts on its hot path; ``tests/unit/test_contracts.py`` holds them to
these models. Field meanings: ``docs/reference/cohort-events.md``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

COHORT_SCHEMA = "concierge.cohort/1"

BOOKKEEPING_PREFIX = "\x00"
WATERMARK_PREFIX = "\x00watermark|"
EVALUATED_PREFIX = "\x00evaluated|"


class CohortKeyError(ValueError):
    """A cohort-topic key that is neither ``trial|patient`` nor bookkeeping."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class CohortRecord(_Tolerant):
    """One patient's standing against one version of a trial's criteria."""

    schema_: Literal["concierge.cohort/1"] = Field(default="concierge.cohort/1", alias="schema")
    trial: str
    trial_version: int | None = None
    patient: str
    site: str | None = None
    region: str | None = None
    member: bool
    #: One letter per funnel step (``docs/reference/cohort-events.md``); empty outside the
    #: population.
    steps: str | None = None
    #: Epoch seconds of stream time when the patient's standing may change with time alone.
    next_check: float | None = None
    partition: int | None = None
    change: int = Field(ge=0)
    at: datetime | None = None


class Watermark(_Tolerant):
    partition: int
    stream_time: datetime
    stream_time_epoch: float
    facts_offset: int = 0


class EvaluatedMark(_Tolerant):
    trial: str
    version: int
    partition: int
    status: str = "active"


def record_key(trial: str, patient: str) -> str:
    return f"{trial}|{patient}"


def watermark_key(partition: int) -> str:
    return f"{WATERMARK_PREFIX}{partition}"


def evaluated_key(trial: str, partition: int) -> str:
    return f"{EVALUATED_PREFIX}{trial}|{partition}"


def key_text(raw: bytes | str | None) -> str:
    """A cohort-topic key as text (the table writes keys as JSON strings, quotes included)."""
    text = raw.decode() if isinstance(raw, bytes) else (raw or "")
    if text.startswith('"'):
        try:
            decoded = json.loads(text)
        except ValueError:
            raise CohortKeyError(f"cohort key {text!r} is not a JSON string") from None
        if not isinstance(decoded, str):
            raise CohortKeyError(f"cohort key {text!r} is not a JSON string")
        return decoded
    return text


def split_record_key(key: str) -> tuple[str, str] | None:
    """``(trial, patient)`` from a record key; None for bookkeeping keys."""
    key = key_text(key)
    if not key or key.startswith(BOOKKEEPING_PREFIX):
        return None
    trial, sep, patient = key.rpartition("|")
    if not sep or not trial or not patient:
        raise CohortKeyError(f"cohort key {key!r} is not trial|patient")
    return trial, patient


__all__ = [
    "BOOKKEEPING_PREFIX",
    "COHORT_SCHEMA",
    "EVALUATED_PREFIX",
    "WATERMARK_PREFIX",
    "CohortKeyError",
    "CohortRecord",
    "EvaluatedMark",
    "Watermark",
    "evaluated_key",
    "key_text",
    "record_key",
    "split_record_key",
    "watermark_key",
]
