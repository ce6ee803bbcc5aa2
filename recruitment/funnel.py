"""The trial's invited patients per invitation state, from the recruitment store, as the
:class:`core.contracts.invitations.InvitedByState` contract the sponsor funnel reads."""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.contracts.invitations import InvitedByState

from .models import Invitation


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
