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
