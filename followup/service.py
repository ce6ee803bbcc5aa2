"""Reads and declarations behind the follow-up API: plans, the feed by cursor, safety events,
endpoint counts per arm with their provenance, and the arm recorded at enrolment."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from recruitment.lifecycle import InvitationState
from recruitment.models import Invitation, utcnow

from .plans import Plan
from .tables import FeedEntry, FollowupPlan, Forwarded, Participant, SafetyEvent, TrialCursor


class NotFound(LookupError):
    pass


class FollowupService:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    # ------------------------------------------------------------------ plans

    def put_plan(self, trial_id: str, plan: Plan, actor: str) -> int:
        with self.sessions.begin() as session:
            row = session.get(FollowupPlan, trial_id, with_for_update=True)
            data = plan.model_dump(mode="json")
            if row is None:
                session.add(FollowupPlan(trial_id=trial_id, version=1, plan=data,
                                         declared_by=actor, updated_at=utcnow()))  # fmt: skip
                return 1
            if row.plan != data:
                row.version += 1
                row.plan, row.declared_by, row.updated_at = data, actor, utcnow()
            return row.version

    def get_plan(self, trial_id: str) -> tuple[int, Plan]:
        with self.sessions() as session:
            row = session.get(FollowupPlan, trial_id)
            if row is None:
                raise NotFound(f"trial {trial_id} has no follow-up plan")
            return row.version, Plan.model_validate(row.plan)

    # ------------------------------------------------------------------ arms

    def trial_of(self, invitation_id: str) -> str:
        with self.sessions() as session:
            invitation = session.get(Invitation, invitation_id)
            if invitation is None or invitation.state != InvitationState.ENROLLED.value:
                raise NotFound(f"no enrolled invitation {invitation_id}")
            return invitation.trial_id

    def record_arm(self, invitation_id: str, arm: str) -> str:
        """Record the arm of an enrolled invitation; the trial id."""
        with self.sessions.begin() as session:
            invitation = session.get(Invitation, invitation_id)
            if invitation is None or invitation.state != InvitationState.ENROLLED.value:
                raise NotFound(f"no enrolled invitation {invitation_id}")
            participant = session.get(Participant, (invitation.trial_id, invitation.patient))
            if participant is None:
                participant = Participant(trial_id=invitation.trial_id, patient=invitation.patient,
                                pseudonym="", invitation_id=invitation_id, arm=arm,
                                active=False, started_at=invitation.state_changed_at,
                                stopped_at=None, stop_reason=None)  # fmt: skip
                session.add(participant)
            participant.arm = arm
            return invitation.trial_id

    # ------------------------------------------------------------------ feed

    def feed(self, trial_id: str, after: int, limit: int) -> dict[str, Any]:
        with self.sessions() as session:
            cursor = session.get(TrialCursor, trial_id)
            rows = session.scalars(
                sa.select(FeedEntry.body)
                .where(FeedEntry.trial_id == trial_id, FeedEntry.seq > after)
                .order_by(FeedEntry.seq)
                .limit(limit)
            ).all()
        entries = list(rows)
        last = entries[-1]["seq"] if entries else after
        written = cursor.written if cursor is not None else 0
        return {
            "trial": trial_id,
            "entries": entries,
            "next": last,
            "more": last < written,
            "written": written,
        }

    def entries_after(self, trial_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        return list(self.feed(trial_id, after, limit)["entries"])

    # ------------------------------------------------------------------ safety

    def safety_events(self, trial_id: str) -> list[dict[str, Any]]:
        with self.sessions() as session:
            rows = session.scalars(
                sa.select(SafetyEvent)
                .where(SafetyEvent.trial_id == trial_id)
                .order_by(SafetyEvent.detected_at, SafetyEvent.id)
            ).all()
            return [
                {
                    "participant": r.participant,
                    "outcome": r.outcome,
                    "resource": {"key": r.key, "seq": r.seq, "version": r.version},
                    "status": r.status,
                    "detail": r.detail,
                    "notification": r.outbox_id,
                    "ingested_at": r.ingested_at.isoformat(),
                    "detected_at": r.detected_at.isoformat(),
                }
                for r in rows
            ]

    # ------------------------------------------------------------------ endpoint counts

    def endpoint_counts(self, trial_id: str, drill: bool = False) -> dict[str, Any]:
        """Per arm: participants followed up, and those with the plan's endpoint among the
        versions the trial holds now (with, when ``drill``, the resource versions behind each
        count, as device signals give theirs)."""
        version, plan = self.get_plan(trial_id)
        if plan.endpoint is None:
            raise NotFound(f"trial {trial_id}'s plan declares no endpoint")
        with self.sessions() as session:
            participants = session.execute(
                sa.select(Participant.patient, Participant.pseudonym, Participant.arm).where(
                    Participant.trial_id == trial_id, Participant.pseudonym != ""
                )
            ).all()
            held = session.execute(
                sa.select(
                    Forwarded.patient, Forwarded.key, Forwarded.seq, Forwarded.outcomes
                ).where(Forwarded.trial_id == trial_id, Forwarded.live.is_(True))
            ).all()
        arms: dict[str, dict[str, Any]] = {}
        arm_of = {}
        for patient, pseudonym, arm in participants:
            name = arm or "unassigned"
            arm_of[patient] = (name, pseudonym)
            arms.setdefault(name, {"arm": name, "participants": 0, "with_endpoint": 0,
                                   "provenance": {}})["participants"] += 1  # fmt: skip
        for patient, key, seq, outcomes in held:
            if plan.endpoint not in (outcomes or []) or patient not in arm_of:
                continue
            name, pseudonym = arm_of[patient]
            arms[name]["provenance"].setdefault(pseudonym, []).append({"key": key, "seq": seq})
        out = []
        for entry in sorted(arms.values(), key=lambda a: a["arm"]):
            entry["with_endpoint"] = len(entry["provenance"])
            if not drill:
                del entry["provenance"]
            else:
                entry["provenance"] = [
                    {"participant": p, "resources": sorted(r, key=lambda x: x["key"])}
                    for p, r in sorted(entry["provenance"].items())
                ]
            out.append(entry)
        return {"trial": trial_id, "plan_version": version, "endpoint": plan.endpoint,
                "arms": out, "as_of": datetime.now().astimezone().isoformat()}  # fmt: skip
