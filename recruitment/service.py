"""The recruitment service: inputs in, candidates and invitations out, in one database.

Two kinds of callers share it:

* the consumer applies messages from the trials, cohort, facts and reference topics through a
  :class:`UnitOfWork`, one database transaction per batch, and calls :meth:`UnitOfWork.finish` to
  re-evaluate what the batch touched before committing;
* the clinician API and the scheduler move invitations through their states with
  :meth:`RecruitmentService.transition`, then ``finish`` the same way, so a freed slot or a lifted
  hold is used in the same transaction.

Idempotency: every input carries a counter (trial ``version``, cohort ``change``, facts and
reference ``seq``); a message whose counter is not above the stored one changes nothing, so
replaying any part of any topic, any number of times, leaves the database as it was.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.contracts.cohorts import CohortRecord
from core.contracts.facts import (
    ConsentFact,
    OrganizationRecord,
    PatientFact,
    PractitionerRecord,
    PractitionerRoleRecord,
    ReferenceRecord,
    ResourceFacts,
)
from core.contracts.trials import ENDED_STATUSES, OpaqueTrialRecord
from core.patient_view import build_view

from .contracts import resource_type_of
from .lifecycle import (
    ACTIVE,
    AWAITING_CLINICIAN,
    BEFORE_CONTACT,
    FINAL,
    InvitationState,
    check_transition,
)
from .models import (
    Base,
    Candidate,
    CohortMembership,
    FactVersion,
    HoldRecord,
    Invitation,
    InvitationEvent,
    Organization,
    OutboxMessage,
    PatientPractitioner,
    PatientProfile,
    Practitioner,
    PractitionerRole,
    ReferenceRow,
    Trial,
    TrialSite,
    utcnow,
)
from .routing import RoleCode, is_trial_recruiter, route
from .rules import (
    Hold,
    PastInvitation,
    PatientView,
    Policy,
    Rule,
    RuleInput,
    TrialView,
    Usage,
    evaluate,
    excludes,
)

log = logging.getLogger(__name__)

_Ref = TypeVar("_Ref", Practitioner, PractitionerRole, Organization)

S = InvitationState
_CHUNK = 500


class CandidateStatus(StrEnum):
    HELD = "held"
    UNROUTED = "unrouted"
    EXCLUDED = "excluded"
    INVITED = "invited"
    CLOSED = "closed"
    WITHDRAWN = "withdrawn"


C = CandidateStatus
#: Candidates the rules look at again whenever something they depend on changes.
OPEN_STATUSES = frozenset({C.HELD, C.UNROUTED, C.EXCLUDED})


class NotFound(LookupError):
    pass


class ConcurrentChange(RuntimeError):
    """The invitation changed since the caller read it (optimistic version mismatch)."""


class AlertWriter(Protocol):
    """Writes notifications to the outbox (see :class:`recruitment.notify.OutboxWriter`)."""

    def alert(
        self,
        session: Session,
        invitation: Invitation,
        trial: Trial,
        now: datetime,
        *,
        fresh: bool = False,
    ) -> int:
        """Enqueue the new-candidate alert; return how many channels it was queued on.

        ``fresh``: the invitation was created in this transaction, so no alert of it can exist
        yet and the dedupe look-up is skipped (the unique dedupe key still guards it)."""
        ...

    def alert_rows(
        self,
        session: Session,
        invitation_id: str,
        site: str,
        practitioner: str,
        trial: Trial,
        now: datetime,
    ) -> list[dict[str, Any]]:
        """The same alert as outbox column values (one row per channel), written by the caller
        together with others; the invitation is new, so none of them exists yet."""
        ...


class EligibilityCheck(Protocol):
    """Re-checks a candidate's eligibility now (time-window criteria age as time passes).

    Returns False when the patient is no longer eligible, True when they are, None when it
    cannot tell (the candidate is left as it is).
    """

    def __call__(self, trial_id: str, patient: str, now: datetime) -> bool | None: ...


# --------------------------------------------------------------------------- the directory


class SqlDirectory:
    """Practitioners and trial-recruiter roles, read from the reference tables."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._recruiters: dict[str, list[str]] = {}
        self._active: dict[str, bool] = {}
        #: rows read in bulk, held so that ``session.get`` finds them in the identity map
        self._rows: list[Practitioner] = []

    def prefetch(self, keys: Iterable[str]) -> None:
        """Read the given practitioners in a few queries (not one each)."""
        wanted = sorted({k for k in keys if k not in self._active})
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            rows = self.session.scalars(sa.select(Practitioner).where(Practitioner.key.in_(chunk)))
            for row in rows:
                self._rows.append(row)
                self._active[row.key] = row.active and not row.retracted
            for key in chunk:
                self._active.setdefault(key, False)

    def is_active_practitioner(self, key: str) -> bool:
        if key not in self._active:
            row = self.session.get(Practitioner, key)
            if row is not None:
                self._rows.append(row)
            self._active[key] = row is not None and row.active and not row.retracted
        return self._active[key]

    def recruiters_at(self, site: str) -> Sequence[str]:
        if site not in self._recruiters:
            self._recruiters[site] = self._find_recruiters(site)
        return self._recruiters[site]

    def _find_recruiters(self, site: str) -> list[str]:
        roles = self.session.scalars(
            sa.select(PractitionerRole)
            .where(
                PractitionerRole.trial_recruiter.is_(True),
                PractitionerRole.active.is_(True),
                PractitionerRole.retracted.is_(False),
                PractitionerRole.practitioner.is_not(None),
            )
            .order_by(PractitionerRole.practitioner, PractitionerRole.key)
        )
        found: list[str] = []
        for role in roles:
            practitioner = role.practitioner
            if practitioner is None or practitioner in found:
                continue
            if self.role_at_site(role, site) and self.is_active_practitioner(practitioner):
                found.append(practitioner)
        return found

    def role_at_site(self, role: PractitionerRole, site: str) -> bool:
        """The role's organisation is the site (by ODS code or key), or part of it."""
        if role.organization is None:
            return False
        if role.organization == site:
            return True
        org = self.session.get(Organization, role.organization)
        for _ in range(4):  # walk partOf a few levels: practice -> trust
            if org is None or org.retracted:
                return False
            if org.ods_code == site or org.key == site:
                return True
            org = self.session.get(Organization, org.part_of) if org.part_of else None
        return False

    def recruiter_sites(self, practitioner: str, sites: Iterable[str]) -> list[str]:
        """Of the given sites, those where the practitioner has a trial-recruiter role."""
        return [site for site in sites if practitioner in self.recruiters_at(site)]


