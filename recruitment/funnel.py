"""The trial's invited patients per invitation state, from the recruitment store, as the
:class:`core.contracts.invitations.InvitedByState` contract the sponsor funnel reads; and its
candidates per site and what became of them (:class:`RecruitmentBySite`), for the sponsor's
site selection."""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.contracts.invitations import RECRUITMENT_KINDS, InvitedByState, RecruitmentBySite

from .models import Candidate, Invitation, InvitationEvent
from .rules import Rule


def invited_by_state(session: Session, trial_id: str) -> InvitedByState:
    """Each invited patient once, in the state of their latest invitation for ``trial_id``."""
    rows = session.execute(
        sa.select(Invitation.patient, Invitation.state)
        .where(Invitation.trial_id == trial_id)
        .order_by(Invitation.created_at, Invitation.id)
    )
    latest: dict[str, str] = {}
    for patient, state in rows:
        latest[patient] = state
    return InvitedByState(trial_id=trial_id, by_state=dict(Counter(latest.values())))


#: Holds that are invitation limits (the others exclude the patient, or are about the trial).
LIMITS = frozenset(
    {
        Rule.PREVIOUSLY_INVITED,
        Rule.ACTIVE_INVITATION,
        Rule.COOLDOWN,
        Rule.YEARLY_CAP,
        Rule.TRIAL_CAPACITY,
        Rule.SITE_CAPACITY,
    }
)


def recruitment_by_site(session: Session, trial_id: str) -> RecruitmentBySite:
    """The trial's candidates and what became of them, per site (the contract's kinds)."""
    out: dict[str, dict[str, set[str]]] = {kind: {} for kind in RECRUITMENT_KINDS}
    site_of: dict[str, str] = {}

    def add(kind: str, patient: str) -> None:
        site = site_of.get(patient)
        if site is not None:
            out[kind].setdefault(site, set()).add(patient)

    candidates = session.execute(
        sa.select(Candidate.patient, Candidate.site, Candidate.status, Candidate.held_reasons)
        .where(Candidate.trial_id == trial_id)
    )  # fmt: skip
    for patient, site, status, holds in candidates:
        site_of[patient] = site
        add("candidates", patient)
        if status == "excluded":
            add("opted_out", patient)
        elif status == "held" and any((h or {}).get("rule") in LIMITS for h in holds or ()):
            add("limited", patient)
    invited = session.execute(
        sa.select(Invitation.patient).where(Invitation.trial_id == trial_id).distinct()
    )
    for (patient,) in invited:
        add("invited", patient)
    reached = session.execute(
        sa.select(Invitation.patient, InvitationEvent.to_state)
        .join(InvitationEvent, InvitationEvent.invitation_id == Invitation.id)
        .where(
            Invitation.trial_id == trial_id,
            InvitationEvent.to_state.in_(("consented", "enrolled")),
        )
        .distinct()
    )
    for patient, state in reached:
        add("consented", patient)  # enrolment follows consent
        if state == "enrolled":
            add("enrolled", patient)
    return RecruitmentBySite(
        trial_id=trial_id,
        patients={k: {s: frozenset(p) for s, p in v.items()} for k, v in out.items()},
    )
