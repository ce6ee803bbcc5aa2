"""What one facts envelope does to follow-up, in the caller's database transaction.

For the envelope's patient:

1. a Consent version updates the patient's consents (``followup_consents``);
2. for every trial the patient is **enrolled** in (recruitment's invitation reached ``enrolled``)
   that has a follow-up plan, follow-up is *authorised* when a live, active research Consent
   permits that trial (``provision.data`` naming its ResearchStudy) within its period, and no
   research opt-out is in force. A change of authorisation is an event on the trial's feed:
   ``started``, or ``withdrawn`` with the reason (consent withdrawn, research opt-out, period
   over). Withdrawal stops the feed at once: nothing of the patient reaches the trial after it,
   retractions included;
3. while authorised, each resource version ingested since follow-up started and within the
   plan's scope goes to the trial's feed as ``fact``, under the trial's pseudonym, with
   provenance (source, resource type, id, version) and no identity; a new version of a resource
   the trial holds first retracts the old one (``retraction``), a deletion or
   ``entered-in-error`` only retracts;
4. each forwarded version is evaluated against the plan's outcomes; a match is a safety event
   (one per trial, outcome and resource), recorded and queued in recruitment's outbox for the
   trial's safety contact, in the same transaction.

Every effect is keyed (feed by the forwarded ``seq``, safety events by id, outbox rows by dedupe
key), and the consumer commits its offsets in the same transaction, so a replay or a SIGKILL at
any moment neither loses nor repeats anything.

A consent's period also ends without any new event: :meth:`FollowupEngine.expire`, run by the
consumer's loop about every second, withdraws every active participant whose consent period
has ended (the same ``withdrawn`` entry, in one transaction with the participant's state, so a
restart or a second run finds nothing left to do: once).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.contracts.facts import ConsentFact, PatientFact, ResourceFacts
from recruitment.lifecycle import InvitationState
from recruitment.models import Invitation, OutboxMessage
from recruitment.notify import EMAIL, SCHEMA, SIGNAL_WEBHOOK

from .plans import Plan, matches, uninterpretable
from .pseudonym import trial_pseudonym
from .tables import (
    FeedEntry,
    FollowupConsent,
    FollowupPlan,
    Forwarded,
    Participant,
    SafetyEvent,
    TrialCursor,
)

FEED_SCHEMA = "concierge.followup/1"


@dataclass
class Outcome:
    """What one batch did (for logs, metrics and tests)."""

    feed: int = 0
    safety: int = 0
    started: int = 0
    withdrawn: int = 0
    trials: set[str] = field(default_factory=set)


def resource_type(key: str) -> str:
    parts = key.split("|")
    return parts[1] if len(parts) >= 3 else ""


class FollowupEngine:
    def __init__(self, secret: bytes, base_url: str, clock: Any = None) -> None:
        from recruitment.models import utcnow

        self.secret = secret
        self.base_url = base_url.rstrip("/")
        self.clock = clock or utcnow
        self._plans: dict[str, tuple[int, Plan]] = {}

    # ------------------------------------------------------------------ plans

    def plan(self, session: Session, trial_id: str) -> Plan | None:
        row = session.get(FollowupPlan, trial_id)
        if row is None:
            return None
        cached = self._plans.get(trial_id)
        if cached is None or cached[0] != row.version:
            cached = (row.version, Plan.model_validate(row.plan))
            self._plans[trial_id] = cached
        return cached[1]

    # ------------------------------------------------------------------ envelopes

    def apply(self, session: Session, envelopes: Iterable[ResourceFacts], out: Outcome) -> None:
        for envelope in envelopes:
            self.apply_one(session, envelope, out)

    def apply_one(self, session: Session, envelope: ResourceFacts, out: Outcome) -> None:
        now = self.clock()
        is_consent = resource_type(envelope.key) == "Consent"
        if is_consent:
            self._consent(session, envelope)
        enrolments = session.execute(
            sa.select(Invitation.trial_id, Invitation.id, Invitation.state_changed_at).where(
                Invitation.patient == envelope.patient,
                Invitation.state == InvitationState.ENROLLED.value,
            )
        ).all()
        for trial_id, invitation_id, enrolled_at in enrolments:
            plan = self.plan(session, trial_id)
            if plan is None:
                continue
            participant = self._authorise(
                session, trial_id, envelope.patient, invitation_id, enrolled_at, now, out
            )
            if participant is None or not participant.active or is_consent:
                continue
            if envelope.provenance.ingested_at < participant.started_at:
                continue
            self._forward(session, plan, participant, envelope, now, out)

    def _consent(self, session: Session, envelope: ResourceFacts) -> None:
        row = session.get(FollowupConsent, envelope.key)
        if row is not None and row.seq >= envelope.seq:
            return
        facts = [f for f in envelope.facts if isinstance(f, ConsentFact)]
        live = not envelope.retracted and bool(facts)
        values = {
            "patient": envelope.patient,
            "seq": envelope.seq,
            "live": live,
            "research_opt_out": live and any(f.research_opt_out for f in facts),
            "trials": sorted({t for f in facts for t in f.follow_up_trials}) if live else [],
            "period_start": facts[0].period_start if live else None,
            "period_end": facts[0].period_end if live else None,
            "ingested_at": envelope.provenance.ingested_at,
        }
        if row is None:
            session.add(FollowupConsent(key=envelope.key, **values))
        else:
            for name, value in values.items():
                setattr(row, name, value)
        session.flush()

    def consent_state(
        self, session: Session, patient: str, trial_id: str, now: datetime
    ) -> tuple[bool, str, datetime | None]:
        """(authorised, reason when not, since when the permitting consent holds)."""
        consents = session.scalars(
            sa.select(FollowupConsent).where(
                FollowupConsent.patient == patient, FollowupConsent.live.is_(True)
            )
        ).all()
        if any(c.research_opt_out for c in consents):
            return False, "research opt-out", None
        permitting = [c for c in consents if trial_id in c.trials]
        if not permitting:
            return False, "no consent to follow-up for this trial (withdrawn or never given)", None
        current = [
            c
            for c in permitting
            if (c.period_start is None or c.period_start <= now)
            and (c.period_end is None or now < c.period_end)
        ]
        if not current:
            return False, "the consent's period does not cover now", None
        return True, "", min(c.ingested_at for c in current)

    def _authorise(
        self,
        session: Session,
        trial_id: str,
        patient: str,
        invitation_id: str,
        enrolled_at: datetime,
        now: datetime,
        out: Outcome,
    ) -> Participant | None:
        authorised, reason, since = self.consent_state(session, patient, trial_id, now)
        participant = session.get(Participant, (trial_id, patient))
        if participant is not None and not participant.pseudonym:  # its arm came first
            participant.pseudonym = trial_pseudonym(self.secret, trial_id, patient)
        if participant is None:
            if not authorised:
                return None
            assert since is not None
            participant = Participant(
                trial_id=trial_id,
                patient=patient,
                pseudonym=trial_pseudonym(self.secret, trial_id, patient),
                invitation_id=invitation_id,
                arm=None,
                active=False,
                started_at=max(since, enrolled_at),
                stopped_at=None,
                stop_reason=None,
            )
            session.add(participant)
        if authorised and not participant.active:
            assert since is not None
            participant.active = True
            participant.started_at = max(since, enrolled_at)
            participant.stopped_at = None
            participant.stop_reason = None
            self._feed(session, trial_id, participant.pseudonym, "started", {}, now)
            out.started += 1
        elif not authorised and participant.active:
            participant.active = False
            participant.stopped_at = now
            participant.stop_reason = reason
            self._feed(session, trial_id, participant.pseudonym, "withdrawn",
                       {"reason": reason}, now)  # fmt: skip
            out.withdrawn += 1
        out.trials.add(trial_id)
        return participant

    def expire(self, session: Session, out: Outcome) -> None:
        """Withdraw, once, each active participant whose consent's period has ended by now
        (the timer: no new event of the participant is needed)."""
        now = self.clock()
        ended = (
            sa.select(Participant)
            .join(FollowupConsent, FollowupConsent.patient == Participant.patient)
            .where(
                Participant.active.is_(True),
                FollowupConsent.live.is_(True),
                FollowupConsent.period_end.is_not(None),
                FollowupConsent.period_end <= now,
            )
            .order_by(Participant.trial_id, Participant.patient)
            # a second consumer's timer waits here, then finds the row no longer active
            .with_for_update(of=Participant)
        )
        for participant in session.scalars(ended).unique().all():
            authorised, reason, _ = self.consent_state(
                session, participant.patient, participant.trial_id, now
            )
            if authorised or not participant.active:
                continue  # another consent still covers now
            participant.active = False
            participant.stopped_at = now
            participant.stop_reason = reason
            self._feed(session, participant.trial_id, participant.pseudonym, "withdrawn",
                       {"reason": reason}, now)  # fmt: skip
            out.withdrawn += 1
            out.trials.add(participant.trial_id)

    # ------------------------------------------------------------------ forwarding

    def _forward(
        self,
        session: Session,
        plan: Plan,
        participant: Participant,
        envelope: ResourceFacts,
        now: datetime,
        out: Outcome,
    ) -> None:
        trial_id = participant.trial_id
        held = session.get(Forwarded, (trial_id, envelope.key))
        if held is not None and held.seq >= envelope.seq:
            return  # a replay, or an older version arriving late
        provenance = _provenance(envelope)
        if held is not None and held.live:
            self._feed(session, trial_id, participant.pseudonym, "retraction",
                       {"resource": {**_provenance_of(held), "retracted_by": envelope.seq}},
                       now)  # fmt: skip
            out.feed += 1
        facts = _in_scope(plan, envelope)
        matched = [o.name for o in plan.outcomes if matches(o, envelope)]
        live = bool(facts) and not envelope.retracted
        feed_seq = 0
        if live:
            feed_seq = self._feed(session, trial_id, participant.pseudonym, "fact",
                                  {"resource": provenance, "facts": facts}, now)  # fmt: skip
            out.feed += 1
        if held is None:
            held = Forwarded(trial_id=trial_id, key=envelope.key, patient=envelope.patient,
                             seq=envelope.seq, live=live, outcomes=matched if live else [],
                             feed_seq=feed_seq)  # fmt: skip
            session.add(held)
        else:
            held.seq, held.live, held.feed_seq = envelope.seq, live, feed_seq
            held.outcomes = matched if live else []
        if not live:
            return
        for outcome in plan.outcomes:
            problem = uninterpretable(outcome, envelope)
            if (outcome.name in matched or problem is not None) and self._safety(
                session, plan, participant, outcome.name, envelope, problem, now
            ):
                out.safety += 1

    def _feed(
        self,
        session: Session,
        trial_id: str,
        participant: str,
        kind: str,
        extra: dict[str, Any],
        now: datetime,
    ) -> int:
        cursor = session.get(TrialCursor, trial_id, with_for_update=True)
        if cursor is None:
            cursor = TrialCursor(trial_id=trial_id, written=0, published=0)
            session.add(cursor)
        cursor.written += 1
        body = {
            "schema": FEED_SCHEMA,
            "trial": trial_id,
            "seq": cursor.written,
            "participant": participant,
            "type": kind,
            "at": now.isoformat(),
            **extra,
        }
        session.add(FeedEntry(trial_id=trial_id, seq=cursor.written, participant=participant,
                              type=kind, body=body, at=now))  # fmt: skip
        session.flush()
        return cursor.written

    # ------------------------------------------------------------------ safety

    def _safety(
        self,
        session: Session,
        plan: Plan,
        participant: Participant,
        outcome: str,
        envelope: ResourceFacts,
        problem: str | None,
        now: datetime,
    ) -> bool:
        """Record and queue one safety event; False when it was recorded before."""
        trial_id = participant.trial_id
        identifier = f"{trial_id}|{outcome}|{envelope.key}"
        if session.get(SafetyEvent, identifier) is not None:
            return False
        contact = plan.safety_contact
        outbox_id: str | None = None
        status = "uninterpretable" if problem else "notified"
        if contact is None:
            status = "no-contact"
        else:
            outbox_id = str(uuid.uuid4())
            session.add(self._message(outbox_id, identifier, trial_id, participant.pseudonym,
                                      outcome, envelope, problem, contact.channel,
                                      contact.address, now))  # fmt: skip
        session.add(
            SafetyEvent(
                id=identifier,
                trial_id=trial_id,
                participant=participant.pseudonym,
                outcome=outcome,
                key=envelope.key,
                seq=envelope.seq,
                version=envelope.provenance.version,
                status=status,
                detail=problem,
                outbox_id=outbox_id,
                ingested_at=envelope.provenance.ingested_at,
                detected_at=now,
            )
        )
        self._feed(session, trial_id, participant.pseudonym, "safety",
                   {"outcome": outcome, "resource": _provenance(envelope),
                    "status": status, "detail": problem}, now)  # fmt: skip
        session.flush()
        return True

    def _message(
        self,
        message_id: str,
        identifier: str,
        trial_id: str,
        participant: str,
        outcome: str,
        envelope: ResourceFacts,
        problem: str | None,
        channel: str,
        address: str,
        now: datetime,
    ) -> OutboxMessage:
        link = f"{self.base_url}/v1/followup/trials/{trial_id}/safety-events"
        subject = f"Safety event in trial {trial_id}: {outcome}"
        body = (
            f"A participant of trial {trial_id} (trial pseudonym {participant}) had an event "
            f"matching the outcome {outcome!r}.\n"
            + (f"It could not be evaluated automatically: {problem}.\n" if problem else "")
            + f"Source: {envelope.provenance.resource_type} version "
            f"{envelope.provenance.version}, ingested {envelope.provenance.ingested_at.isoformat()}"
            f".\nDetails: {link}\nThis message carries no identity.\n"
        )
        return OutboxMessage(
            id=message_id,
            kind="safety",
            channel=EMAIL if channel == "email" else SIGNAL_WEBHOOK,
            recipient=address,
            practitioner=f"trial:{trial_id}",
            subject=subject,
            body=body,
            payload={
                "schema": SCHEMA,
                "id": message_id,
                "kind": "safety",
                "subject": subject,
                "text": body,
                "created_at": now.isoformat(),
                "trial": trial_id,
                "participant": participant,
                "outcome": outcome,
                "event": identifier,
                "resource_type": envelope.provenance.resource_type,
                "version": envelope.provenance.version,
                "link": link,
            },
            dedupe_key=f"safety:{identifier}"[:512],
            invitation_id=None,
            created_at=now,
            attempts=0,
            next_attempt_at=now,
        )


def _provenance(envelope: ResourceFacts) -> dict[str, Any]:
    p = envelope.provenance
    return {
        "key": envelope.key,
        "seq": envelope.seq,
        "source": p.source,
        "type": p.resource_type,
        "id": p.resource_id,
        "version": p.version,
        "last_updated": p.last_updated.isoformat() if p.last_updated else None,
        "ingested_at": p.ingested_at.isoformat(),
    }


def _provenance_of(row: Forwarded) -> dict[str, Any]:
    source, kind, ident = [*row.key.split("|", 2), "", ""][:3]
    return {"key": row.key, "seq": row.seq, "source": source, "type": kind, "id": ident}


def _in_scope(plan: Plan, envelope: ResourceFacts) -> list[dict[str, Any]]:
    """The envelope's facts the trial may see: its scope's kinds; of a Patient only death."""
    if envelope.retracted:
        return []
    out: list[dict[str, Any]] = []
    for fact in envelope.facts:
        if isinstance(fact, PatientFact):
            if "death" in plan.scope and fact.deceased:
                when = fact.deceased_date.isoformat() if fact.deceased_date else None
                out.append({"kind": "death", "date": when})
        elif fact.kind in plan.scope:
            out.append(fact.model_dump(mode="json"))
    return out
