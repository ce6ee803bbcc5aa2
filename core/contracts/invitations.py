"""Invitation counts per state for one trial: what recruitment tells the sponsor funnel.

Recruitment computes it from its store (``recruitment.funnel``); feasibility protects it under
disclosure control (``feasibility.recruitment_funnel``). Neither reads the other's tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: Version of :class:`InvitedByState`; bump it when a field changes meaning.
VERSION = 1

#: Invitation states in lifecycle order (``recruitment.lifecycle.InvitationState`` has the same
#: values in the same order; a unit test holds the two together).
INVITATION_STATES: tuple[str, ...] = (
    "proposed",
    "sent_to_clinician",
    "approved",
    "rejected",
    "patient_contacted",
    "interested",
    "declined",
    "no_response",
    "consented",
    "enrolled",
    "screen_failed",
    "expired",
    "withdrawn",
)


@dataclass(frozen=True)
class InvitedByState:
    """Exact counts (never for a sponsor as they are): each invited patient once, in the state of
    their latest invitation for ``trial_id``. States with no patient may be absent."""

    trial_id: str
    by_state: Mapping[str, int] = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        unknown = set(self.by_state) - set(INVITATION_STATES)
        if unknown:
            raise ValueError(f"unknown invitation states: {sorted(unknown)}")
        negative = sorted(state for state, n in self.by_state.items() if n < 0)
        if negative:
            raise ValueError(f"negative counts for {negative}")
        object.__setattr__(self, "by_state", MappingProxyType(dict(self.by_state)))


#: The kinds of :class:`RecruitmentBySite`, in the order the sponsor's site selection shows them.
RECRUITMENT_KINDS: tuple[str, ...] = (
    "candidates",
    "opted_out",
    "limited",
    "invited",
    "consented",
    "enrolled",
)


@dataclass(frozen=True)
class RecruitmentBySite:
    """Who recruitment has seen for one trial, per recruiting site (never for a sponsor as it
    is: feasibility turns it into protected counts). Patients are pseudonyms; each patient is at
    one site, the site of their candidacy.

    ``patients[kind][site]``, for each kind of :data:`RECRUITMENT_KINDS`: ``candidates`` (every
    patient who entered the cohort at the site), ``opted_out`` (not a candidate: research
    opt-out or deceased), ``limited`` (held back now by an invitation limit: an open or earlier
    invitation, the cool-down, the yearly cap, capacity), ``invited`` (ever invited),
    ``consented`` and ``enrolled`` (an invitation ever reached that state)."""

    trial_id: str
    patients: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        unknown = set(self.patients) - set(RECRUITMENT_KINDS)
        if unknown:
            raise ValueError(f"unknown recruitment kinds: {sorted(unknown)}")