# --------------------------------------------------------------------------- the service


@dataclass
class _Touched:
    """What a unit of work touched, re-evaluated together by :meth:`UnitOfWork.finish`."""

    patients: set[str] = field(default_factory=set)
    trials: set[str] = field(default_factory=set)
    candidates: set[str] = field(default_factory=set)
    reference_changed: bool = False

    def empty(self) -> bool:
        return not (self.patients or self.trials or self.candidates or self.reference_changed)


class RecruitmentService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: Policy | None = None,
        alerts: AlertWriter | None = None,
        clock: Callable[[], datetime] = utcnow,
        eligibility: EligibilityCheck | None = None,
        read_sessions: sessionmaker[Session] | None = None,
    ) -> None:
        self.sessions = sessions
        #: for reads only (the clinician API's lists): never wait for the write lock
        self.read_sessions = read_sessions or sessions
        self.policy = policy or Policy()
        self.alerts = alerts
        self.clock = clock
        self.eligibility = eligibility

    # -- units of work --
    def unit_of_work(self, session: Session) -> UnitOfWork:
        return UnitOfWork(self, session)

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    # -- invitations --
    def get_invitation(
        self, session: Session, invitation_id: str, lock: bool = False
    ) -> Invitation:
        query = sa.select(Invitation).where(Invitation.id == invitation_id)
        if lock:
            query = query.with_for_update()
        invitation = session.scalars(query.execution_options(populate_existing=True)).first()
        if invitation is None:
            raise NotFound(f"no invitation {invitation_id}")
        return invitation

    def transition(
        self,
        session: Session,
        invitation: Invitation,
        target: InvitationState,
        actor: str,
        note: str | None = None,
        expected_version: int | None = None,
        work: UnitOfWork | None = None,
    ) -> Invitation:
        """Move an invitation to ``target``, recording who, when and why.

        Raises :class:`~recruitment.lifecycle.IllegalTransition` (naming the state and the
        allowed next states) or :class:`ConcurrentChange` when ``expected_version`` is stale.
        Re-evaluates what the change frees up (pass ``work`` to defer that to its ``finish``).
        """
        if expected_version is not None and invitation.version != expected_version:
            raise ConcurrentChange(
                f"invitation {invitation.id} is at version {invitation.version}, "
                f"not {expected_version}; reload it"
            )
        own = work is None
        unit = work or self.unit_of_work(session)
        unit.move(invitation, target, actor, note)
        if own:
            unit.finish()
        return invitation

    def on_alert_delivered(self, session: Session, invitation_id: str, channel: str) -> None:
        """The dispatcher delivered a new-candidate alert: the clinician has it now."""
        try:
            invitation = self.get_invitation(session, invitation_id, lock=True)
        except NotFound:
            return
        if invitation.state == S.PROPOSED:
            self.unit_of_work(session).move(
                invitation, S.SENT_TO_CLINICIAN, "system:notify", f"alert delivered by {channel}"
            )

    # -- scheduled work --
    def expire_stale(self, older_than: timedelta, now: datetime | None = None) -> int:
        """Expire open invitations with no change for ``older_than``; one transaction each."""
        now = now or self.clock()
        cutoff = now - older_than
        with self.sessions() as session:
            ids = list(
                session.scalars(
                    sa.select(Invitation.id)
                    .where(Invitation.active.is_(True), Invitation.state_changed_at < cutoff)
                    .order_by(Invitation.state_changed_at)
                )
            )
        expired = 0
        for invitation_id in ids:
            with self.sessions.begin() as session:
                invitation = self.get_invitation(session, invitation_id, lock=True)
                if not invitation.active or invitation.state_changed_at >= cutoff:
                    continue
                self.transition(
                    session,
                    invitation,
                    S.EXPIRED,
                    "system:scheduler",
                    f"no change for {older_than.days} days",
                )
                expired += 1
        return expired

    def reevaluate_open(self, now: datetime | None = None) -> int:
        """Re-check every open candidate (holds that lift with time, eligibility that ages).

        One short transaction per candidate. With an eligibility check, candidates that are no
        longer eligible are withdrawn if the patient has not been contacted. Returns how many
        candidates changed status.
        """
        statuses = [*OPEN_STATUSES, C.INVITED] if self.eligibility else list(OPEN_STATUSES)
        with self.sessions() as session:
            ids = list(
                session.scalars(
                    sa.select(Candidate.id)
                    .where(Candidate.status.in_(statuses))
                    .order_by(Candidate.arrival, Candidate.id)
                )
            )
        changed = 0
        for candidate_id in ids:
            with self.sessions.begin() as session:
                work = self.unit_of_work(session)
                if work.recheck(candidate_id, now or self.clock()):
                    changed += 1
        return changed


