"""The sponsor's recruitment funnel: invited patients per invitation state, under disclosure
control (small counts withheld, shown counts rounded, no state recoverable from the total), and
the ``recruitment`` block of a saved question's answer over a real SQLite recruitment store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.recruitment_funnel import STATES, protect_recruitment
from recruitment.funnel import invited_by_state
from recruitment.lifecycle import InvitationState
from recruitment.models import Invitation
from recruitment.runtime import Runtime
from tests.api_world import GP_A, IDENTITY, SITE_A, SPONSOR_ORG, TRIAL, World, build_world
from tests.recruitment_helpers import cohort, patient_facts

EXACT = DisclosurePolicy(rounding=1)  # rounding off: differencing would be exact


def shown(block: dict[str, Any], state: str) -> bool:
    cell = block["by_state"][state]
    return not cell["suppressed"]


def check_protected(counts: dict[str, int], policy: DisclosurePolicy) -> dict[str, Any]:
    block, _ = protect_recruitment(counts, policy)
    total = sum(counts.values())
    for state in STATES:
        n = counts.get(state, 0)
        cell = block["by_state"][state]
        if policy.is_small(n):
            assert cell["suppressed"] and cell["display"] == "withheld", state
        if not cell["suppressed"]:
            assert cell["value"] == policy.rounded(n), state
    cell = block["total"]
    if not cell["suppressed"]:
        assert cell["value"] == policy.rounded(total)
        hidden = [s for s in STATES if not shown(block, s)]
        # total minus the shown states: never exactly one withheld state, never a small group
        assert len(hidden) != 1, hidden
        if hidden:
            assert sum(counts.get(s, 0) for s in hidden) >= policy.threshold, hidden
    return block


def test_small_counts_are_withheld_and_the_rest_rounded() -> None:
    counts = {"sent_to_clinician": 26, "approved": 12, "rejected": 3}
    block = check_protected(counts, DisclosurePolicy())
    assert block["available"] is True
    assert block["total"] == {"value": 40, "display": "40", "suppressed": False}
    assert block["by_state"]["sent_to_clinician"]["display"] == "25"
    assert block["by_state"]["rejected"]["display"] == "withheld"
    # 3 rejected and the zero states alone would be 40 - 25 - 10 = 5 (a small group):
    # the approved count is withheld with them, and reads "withheld" too, not "<10"
    assert not shown(block, "approved")
    assert block["by_state"]["approved"]["display"] == "withheld"
    withheld = sum(1 for s in STATES if not shown(block, s))
    assert block["notes"] == [
        f"{withheld} of {len(STATES)} invitation states are withheld to protect small counts"
    ]
    assert any('reads "withheld", whatever its size' in rule for rule in block["rules"])
    assert set(block["by_state"]) == set(STATES)


def test_a_state_cannot_be_differenced_against_the_total() -> None:
    # every state but one is shown exactly; the one left would be total minus the others
    counts = {"sent_to_clinician": 40, "approved": 30, "enrolled": 4}
    block = check_protected(counts, EXACT)
    assert not shown(block, "enrolled")
    hidden = [s for s in STATES if not shown(block, s)]
    assert any(counts.get(s, 0) >= 10 for s in hidden)  # a complementary cell went too


def test_with_everyone_in_one_state_nothing_pins_down_the_others() -> None:
    # total = that state, and the zeros behind it would be known: withheld together
    block = check_protected({"sent_to_clinician": 30}, DisclosurePolicy())
    assert block["total"]["suppressed"]
    assert not any(shown(block, s) for s in STATES)


def test_the_same_counts_give_the_same_block_and_unknown_states_are_refused() -> None:
    counts = {"approved": 17, "consented": 11, "enrolled": 25}
    assert protect_recruitment(counts, DisclosurePolicy()) == protect_recruitment(
        dict(counts), DisclosurePolicy()
    )
    with pytest.raises(ValueError, match="unknown invitation states"):
        protect_recruitment({"held": 12}, DisclosurePolicy())


@given(
    st.dictionaries(st.sampled_from(STATES), st.integers(min_value=0, max_value=60), max_size=8),
    st.sampled_from([EXACT, DisclosurePolicy(), DisclosurePolicy(suppress_zero=False)]),
)
def test_protection_holds_for_any_counts(counts: dict[str, int], policy: DisclosurePolicy) -> None:
    check_protected(counts, policy)


# --------------------------------------------------------------------------- over the API

#: Beside the matrix patient (sent to their clinician): 25 more sent, 12 approved, 3 rejected.
APPROVED, REJECTED, SENT = 12, 3, 25


def seed(runtime: Runtime, _pseudonym: str) -> None:
    patients = [f"funnel-{i:02d}" for i in range(SENT + APPROVED + REJECTED)]
    with runtime.sessions.begin() as session:
        work = runtime.service.unit_of_work(session)
        for patient in patients:
            work.facts(patient_facts(patient, gps=[GP_A], site=SITE_A))
            work.cohort(TRIAL, patient, cohort(TRIAL, patient, 1, site=SITE_A))
        work.finish()
    moves = [InvitationState.APPROVED] * APPROVED + [InvitationState.REJECTED] * REJECTED
    with runtime.sessions.begin() as session:
        for patient, target in zip(patients, moves, strict=False):
            invitation = session.scalars(
                sa.select(Invitation).where(Invitation.patient == patient)
            ).one()
            runtime.service.transition(session, invitation, target, actor="test")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with build_world(tmp_path_factory.mktemp("funnel"), seed_recruitment=seed) as built:
        yield built


def test_exact_counts_count_each_patient_once(world: World) -> None:
    assert world.runtime is not None
    with world.runtime.sessions() as session:
        counts = dict(invited_by_state(session, TRIAL).by_state)
    assert counts == {"sent_to_clinician": SENT + 1, "approved": APPROVED, "rejected": REJECTED}


def test_the_saved_answer_carries_the_protected_recruitment_block(world: World) -> None:
    sponsor = world.headers("sponsor", SPONSOR_ORG)
    response = world.client.get(f"/v1/feasibility/saved-questions/{TRIAL}/answer", headers=sponsor)
    assert response.status_code == 200, response.text
    block = response.json()["recruitment"]
    assert block["available"] is True
    assert block["total"] == {"value": 40, "display": "40", "suppressed": False}
    assert block["by_state"]["sent_to_clinician"]["display"] == "25"
    assert block["by_state"]["rejected"]["suppressed"]
    assert block["by_state"]["approved"]["suppressed"]  # complementary
    assert set(block["by_state"]) == set(STATES)
    # aggregates only: no pseudonym, identity, site or practitioner
    text = json.dumps(block)
    for needle in (world.pseudonym, "funnel-", GP_A, *IDENTITY.values()):
        assert needle not in text
    audit = world.audit()[-1]
    assert audit["action"] == f"GET /v1/feasibility/saved-questions/{TRIAL}/answer"
    assert audit["detail"]["recruitment"]["primary_suppressed"] >= 1  # bookkeeping only
    assert world.pseudonym not in json.dumps(audit)


def test_without_recruitment_the_block_says_so(world: World) -> None:
    runtime, world.app.state.recruitment = world.app.state.recruitment, None
    try:
        sponsor = world.headers("sponsor", SPONSOR_ORG)
        response = world.client.get(
            f"/v1/feasibility/saved-questions/{TRIAL}/answer", headers=sponsor
        )
    finally:
        world.app.state.recruitment = runtime
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["recruitment"]["available"] is False
    assert "total" in body  # the rest of the answer is unaffected


def test_the_block_is_for_sponsors_only(world: World) -> None:
    for role in ("clinician", "regulator"):
        headers = world.headers(role, "Other", practitioner=GP_A if role == "clinician" else None)
        response = world.client.get(
            f"/v1/feasibility/saved-questions/{TRIAL}/answer", headers=headers
        )
        assert response.status_code == 403


def test_the_contract_states_are_the_lifecycle_states_in_order() -> None:
    assert tuple(state.value for state in InvitationState) == STATES


def test_the_contract_rejects_unknown_states_and_negative_counts() -> None:
    from core.contracts.invitations import InvitedByState

    with pytest.raises(ValueError, match="unknown invitation states"):
        InvitedByState("t", {"invented": 1})
    with pytest.raises(ValueError, match="negative"):
        InvitedByState("t", {"approved": -1})
