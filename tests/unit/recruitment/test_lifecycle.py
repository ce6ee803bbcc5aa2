"""The invitation state machine, as specified in the recruitment issue."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recruitment.lifecycle import (
    ACTIONS,
    ACTIVE,
    BEFORE_CONTACT,
    FINAL,
    TRANSITIONS,
    IllegalTransition,
    InvitationState,
    allowed_next,
    check_transition,
)

S = InvitationState

FORWARD = {
    (S.PROPOSED, S.SENT_TO_CLINICIAN),
    (S.SENT_TO_CLINICIAN, S.APPROVED),
    (S.SENT_TO_CLINICIAN, S.REJECTED),
    (S.APPROVED, S.PATIENT_CONTACTED),
    (S.PATIENT_CONTACTED, S.INTERESTED),
    (S.PATIENT_CONTACTED, S.DECLINED),
    (S.PATIENT_CONTACTED, S.NO_RESPONSE),
    (S.INTERESTED, S.CONSENTED),
    (S.CONSENTED, S.ENROLLED),
    (S.CONSENTED, S.SCREEN_FAILED),
}


def test_exactly_the_specified_transitions_are_legal() -> None:
    legal = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    expected = set(FORWARD)
    for state in S:
        if state not in FINAL:
            expected |= {(state, S.EXPIRED), (state, S.WITHDRAWN)}
    assert legal == expected
    for a in S:
        for b in S:
            if (a, b) in expected:
                check_transition(a, b)
            else:
                with pytest.raises(IllegalTransition):
                    check_transition(a, b)


def test_final_and_active_states() -> None:
    assert {
        S.REJECTED,
        S.DECLINED,
        S.NO_RESPONSE,
        S.ENROLLED,
        S.SCREEN_FAILED,
        S.EXPIRED,
        S.WITHDRAWN,
    } == FINAL
    assert set(S) - FINAL == ACTIVE
    assert {S.PROPOSED, S.SENT_TO_CLINICIAN, S.APPROVED} == BEFORE_CONTACT
    for state in FINAL:
        assert allowed_next(state) == ()


def test_illegal_transition_names_the_state_and_the_allowed_next_states() -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition(S.APPROVED, S.ENROLLED)
    message = str(caught.value)
    assert "approved" in message and "enrolled" in message
    assert "patient_contacted, expired, withdrawn" in message
    assert caught.value.allowed == (S.PATIENT_CONTACTED, S.EXPIRED, S.WITHDRAWN)
    with pytest.raises(IllegalTransition, match="enrolled is final"):
        check_transition(S.ENROLLED, S.WITHDRAWN)


def test_every_action_targets_a_state() -> None:
    assert set(ACTIONS) == {
        "approve",
        "reject",
        "contacted",
        "interested",
        "declined",
        "no-response",
        "consented",
        "enrolled",
        "screen-failed",
        "withdraw",
    }
    assert ACTIONS["no-response"] is S.NO_RESPONSE and ACTIONS["withdraw"] is S.WITHDRAWN


@given(st.lists(st.sampled_from(list(S)), max_size=30))
def test_any_walk_of_legal_moves_ends_final_or_active_and_never_leaves_final(
    targets: list[InvitationState],
) -> None:
    state = S.PROPOSED
    for target in targets:
        if target in allowed_next(state):
            state = target
        else:
            with pytest.raises(IllegalTransition):
                check_transition(state, target)
        assert (state in FINAL) != (state in ACTIVE)
    if state in FINAL:
        assert all(t not in allowed_next(state) for t in S)