class UnitOfWork:
    """One unit of work in one session (the caller's transaction): applies topic messages
    (trial, cohort, facts, reference) and invitation moves, records what they touched, and
    re-evaluates it on :meth:`finish`, before the caller commits."""

    def __init__(self, service: RecruitmentService, session: Session, batched: bool = True) -> None:
        self.service = service
        self.session = session
        self.policy = service.policy
        self.now = service.clock()
        self.touched = _Touched()
        self._arrival: int | None = None
        #: Batch-shaped (the default): what the rules read is fetched a batch at a time and then
        #: kept in memory, updated as this unit of work changes it (every change of a cached row
        #: goes through this class); inserts are flushed together. ``False`` is the row-at-a-time
        #: path (a query per read, a flush per insert), kept as the reference the batched path
        #: is tested against. The database confirms either way: its unique indexes (one open
        #: invitation per patient, one candidate per trial and patient) refuse a wrong decision,
        #: which fails the whole batch, and capacity is counted under the trial's row lock.
        self.batched = batched
        self._trials: dict[str, Trial | None] = {}
        self._trial_views: dict[str, TrialView] = {}
        self._memberships: dict[tuple[str, str], CohortMembership | None] = {}
        self._by_key: dict[tuple[str, str], Candidate | None] = {}
        self._profiles: dict[str, PatientProfile | None] = {}
        #: per patient, every invitation of theirs as the rules read it (oldest first)
        self._invitations: dict[str, list[PastInvitation]] = {}
        #: invitations made by this unit of work, their events and alerts: written in bulk
        self._new_invitations: list[dict[str, Any]] = []
        self._new_events: list[dict[str, Any]] = []
        self._new_outbox: list[dict[str, Any]] = []
        self._open_holds: dict[str, list[HoldRecord]] = {}
        self._usage: dict[tuple[str, str | None], int] = {}
        self._locked: set[str] = set()
        self._directory: SqlDirectory | None = None
        #: reference rows changed and not yet flushed (routing reads them with queries)
        self._reference_dirty = False

    # ------------------------------------------------------------------ batch reads

    def prefetch_cohort(self, keys: Iterable[tuple[str, str]]) -> None:
        """Read, for a batch of cohort records (``(trial, patient)`` keys), their memberships,
        candidates and trials in a few set-based queries."""
        if not self.batched:
            return
        wanted = sorted({k for k in keys if k not in self._memberships})
        if not wanted:
            return
        trial_ids = sorted({t for t, _ in wanted})
        for trial_id in trial_ids:
            self._trial(trial_id)
        patients = sorted({p for _, p in wanted})
        for start in range(0, len(patients), _CHUNK):
            chunk = patients[start : start + _CHUNK]
            for membership in self.session.scalars(
                sa.select(CohortMembership).where(
                    CohortMembership.trial_id.in_(trial_ids), CohortMembership.patient.in_(chunk)
                )
            ):
                self._memberships[(membership.trial_id, membership.patient)] = membership
            for candidate in self.session.scalars(
                sa.select(Candidate).where(
                    Candidate.trial_id.in_(trial_ids), Candidate.patient.in_(chunk)
                )
            ):
                self._by_key[(candidate.trial_id, candidate.patient)] = candidate
        for key in wanted:
            self._memberships.setdefault(key, None)
            self._by_key.setdefault(key, None)

    def _prefetch_rules(self, candidates: Sequence[Candidate]) -> None:
        """Read what the rules and routing need for these candidates in a few queries: the
        patients' profiles and every invitation of theirs, the candidates' open holds, and the
        practitioners their GPs name."""
        if not self.batched or not candidates:
            return
        s = self.session
        patients = sorted({c.patient for c in candidates if c.patient not in self._profiles})
        for start in range(0, len(patients), _CHUNK):
            chunk = patients[start : start + _CHUNK]
            for profile in s.scalars(
                sa.select(PatientProfile).where(PatientProfile.pseudonym.in_(chunk))
            ):
                self._profiles[profile.pseudonym] = profile
            for patient in chunk:
                self._profiles.setdefault(patient, None)
        patients = sorted({c.patient for c in candidates if c.patient not in self._invitations})
        for start in range(0, len(patients), _CHUNK):
            chunk = patients[start : start + _CHUNK]
            found: dict[str, list[PastInvitation]] = {p: [] for p in chunk}
            for invitation in s.scalars(
                sa.select(Invitation)
                .where(Invitation.patient.in_(chunk))
                .order_by(Invitation.created_at, Invitation.id)
            ):
                found[invitation.patient].append(_past(invitation))
            self._invitations.update(found)
        ids = sorted({c.id for c in candidates if c.id not in self._open_holds})
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            holds: dict[str, list[HoldRecord]] = {i: [] for i in chunk}
            for record in s.scalars(
                sa.select(HoldRecord)
                .where(HoldRecord.candidate_id.in_(chunk), HoldRecord.released_at.is_(None))
                .order_by(HoldRecord.id)
            ):
                holds[record.candidate_id].append(record)
            self._open_holds.update(holds)
        profiles = (self._profiles.get(c.patient) for c in candidates)
        gps = {key for p in profiles if p is not None for key in p.general_practitioners}
        self.directory().prefetch(gps)

    def directory(self) -> SqlDirectory:
        """The practitioner directory; a fresh one whenever reference data changed."""
        if self._directory is None or not self.batched:
            self._directory = SqlDirectory(self.session)
        return self._directory

    def _trial(self, trial_id: str) -> Trial | None:
        if self.batched and trial_id in self._trials:
            return self._trials[trial_id]
        trial = self.session.get(Trial, trial_id)
        if self.batched:
            self._trials[trial_id] = trial
        return trial

    def _membership(self, trial_id: str, patient: str) -> CohortMembership | None:
        key = (trial_id, patient)
        if self.batched and key in self._memberships:
            return self._memberships[key]
        membership = self.session.get(CohortMembership, key)
        if self.batched:
            self._memberships[key] = membership
        return membership

    def _patient_profile(self, patient: str) -> PatientProfile | None:
        if self.batched and patient in self._profiles:
            return self._profiles[patient]
        profile = self.session.get(PatientProfile, patient)
        if self.batched:
            self._profiles[patient] = profile
        return profile

    def _patient_invitations(self, patient: str) -> list[PastInvitation]:
        if self.batched and patient in self._invitations:
            return self._invitations[patient]
        self._write_pending()
        found = [
            _past(i)
            for i in self.session.scalars(
                sa.select(Invitation)
                .where(Invitation.patient == patient)
                .order_by(Invitation.created_at, Invitation.id)
            )
        ]
        if self.batched:
            self._invitations[patient] = found
        return found

    def _holds_open(self, candidate_id: str) -> list[HoldRecord]:
        if self.batched and candidate_id in self._open_holds:
            return self._open_holds[candidate_id]
        found = list(
            self.session.scalars(
                sa.select(HoldRecord)
                .where(HoldRecord.candidate_id == candidate_id, HoldRecord.released_at.is_(None))
                .order_by(HoldRecord.id)
            )
        )
        if self.batched:
            self._open_holds[candidate_id] = found
        return found

    def _usage_of(self, trial_id: str, site: str | None = None) -> int:
        key = (trial_id, site)
        if self.batched and key in self._usage:
            return self._usage[key]
        used = self._used(trial_id, site)
        if self.batched:
            self._usage[key] = used
        return used

    def _counted(self, trial_id: str, site: str, before: bool, after: bool) -> None:
        """An invitation started or stopped counting toward its trial's and site's capacity."""
        if before == after:
            return
        delta = 1 if after else -1
        for key in ((trial_id, None), (trial_id, site)):
            if key in self._usage:
                self._usage[key] += delta

    def _trial_view(self, trial: Trial) -> TrialView:
        view = self._trial_views.get(trial.id) if self.batched else None
        if view is None:
            view = TrialView(
                id=trial.id,
                status=trial.status,
                recruiting_sites=frozenset(ts.site for ts in trial.sites),
                target=trial.target,
                site_targets={ts.site: ts.target for ts in trial.sites if ts.target is not None},
            )
            if self.batched:
                self._trial_views[trial.id] = view
        return view

    # ------------------------------------------------------------------ trials

    def trial(self, trial_id: str, record: OpaqueTrialRecord | None) -> bool:
        """Apply a trial record (None: a tombstone, the trial is gone). False when stale."""
        s = self.session
        trial = self._trial(trial_id)
        self._trial_views.pop(trial_id, None)
        if record is None:
            if trial is None or trial.status == "retired":
                return False
            trial.status = "retired"
            trial.updated_at = self.now
            self._trial_ended(trial, "trial removed from the registry")
            return True
        if trial is not None and record.version <= trial.version:
            return False
        if trial is None:
            trial = Trial(id=record.id, version=record.version, status=record.status)
            s.add(trial)
            self._trials[trial_id] = trial
        old_sites = {ts.site for ts in trial.sites}
        trial.version = record.version
        trial.title = record.title
        trial.sponsor = record.sponsor
        trial.status = record.status
        trial.target = record.target
        trial.registered_at = record.registered_at
        trial.updated_at = self.now
        sites = list(dict.fromkeys(record.recruiting_sites))
        existing = {ts.site: ts for ts in trial.sites}
        trial.sites = [
            self._trial_site(existing.get(site), trial.id, site, record) for site in sites
        ]
        s.flush()
        self._trial_views.pop(trial.id, None)
        if record.status in ENDED_STATUSES:
            self._trial_ended(trial, f"trial {record.status}")
        else:
            for site in old_sites - set(sites):
                self._site_dropped(trial, site)
            self._candidates_from_memberships(trial)
        self.touched.trials.add(trial.id)
        return True

    @staticmethod
    def _trial_site(
        row: TrialSite | None, trial_id: str, site: str, record: OpaqueTrialRecord
    ) -> TrialSite:
        row = row or TrialSite(trial_id=trial_id, site=site)
        row.target = record.site_targets.get(site)
        row.recruiter = record.recruiters.get(site)
        return row

    def _trial_ended(self, trial: Trial, note: str) -> None:
        for candidate in self._candidates(Candidate.trial_id == trial.id):
            self._withdraw_candidate(candidate, note, before_contact_only=False)

    def _site_dropped(self, trial: Trial, site: str) -> None:
        for candidate in self._candidates(Candidate.trial_id == trial.id, Candidate.site == site):
            self._withdraw_candidate(
                candidate, f"site {site} no longer recruits", before_contact_only=True
            )

    def _candidates_from_memberships(self, trial: Trial) -> None:
        sites = {ts.site for ts in trial.sites}
        members = self.session.scalars(
            sa.select(CohortMembership).where(
                CohortMembership.trial_id == trial.id, CohortMembership.member.is_(True)
            )
        )
        for membership in members:
            if membership.site in sites:
                self._enter(trial, membership.patient, membership.site)

    # ------------------------------------------------------------------ cohorts

    def cohort(self, trial_id: str, patient: str, record: CohortRecord | None) -> bool:
        """Apply a cohort record (None: a tombstone, ``member: false``). False when stale."""
        s = self.session
        membership = self._membership(trial_id, patient)
        if record is not None:
            if membership is not None and record.change <= membership.change:
                return False
            if membership is None:
                membership = CohortMembership(trial_id=trial_id, patient=patient)
                s.add(membership)
                if self.batched:
                    self._memberships[(trial_id, patient)] = membership
            membership.change = record.change
            membership.member = record.member
            membership.site = record.site
            membership.trial_version = record.trial_version
            membership.steps = record.steps
            membership.at = record.at
            membership.updated_at = self.now
        else:
            if membership is None or not membership.member:
                return False
            membership.member = False
            membership.updated_at = self.now
        trial = self._trial(trial_id)
        if trial is None:
            return True  # kept; candidates are made when the trial arrives
        site = membership.site
        site_recruits = site is not None and site in {ts.site for ts in trial.sites}
        candidate = self._candidate(trial_id, patient)
        if membership.member and site_recruits and trial.status not in ENDED_STATUSES:
            # A paused trial still gets candidates: the rules hold them until it recruits.
            assert site is not None
            self._enter(trial, patient, site)
        elif candidate is not None:
            reason = (
                "left the cohort" if not membership.member else f"now at {site}, not recruiting"
            )
            self._withdraw_candidate(candidate, reason, before_contact_only=True)
        return True

    def _enter(self, trial: Trial, patient: str, site: str) -> None:
        candidate = self._candidate(trial.id, patient)
        if candidate is None:
            candidate = Candidate(
                id=RecruitmentService.new_id(),
                trial_id=trial.id,
                patient=patient,
                site=site,
                status=C.HELD,
                held_reasons=[],
                arrival=self._next_arrival(),
                created_at=self.now,
                updated_at=self.now,
            )
            self.session.add(candidate)
            if self.batched:  # flushed with the batch; the unique (trial, patient) index checks
                self._by_key[(trial.id, patient)] = candidate
                self._open_holds[candidate.id] = []
            else:
                self.session.flush()
        elif candidate.status == C.WITHDRAWN:
            candidate.status = C.HELD
            candidate.site = site
            candidate.updated_at = self.now
        elif candidate.status in OPEN_STATUSES and candidate.site != site:
            candidate.site = site
            candidate.updated_at = self.now
        self.touched.candidates.add(candidate.id)

    def _next_arrival(self) -> int:
        if self._arrival is None:
            last = self.session.scalar(sa.select(sa.func.max(Candidate.arrival)))
            self._arrival = int(last or 0)
        self._arrival += 1
        return self._arrival

    def _withdraw_candidate(
        self, candidate: Candidate, note: str, before_contact_only: bool
    ) -> None:
        if candidate.status in OPEN_STATUSES:
            self._set_status(candidate, C.WITHDRAWN, ())
            return
        if candidate.status != C.INVITED:
            return
        invitation = self._active_invitation(candidate.id)
        if invitation is None:
            return
        if before_contact_only and invitation.state not in BEFORE_CONTACT:
            return  # the patient has been approached: their clinician closes it
        self.move(invitation, S.WITHDRAWN, "system:recruitment", note)
        self._set_status(candidate, C.WITHDRAWN, ())

    # ------------------------------------------------------------------ facts

    def facts(self, envelope: ResourceFacts) -> bool:
        """Apply a Patient or Consent envelope (others are ignored). False when stale."""
        kind = {"Patient": "patient", "Consent": "consent"}.get(
            resource_type_of(envelope.key) or ""
        )
        if kind is None:
            return False
        s = self.session
        version = s.get(FactVersion, envelope.key)
        if version is not None and envelope.seq <= version.seq:
            return False
        if version is None:
            version = FactVersion(key=envelope.key)
            s.add(version)
        version.patient = envelope.patient
        version.kind = kind
        version.seq = envelope.seq
        version.retracted = envelope.retracted
        version.data = _fact_data(kind, envelope)
        provenance = envelope.provenance
        version.effective_at = provenance.last_updated or provenance.ingested_at
        s.flush()
        self._rebuild_profile(envelope.patient)
        return True

    def _rebuild_profile(self, patient: str) -> None:
        s = self.session
        versions = list(
            s.scalars(
                sa.select(FactVersion).where(
                    FactVersion.patient == patient, FactVersion.retracted.is_(False)
                )
            )
        )
        # the patient view decides (one rule with the engines and the device counters): the
        # latest Patient version's demographics, an active research opt-out
        view = build_view(patient, {v.key: _entry_of(v) for v in versions})
        demographics = view.demographics
        opt_out = view.research_opt_out
        profile = self._profile(patient)
        before = (profile.research_opt_out, tuple(profile.general_practitioners), profile.known)
        profile.known = demographics is not None
        profile.site = demographics.site if demographics else None
        profile.region = demographics.region if demographics else None
        profile.gp_practice = demographics.gp_practice if demographics else None
        gps = list(demographics.general_practitioners) if demographics else []
        profile.general_practitioners = gps
        profile.deceased = bool(demographics and demographics.deceased)
        if opt_out != profile.research_opt_out:
            profile.research_opt_out = opt_out
            profile.opt_out_changed_at = self.now
        profile.updated_at = self.now
        if tuple(gps) != before[1]:
            s.execute(sa.delete(PatientPractitioner).where(PatientPractitioner.patient == patient))
            s.add_all(
                PatientPractitioner(patient=patient, practitioner=key, position=i)
                for i, key in enumerate(dict.fromkeys(gps))
            )
        if opt_out and not before[0]:
            self._opted_out(patient)
        if profile.deceased:
            self._deceased(patient)
        self.touched.patients.add(patient)

    def _opted_out(self, patient: str) -> None:
        """Opt-outs win: every open invitation of the patient is withdrawn, at any stage."""
        for invitation in self._active_invitations(patient):
            self.move(invitation, S.WITHDRAWN, "system:opt-out", "research opt-out recorded")
            candidate = self.session.get(Candidate, invitation.candidate_id)
            if candidate is not None:
                self._set_status(candidate, C.HELD, ())  # re-evaluated: excluded
                self.touched.candidates.add(candidate.id)

    def _deceased(self, patient: str) -> None:
        for invitation in self._active_invitations(patient):
            self.move(invitation, S.WITHDRAWN, "system:recruitment", "patient recorded deceased")
            candidate = self.session.get(Candidate, invitation.candidate_id)
            if candidate is not None:
                self._set_status(candidate, C.HELD, ())
                self.touched.candidates.add(candidate.id)

    def _profile(self, patient: str) -> PatientProfile:
        profile = self._patient_profile(patient)
        if profile is None:
            profile = PatientProfile(
                pseudonym=patient,
                known=False,
                general_practitioners=[],
                deceased=False,
                research_opt_out=False,
                updated_at=self.now,
            )
            self.session.add(profile)
            if self.batched:
                self._profiles[patient] = profile
        return profile

    # ------------------------------------------------------------------ reference data

    def reference(self, record: ReferenceRecord) -> bool:
        """Apply a practitioner, role or organisation record. False when stale or ignored."""
        body = record.record
        kind = resource_type_of(record.key)
        if kind == "Practitioner":
            person = self._reference_row(Practitioner, record)
            if person is None:
                return False
            known = body if isinstance(body, PractitionerRecord) else None
            person.name = known.name if known else None
            person.email = known.email if known else None
        elif kind == "PractitionerRole":
            role_row = self._reference_row(PractitionerRole, record)
            if role_row is None:
                return False
            role = body if isinstance(body, PractitionerRoleRecord) else None
            codes = [c.model_dump() for c in role.codes] if role else []
            # The facts model keeps no role text yet; read it if a later adapter adds it.
            texts = [str(t) for t in getattr(role, "texts", ()) or () if t]
            role_row.practitioner = role.practitioner if role else None
            role_row.organization = role.organization if role else None
            role_row.codes = codes
            role_row.texts = texts
            role_row.email = role.email if role else None
            role_row.trial_recruiter = is_trial_recruiter(
                (RoleCode(c.get("system"), c.get("code"), c.get("display")) for c in codes),
                texts,
            )
        elif kind == "Organization":
            org_row = self._reference_row(Organization, record)
            if org_row is None:
                return False
            org = body if isinstance(body, OrganizationRecord) else None
            org_row.ods_code = org.ods_code if org else None
            org_row.name = org.name if org else None
            org_row.part_of = org.part_of if org else None
        else:
            return False
        self.touched.reference_changed = True
        self._directory = None
        self._reference_dirty = True
        return True

    def _reference_row(self, model: type[_Ref], record: ReferenceRecord) -> _Ref | None:
        """The row to update for a newer record (None when the record is not newer)."""
        row = self.session.get(model, record.key)
        if row is not None and record.seq <= row.seq:
            return None
        if row is None:
            row = model(key=record.key)
            self.session.add(row)
        retracted = record.retracted or record.record is None
        row.seq = record.seq
        row.retracted = retracted
        row.active = not retracted and bool(getattr(record.record, "active", True))
        row.updated_at = self.now
        return row

    def reference_tombstone(self, key: str) -> bool:
        models: dict[str, type[ReferenceRow]] = {
            "Practitioner": Practitioner,
            "PractitionerRole": PractitionerRole,
            "Organization": Organization,
        }
        model = models.get(resource_type_of(key) or "")
        if model is None:
            return False
        row = self.session.get(model, key)
        if row is None or row.retracted:
            return False
        row.retracted = True
        row.active = False
        row.updated_at = self.now
        self.touched.reference_changed = True
        self._directory = None
        self._reference_dirty = True
        return True

    # ------------------------------------------------------------------ invitations

    def move(
        self,
        invitation: Invitation,
        target: InvitationState,
        actor: str,
        note: str | None,
    ) -> None:
        """The one place an invitation changes state (checked, recorded, candidate updated).

        Written at once, so an optimistic-version conflict is raised here."""
        current = InvitationState(invitation.state)
        check_transition(current, target)
        self._counted(invitation.trial_id, invitation.site, _counts(current), _counts(target))
        invitation.state = target.value
        invitation.active = target in ACTIVE
        invitation.state_changed_at = self.now
        if target is S.PATIENT_CONTACTED:
            invitation.contacted_at = self.now
        if target in FINAL:
            invitation.closed_at = self.now
        cached = self._invitations.get(invitation.patient) if self.batched else None
        if cached is not None:
            cached[:] = [_past(invitation) if i.id == invitation.id else i for i in cached]
        self.session.add(
            InvitationEvent(
                invitation_id=invitation.id,
                at=self.now,
                actor=actor,
                from_state=current.value,
                to_state=target.value,
                note=note,
            )
        )
        if target in FINAL:
            # An alert not yet delivered would announce an invitation that is gone: cancel it.
            self.session.execute(
                sa.update(OutboxMessage)
                .where(
                    OutboxMessage.invitation_id == invitation.id,
                    OutboxMessage.delivered_at.is_(None),
                    OutboxMessage.failed_at.is_(None),
                )
                .values(
                    failed_at=self.now,
                    next_attempt_at=None,
                    last_error=f"cancelled: invitation {target.value}",
                )
                .execution_options(synchronize_session=False)
            )
            candidate = self.session.get(Candidate, invitation.candidate_id)
            if candidate is not None and candidate.status == C.INVITED:
                self._set_status(candidate, C.CLOSED, ())
            # A slot, or the patient's one open invitation, is free: look again.
            self.touched.trials.add(invitation.trial_id)
            self.touched.patients.add(invitation.patient)
        self.session.flush()

    def _create_invitation(self, candidate: Candidate, practitioner: str, trial: Trial) -> None:
        if self.batched:
            self._create_invitation_row(candidate, practitioner, trial)
            return
        invitation = Invitation(
            id=RecruitmentService.new_id(),
            candidate_id=candidate.id,
            trial_id=candidate.trial_id,
            patient=candidate.patient,
            site=candidate.site,
            practitioner=practitioner,
            state=S.PROPOSED.value,
            active=True,
            created_at=self.now,
            state_changed_at=self.now,
        )
        self.session.add(invitation)
        self.session.add(
            InvitationEvent(
                invitation_id=invitation.id,
                at=self.now,
                actor="system:recruitment",
                from_state=None,
                to_state=S.PROPOSED.value,
                note=candidate.routing_reason,
            )
        )
        self.session.flush()
        queued = 0
        if self.service.alerts is not None:
            queued = self.service.alerts.alert(self.session, invitation, trial, self.now)
        if queued == 0:
            self.move(invitation, S.SENT_TO_CLINICIAN, "system:recruitment", _NO_CHANNEL)

    def _create_invitation_row(self, candidate: Candidate, practitioner: str, trial: Trial) -> None:
        """The batched path's invitation: the same rows as :meth:`_create_invitation` writes
        (its event, its alert, or straight to ``sent_to_clinician`` when no channel takes the
        alert), as column values written in bulk by :meth:`_write_pending`; the rules of the
        rest of the batch see it at once."""
        invitation_id = RecruitmentService.new_id()
        outbox: list[dict[str, Any]] = []
        if self.service.alerts is not None:
            outbox = self.service.alerts.alert_rows(
                self.session, invitation_id, candidate.site, practitioner, trial, self.now
            )
        row: dict[str, Any] = {
            "id": invitation_id,
            "candidate_id": candidate.id,
            "trial_id": candidate.trial_id,
            "patient": candidate.patient,
            "site": candidate.site,
            "practitioner": practitioner,
            "state": S.PROPOSED.value,
            "active": True,
            "version": 1,
            "created_at": self.now,
            "state_changed_at": self.now,
            "contacted_at": None,
            "closed_at": None,
        }
        events = [_event(invitation_id, self.now, None, S.PROPOSED, candidate.routing_reason)]
        if not outbox:
            # as move() would: checked, recorded, and a second version (an update) of the row
            check_transition(S.PROPOSED, S.SENT_TO_CLINICIAN)
            row["state"] = S.SENT_TO_CLINICIAN.value
            row["version"] = 2
            events.append(_event(invitation_id, self.now, S.PROPOSED, S.SENT_TO_CLINICIAN))
        self._new_invitations.append(row)
        self._new_events.extend(events)
        self._new_outbox.extend(outbox)
        cached = self._invitations.get(candidate.patient)
        if cached is not None:
            cached.append(
                PastInvitation(
                    id=invitation_id,
                    trial=candidate.trial_id,
                    state=InvitationState(row["state"]),
                    created_at=self.now,
                    state_changed_at=self.now,
                    reached_patient=False,
                )
            )
        self._counted(candidate.trial_id, candidate.site, False, True)

    def _write_pending(self) -> None:
        """Write the invitations, events and alerts made in memory: the session's own changes
        first (their candidates), then one multi-row insert per table. The database checks
        them here (one open invitation per patient, unique alert keys): a refusal fails the
        unit of work, and with it the consumer's batch."""
        if not self._new_invitations:
            return
        invitations, events, outbox = self._new_invitations, self._new_events, self._new_outbox
        self._new_invitations, self._new_events, self._new_outbox = [], [], []
        s = self.session
        s.flush()
        tables = Base.metadata.tables  # Core inserts: the rows are plain values, no objects
        s.execute(sa.insert(tables[Invitation.__tablename__]), invitations)
        s.execute(sa.insert(tables[InvitationEvent.__tablename__]), events)
        if outbox:
            s.execute(sa.insert(tables[OutboxMessage.__tablename__]), outbox)

    # ------------------------------------------------------------------ evaluation

    def finish(self) -> None:
        """Re-evaluate every open candidate the unit of work touched, oldest first."""
        rounds = 0
        while not self.touched.empty():
            touched, self.touched = self.touched, _Touched()
            rounds += 1
            if rounds > 10:  # pragma: no cover - a bug guard: evaluation always settles
                raise RuntimeError("candidate re-evaluation does not settle")
            conditions: list[sa.ColumnElement[bool]] = []
            for column, values in (
                (Candidate.patient, touched.patients),
                (Candidate.trial_id, touched.trials),
                (Candidate.id, touched.candidates),
            ):
                ordered = sorted(values)
                for start in range(0, len(ordered), _CHUNK):
                    conditions.append(column.in_(ordered[start : start + _CHUNK]))
            if touched.reference_changed:
                conditions.append(Candidate.status == C.UNROUTED)
            if not self.batched:
                candidates = self._candidates(
                    Candidate.status.in_(list(OPEN_STATUSES)), sa.or_(*conditions)
                )
                directory = self.directory()
                for candidate in candidates:
                    self.evaluate(candidate, directory)
                continue
            if self._reference_dirty:  # routing reads the reference tables: write them first
                self.session.flush()
                self._reference_dirty = False
            # Without autoflush: the batch's new candidates are inserted once, with the status
            # the rules give them, by _write_pending (not inserted, then updated).
            with self.session.no_autoflush:
                candidates = self._open_candidates(touched, conditions)
                self._prefetch_rules(candidates)
                directory = self.directory()
                for candidate in candidates:
                    self.evaluate(candidate, directory)
        self._write_pending()

    def _open_candidates(
        self, touched: _Touched, conditions: list[sa.ColumnElement[bool]]
    ) -> list[Candidate]:
        """The open candidates ``touched`` names, as :meth:`finish`'s query finds them after a
        flush, read without one: the stored rows it matches, or whose id it names (a status
        changed in memory), and the unit of work's new candidates; the status that counts is
        the one in memory."""
        ids = sorted(touched.candidates)
        named = [
            Candidate.id.in_(ids[start : start + _CHUNK]) for start in range(0, len(ids), _CHUNK)
        ]
        found = {
            c.id: c
            for c in self._candidates(
                sa.or_(
                    sa.and_(Candidate.status.in_(list(OPEN_STATUSES)), sa.or_(*conditions)),
                    *named,
                )
            )
        }
        for new in self.session.new:
            if isinstance(new, Candidate) and (
                new.patient in touched.patients
                or new.trial_id in touched.trials
                or new.id in touched.candidates
                or (touched.reference_changed and new.status == C.UNROUTED)
            ):
                found[new.id] = new
        return sorted(
            (c for c in found.values() if c.status in OPEN_STATUSES),
            key=lambda c: (c.arrival, c.id),
        )

    def evaluate(self, candidate: Candidate, directory: SqlDirectory | None = None) -> None:
        """Apply the rules to one open candidate; invite it if nothing holds it back."""
        if candidate.status not in OPEN_STATUSES:
            return
        s = self.session
        trial = self._trial(candidate.trial_id)
        if trial is None:  # pragma: no cover - candidates are only made for known trials
            return
        capacity = trial.target is not None or self._site_target(trial, candidate.site)
        if self.batched:
            if capacity and trial.id not in self._locked:
                # Capacity: lock the trial row (PostgreSQL) once, count under the lock, then
                # keep the counts in memory as this unit of work invites and closes.
                s.execute(sa.select(Trial.id).where(Trial.id == trial.id).with_for_update()).all()
                self._locked.add(trial.id)
                for key in [k for k in self._usage if k[0] == trial.id]:
                    del self._usage[key]
            holds = self._holds(candidate, trial)
        else:
            holds = self._holds(candidate, trial)
            if not holds and capacity:
                # Capacity: lock the trial row (PostgreSQL) and count again under the lock.
                s.execute(sa.select(Trial.id).where(Trial.id == trial.id).with_for_update()).all()
                holds = self._holds(candidate, trial)
        if holds:
            status = C.EXCLUDED if excludes(holds) else C.HELD
            self._set_status(candidate, status, holds)
            return
        profile = self._patient_profile(candidate.patient)
        site_row = next((ts for ts in trial.sites if ts.site == candidate.site), None)
        found = route(
            candidate.site,
            list(profile.general_practitioners) if profile else [],
            site_row.recruiter if site_row else None,
            directory or self.directory(),
        )
        candidate.routing_via = found.via.value
        candidate.routing_reason = found.reason
        if found.practitioner is None:
            candidate.routed_to = None
            self._set_status(candidate, C.UNROUTED, (Hold(Rule.NO_CLINICIAN, found.reason),))
            return
        candidate.routed_to = found.practitioner
        self._set_status(candidate, C.INVITED, ())
        self._create_invitation(candidate, found.practitioner, trial)

    def recheck(self, candidate_id: str, now: datetime) -> bool:
        """Re-check one candidate (scheduler): eligibility hook first, then the rules."""
        self.now = now
        candidate = self.session.get(Candidate, candidate_id)
        if candidate is None:
            return False
        before = candidate.status
        check = self.service.eligibility
        if check is not None and check(candidate.trial_id, candidate.patient, now) is False:
            self._withdraw_candidate(
                candidate, "no longer eligible (re-evaluated)", before_contact_only=True
            )
        if candidate.status in OPEN_STATUSES:
            self.evaluate(candidate)
            self.finish()
        return candidate.status != before

    def _holds(self, candidate: Candidate, trial: Trial) -> tuple[Hold, ...]:
        profile = self._patient_profile(candidate.patient)
        patient = PatientView(
            known=bool(profile and profile.known),
            research_opt_out=bool(profile and profile.research_opt_out),
            deceased=bool(profile and profile.deceased),
        )
        invitations = self._patient_invitations(candidate.patient)
        view = self._trial_view(trial)
        usage = Usage(
            trial=self._usage_of(trial.id) if trial.target is not None else 0,
            site=self._usage_of(trial.id, candidate.site)
            if self._site_target(trial, candidate.site)
            else 0,
        )
        return evaluate(
            RuleInput(view, candidate.site, patient, invitations, usage, self.now), self.policy
        )

    @staticmethod
    def _site_target(trial: Trial, site: str) -> bool:
        return any(ts.site == site and ts.target is not None for ts in trial.sites)

    def _used(self, trial_id: str, site: str | None = None) -> int:
        self._write_pending()
        query = (
            sa.select(sa.func.count())
            .select_from(Invitation)
            .where(
                Invitation.trial_id == trial_id,
                sa.or_(Invitation.active.is_(True), Invitation.state == S.ENROLLED.value),
            )
        )
        if site is not None:
            query = query.where(Invitation.site == site)
        return int(self.session.scalar(query) or 0)

    def _set_status(
        self, candidate: Candidate, status: CandidateStatus, holds: Sequence[Hold]
    ) -> None:
        """Set a candidate's status and its holds, opening and releasing hold records."""
        candidate.status = status.value
        candidate.updated_at = self.now
        wanted = {(h.rule.value, h.reason): h for h in holds}
        open_records = self._holds_open(candidate.id)
        kept: list[HoldRecord] = []
        for record in open_records:
            if (record.rule, record.reason) in wanted:
                wanted.pop((record.rule, record.reason))
                kept.append(record)
            else:
                record.released_at = self.now
        for hold in wanted.values():
            record = HoldRecord(
                candidate_id=candidate.id,
                trial_id=candidate.trial_id,
                patient=candidate.patient,
                rule=hold.rule.value,
                reason=hold.reason,
                until=hold.until,
                opened_at=self.now,
            )
            self.session.add(record)
            kept.append(record)
        if self.batched:
            self._open_holds[candidate.id] = kept
        candidate.held_reasons = [h.as_dict() for h in holds]
        if status in (C.HELD, C.EXCLUDED):
            # Not routed (any more); a closed or withdrawn candidate keeps its routing as history.
            candidate.routed_to = None
            candidate.routing_via = None
            candidate.routing_reason = None

    # ------------------------------------------------------------------ queries

    def _candidate(self, trial_id: str, patient: str) -> Candidate | None:
        key = (trial_id, patient)
        if self.batched and key in self._by_key:
            return self._by_key[key]
        found = self.session.scalars(
            sa.select(Candidate).where(Candidate.trial_id == trial_id, Candidate.patient == patient)
        ).first()
        if self.batched:
            self._by_key[key] = found
        return found

    def _candidates(self, *where: sa.ColumnElement[bool]) -> list[Candidate]:
        return list(
            self.session.scalars(
                sa.select(Candidate).where(*where).order_by(Candidate.arrival, Candidate.id)
            )
        )

    def _active_invitation(self, candidate_id: str) -> Invitation | None:
        self._write_pending()
        return self.session.scalars(
            sa.select(Invitation).where(
                Invitation.candidate_id == candidate_id, Invitation.active.is_(True)
            )
        ).first()

    def _active_invitations(self, patient: str) -> list[Invitation]:
        self._write_pending()
        return list(
            self.session.scalars(
                sa.select(Invitation)
                .where(Invitation.patient == patient, Invitation.active.is_(True))
                .with_for_update()
            )
        )


