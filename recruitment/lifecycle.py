"""The invitation state machine: states, legal transitions, and the clinician's actions.

Pure: no I/O, no clock. The service applies a transition only after :func:`check_transition`
allows it, and records every change as a history row.

::

    proposed -> sent_to_clinician -> approved ----------> patient_contacted -> interested
                                  \\-> rejected                             |-> declined
                                                                           \\-> no_response
    interested -> consented -> enrolled | screen_failed

    expired and withdrawn are reachable from every state that is not final.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class InvitationState(StrEnum):
    PROPOSED = "proposed"
    SENT_TO_CLINICIAN = "sent_to_clinician"
    APPROVED = "approved"
    REJECTED = "rejected"
    PATIENT_CONTACTED = "patient_contacted"
    INTERESTED = "interested"
    DECLINED = "declined"
    NO_RESPONSE = "no_response"
    CONSENTED = "consented"
    ENROLLED = "enrolled"
    SCREEN_FAILED = "screen_failed"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


S = InvitationState

#: The forward path; :data:`EXPIRED` and :data:`WITHDRAWN` are added to every non-final state.
_FORWARD: Mapping[InvitationState, tuple[InvitationState, ...]] = {
    S.PROPOSED: (S.SENT_TO_CLINICIAN,),
    S.SENT_TO_CLINICIAN: (S.APPROVED, S.REJECTED),
    S.APPROVED: (S.PATIENT_CONTACTED,),
    S.PATIENT_CONTACTED: (S.INTERESTED, S.DECLINED, S.NO_RESPONSE),
    S.INTERESTED: (S.CONSENTED,),
    S.CONSENTED: (S.ENROLLED, S.SCREEN_FAILED),
}

#: States with no way out.
FINAL: frozenset[InvitationState] = frozenset(s for s in InvitationState if s not in _FORWARD)

#: Every legal transition, in a stable order.
TRANSITIONS: Mapping[InvitationState, tuple[InvitationState, ...]] = {
    state: (*_FORWARD[state], S.EXPIRED, S.WITHDRAWN) if state in _FORWARD else ()
    for state in InvitationState
}

#: Open invitations: a patient has at most one across all trials.
ACTIVE: frozenset[InvitationState] = frozenset(InvitationState) - FINAL

#: States in which the patient has not been approached yet ("before contact").
BEFORE_CONTACT: frozenset[InvitationState] = frozenset(
    {S.PROPOSED, S.SENT_TO_CLINICIAN, S.APPROVED}
)

#: States that only the clinician's decision reaches (what the notifications ask them to do).
AWAITING_CLINICIAN: frozenset[InvitationState] = frozenset(
    {S.SENT_TO_CLINICIAN, S.APPROVED, S.PATIENT_CONTACTED, S.INTERESTED, S.CONSENTED}
)

#: The clinician's actions (the last segment of the API route) and the state each one moves to.
ACTIONS: Mapping[str, InvitationState] = {
    "approve": S.APPROVED,
    "reject": S.REJECTED,
    "contacted": S.PATIENT_CONTACTED,
    "interested": S.INTERESTED,
    "declined": S.DECLINED,
    "no-response": S.NO_RESPONSE,
    "consented": S.CONSENTED,
    "enrolled": S.ENROLLED,
    "screen-failed": S.SCREEN_FAILED,
    "withdraw": S.WITHDRAWN,
}


class IllegalTransition(ValueError):
    """A transition the state machine does not allow; names the state and the allowed moves."""

    def __init__(self, state: InvitationState, target: InvitationState) -> None:
        self.state = state
        self.target = target
        self.allowed = TRANSITIONS[state]
        if self.allowed:
            allowed = ", ".join(s.value for s in self.allowed)
            message = (
                f"cannot move an invitation from {state.value} to {target.value}; "
                f"from {state.value} it can move to: {allowed}"
            )
        else:
            message = (
                f"cannot move an invitation from {state.value} to {target.value}; "
                f"{state.value} is final"
            )
        super().__init__(message)


def allowed_next(state: InvitationState) -> tuple[InvitationState, ...]:
    return TRANSITIONS[state]


def check_transition(state: InvitationState, target: InvitationState) -> None:
    """Raise :class:`IllegalTransition` unless ``state -> target`` is legal."""
    if target not in TRANSITIONS[state]:
        raise IllegalTransition(state, target)


def is_final(state: InvitationState) -> bool:
    return state in FINAL


__all__ = [
    "ACTIONS",
    "ACTIVE",
    "AWAITING_CLINICIAN",
    "BEFORE_CONTACT",
    "FINAL",
    "TRANSITIONS",
    "IllegalTransition",
    "InvitationState",
    "allowed_next",
    "check_transition",
    "is_final",
]
