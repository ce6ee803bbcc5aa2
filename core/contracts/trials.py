"""The trial record (``concierge.trial/1``): a saved question as kept on the compacted trials
topic, keyed by trial id. The API writes it (``feasibility.saved``); the stream worker and
recruitment read it. Field meanings: ``docs/reference/cohort-events.md``.

The record is generic in its criteria: feasibility reads them as its typed ``Question``;
readers that do not evaluate criteria (recruitment) keep them as a JSON object. Unknown fields
are ignored, so a reader keeps working when a later minor version adds one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

TRIAL_SCHEMA = "concierge.trial/1"

#: The id a sponsor may give a new trial: a slug, e.g. ``t2dm-sglt2-001``.
TRIAL_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,63}$"

TrialStatus = Literal["active", "paused", "closed", "completed", "withdrawn", "retired"]
#: Statuses after which a trial recruits nobody (recruitment ends its open invitations).
ENDED_STATUSES: frozenset[str] = frozenset({"retired", "closed", "withdrawn", "completed"})

CriteriaT = TypeVar("CriteriaT")


class TrialTerms(BaseModel, Generic[CriteriaT]):
    """What a sponsor decides about a trial: its question and where and how many it recruits."""

    #: The topic's key. New trials get ids matching :data:`TRIAL_ID_PATTERN` (the API checks it
    #: on registration); readers accept any non-empty id.
    id: str = Field(min_length=1, max_length=200)
    title: str = Field(min_length=1, max_length=300)
    criteria: CriteriaT
    recruiting_sites: list[str] = Field(default_factory=list, description="ODS codes")
    target: int | None = Field(default=None, ge=1)
    site_targets: dict[str, int] = Field(default_factory=dict)
    #: Site ODS code -> Practitioner reference key of the site's named recruiter.
    recruiters: dict[str, str] = Field(default_factory=dict)


class TrialRecord(TrialTerms[CriteriaT], Generic[CriteriaT]):
    """One version of a trial on the trials topic (a tombstone removes the trial)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    schema_: Literal["concierge.trial/1"] = Field(default="concierge.trial/1", alias="schema")
    version: int = Field(ge=1)
    sponsor: str = Field(min_length=1)
    status: TrialStatus = "active"
    registered_at: datetime

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


#: The record as a reader that does not evaluate criteria sees it.
OpaqueTrialRecord = TrialRecord[dict[str, Any]]

__all__ = [
    "ENDED_STATUSES",
    "TRIAL_ID_PATTERN",
    "TRIAL_SCHEMA",
    "OpaqueTrialRecord",
    "TrialRecord",
    "TrialStatus",
    "TrialTerms",
]