_NO_CHANNEL = "no notification channel for this clinician: shown in the app only"


def _past(invitation: Invitation) -> PastInvitation:
    """An invitation as the rules read it."""
    return PastInvitation(
        id=invitation.id,
        trial=invitation.trial_id,
        state=InvitationState(invitation.state),
        created_at=invitation.created_at,
        state_changed_at=invitation.state_changed_at,
        reached_patient=invitation.contacted_at is not None,
    )


def _event(
    invitation_id: str,
    at: datetime,
    source: InvitationState | None,
    target: InvitationState,
    note: str | None = _NO_CHANNEL,
) -> dict[str, Any]:
    """An invitation event of the routing itself (actor ``system:recruitment``), as values."""
    return {
        "invitation_id": invitation_id,
        "at": at,
        "actor": "system:recruitment",
        "from_state": source.value if source else None,
        "to_state": target.value,
        "note": note,
    }


def _counts(state: InvitationState) -> bool:
    """Whether an invitation in this state takes a place of its trial's capacity."""
    return state in ACTIVE or state is S.ENROLLED


def _fact_data(kind: str, envelope: ResourceFacts) -> dict[str, Any]:
    """What a Patient or Consent version keeps: its facts of that kind as JSON objects and its
    ``last_updated``, read back through the patient view (:func:`_entry_of`)."""
    if envelope.retracted:
        return {}
    wanted = PatientFact if kind == "patient" else ConsentFact
    updated = envelope.provenance.last_updated
    return {
        "facts": [f.model_dump(mode="json") for f in envelope.facts if isinstance(f, wanted)],
        "last_updated": updated.isoformat() if updated else None,
    }


def _entry_of(version: FactVersion) -> dict[str, Any]:
    """A stored version as the patient view reads an entry. Rows written before the view
    (``data`` holding the first fact's fields) read as that one fact, dated by
    ``effective_at``."""
    data = version.data or {}
    if "facts" in data:
        facts, updated = list(data["facts"]), data.get("last_updated")
    else:
        facts = [{**data, "kind": version.kind}] if data else []
        updated = version.effective_at.isoformat() if version.effective_at else None
    return {
        "seq": version.seq,
        "retracted": version.retracted,
        "facts": facts,
        "provenance": {"last_updated": updated},
    }


# --------------------------------------------------------------------------- aggregates


def counts_by_state(session: Session, trial_id: str) -> dict[str, int]:
    """The trial's recruitment funnel: invitations by state, and candidates waiting.

    Keys: every invitation state, plus ``held`` and ``unrouted`` (candidates without an
    invitation). Patients with a research opt-out are not candidates and are not counted. The
    numbers are exact: wrap them in disclosure control before a sponsor sees them.
    """
    counts: dict[str, int] = {state.value: 0 for state in InvitationState}
    counts[C.HELD.value] = 0
    counts[C.UNROUTED.value] = 0
    rows = session.execute(
        sa.select(Invitation.state, sa.func.count())
        .where(Invitation.trial_id == trial_id)
        .group_by(Invitation.state)
    )
    for state, n in rows:
        counts[state] = int(n)
    rows = session.execute(
        sa.select(Candidate.status, sa.func.count())
        .where(
            Candidate.trial_id == trial_id,
            Candidate.status.in_([C.HELD.value, C.UNROUTED.value]),
        )
        .group_by(Candidate.status)
    )
    for status, n in rows:
        counts[status] = int(n)
    return counts


def awaiting_by_practitioner(session: Session) -> dict[str, dict[str, int]]:
    """Per clinician, their open invitations by state (what a digest reports)."""
    out: dict[str, dict[str, int]] = {}
    rows = session.execute(
        sa.select(Invitation.practitioner, Invitation.state, sa.func.count())
        .where(Invitation.state.in_([s.value for s in (*AWAITING_CLINICIAN, S.PROPOSED)]))
        .group_by(Invitation.practitioner, Invitation.state)
        .order_by(Invitation.practitioner, Invitation.state)
    )
    for practitioner, state, n in rows:
        out.setdefault(practitioner, {})[state] = int(n)
    return out


__all__ = [
    "OPEN_STATUSES",
    "CandidateStatus",
    "ConcurrentChange",
    "EligibilityCheck",
    "NotFound",
    "RecruitmentService",
    "SqlDirectory",
    "UnitOfWork",
    "awaiting_by_practitioner",
    "counts_by_state",
]
