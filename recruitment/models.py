"""The recruitment database, as SQLAlchemy 2 ORM models.

The schema is created and changed only by the Alembic migrations in ``recruitment/migrations``
(``recruitment.db.upgrade``); a test checks that the migrations and these models agree.

What is here: trials and their sites (from the trials topic); each patient's recruitment profile
(site, GP, opt-out) and the fact versions it was built from (from the facts topic); practitioners,
their roles and organisations (from the reference topic); cohort membership per trial and patient
(from the cohort topic); candidates, the holds that kept them back, invitations and their
history; the notification outbox; and the consumer's offsets and skipped messages.

Nothing identifying is stored here: patients are pseudonyms, and names, NHS numbers and contact
details stay in the identity vault (:mod:`fhir_adapters.vault`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

KEY = 512  # reference and resource keys: source|Type|id
PSEUDONYM = 64
SITE = 128
STATE = 32
ID = 36  # uuid4 text


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware, on SQLite too."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


# --------------------------------------------------------------------------- trials


class Trial(Base):
    __tablename__ = "trials"

    id: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    version: Mapped[int]
    title: Mapped[str | None] = mapped_column(sa.Text)
    sponsor: Mapped[str | None] = mapped_column(sa.Text)
    #: ``active`` recruits; anything else (``retired``, ``paused``) does not.
    status: Mapped[str] = mapped_column(sa.String(STATE))
    #: Target number of enrolled plus open invitations across all sites (None: no limit).
    target: Mapped[int | None]
    registered_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    sites: Mapped[list[TrialSite]] = relationship(
        back_populates="trial", cascade="all, delete-orphan", order_by="TrialSite.site"
    )


class TrialSite(Base):
    """A recruiting site of a trial, with its own target and named recruiter."""

    __tablename__ = "trial_sites"

    trial_id: Mapped[str] = mapped_column(sa.ForeignKey("trials.id"), primary_key=True)
    site: Mapped[str] = mapped_column(sa.String(SITE), primary_key=True)
    target: Mapped[int | None]
    #: Practitioner reference key of the trial's recruiter at this site.
    recruiter: Mapped[str | None] = mapped_column(sa.String(KEY), index=True)

    trial: Mapped[Trial] = relationship(back_populates="sites")


# --------------------------------------------------------------------------- patients


class PatientProfile(Base):
    """What recruitment needs to know of a patient; built from their Patient and Consent facts."""

    __tablename__ = "patient_profiles"

    pseudonym: Mapped[str] = mapped_column(sa.String(PSEUDONYM), primary_key=True)
    #: False until a (non-retracted) Patient record has arrived.
    known: Mapped[bool] = mapped_column(default=False)
    site: Mapped[str | None] = mapped_column(sa.String(SITE))
    region: Mapped[str | None] = mapped_column(sa.String(64))
    gp_practice: Mapped[str | None] = mapped_column(sa.String(KEY))
    #: The GP Practitioner reference keys in the order the Patient lists them.
    general_practitioners: Mapped[list[Any]] = mapped_column(default=list)
    deceased: Mapped[bool] = mapped_column(default=False)
    research_opt_out: Mapped[bool] = mapped_column(default=False)
    #: When this service learned the opt-out status changed (set or lifted).
    opt_out_changed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class PatientPractitioner(Base):
    """Patient -> registered GP, one row each, so "patients whose GP is me" is an index lookup."""

    __tablename__ = "patient_practitioners"

    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), primary_key=True)
    practitioner: Mapped[str] = mapped_column(sa.String(KEY), primary_key=True, index=True)
    position: Mapped[int]


class FactVersion(Base):
    """The latest version seen of each Patient or Consent resource (facts ``seq`` per key)."""

    __tablename__ = "fact_versions"

    key: Mapped[str] = mapped_column(sa.String(KEY), primary_key=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    #: ``patient`` or ``consent``.
    kind: Mapped[str] = mapped_column(sa.String(16))
    seq: Mapped[int]
    retracted: Mapped[bool] = mapped_column(default=False)
    #: ``{"facts": [...], "last_updated": ...}``: the version's Patient or Consent facts as JSON,
    #: read through the patient view (rows written before it hold the first fact's fields).
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: lastUpdated of the source resource (or its ingestion time); the patient view ranks
    #: Patient versions by ``data["last_updated"]``, as every other consumer does.
    effective_at: Mapped[datetime]


# --------------------------------------------------------------------------- reference data


class ReferenceRow:
    """Columns every reference-topic row has: its key, the ``seq`` seen, retraction, activity."""

    key: Mapped[str] = mapped_column(sa.String(KEY), primary_key=True)
    seq: Mapped[int]
    retracted: Mapped[bool] = mapped_column(default=False)
    active: Mapped[bool] = mapped_column(default=True)
    updated_at: Mapped[datetime]


class Practitioner(ReferenceRow, Base):
    __tablename__ = "practitioners"

    name: Mapped[str | None] = mapped_column(sa.Text)
    email: Mapped[str | None] = mapped_column(sa.Text)


class PractitionerRole(ReferenceRow, Base):
    __tablename__ = "practitioner_roles"

    practitioner: Mapped[str | None] = mapped_column(sa.String(KEY), index=True)
    organization: Mapped[str | None] = mapped_column(sa.String(KEY), index=True)
    #: Role codings as ``{"system", "code", "display"}`` objects, and the role's free texts.
    codes: Mapped[list[Any]] = mapped_column(default=list)
    texts: Mapped[list[Any]] = mapped_column(default=list)
    email: Mapped[str | None] = mapped_column(sa.Text)
    #: The role marks its practitioner as a trial recruiter (see routing.is_trial_recruiter).
    trial_recruiter: Mapped[bool] = mapped_column(default=False, index=True)


class Organization(ReferenceRow, Base):
    __tablename__ = "organizations"

    ods_code: Mapped[str | None] = mapped_column(sa.String(SITE), index=True)
    name: Mapped[str | None] = mapped_column(sa.Text)
    part_of: Mapped[str | None] = mapped_column(sa.String(KEY))


# --------------------------------------------------------------------------- cohorts, candidates


class CohortMembership(Base):
    """The latest cohort record per ``trial|patient`` (its ``change`` makes replays harmless)."""

    __tablename__ = "cohort_memberships"

    trial_id: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), primary_key=True, index=True)
    change: Mapped[int]
    member: Mapped[bool]
    site: Mapped[str | None] = mapped_column(sa.String(SITE))
    trial_version: Mapped[int | None]
    steps: Mapped[str | None] = mapped_column(sa.String(200))
    at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class Candidate(Base):
    """A patient in a trial's cohort at a recruiting site, and what became of them.

    ``status``: ``held`` (a rule holds them back), ``unrouted`` (no clinician found),
    ``excluded`` (research opt-out or deceased: not a candidate), ``invited`` (an open
    invitation), ``closed`` (the invitation ended), ``withdrawn`` (left the cohort or the trial
    stopped recruiting before the patient was contacted).
    """

    __tablename__ = "candidates"
    __table_args__ = (sa.UniqueConstraint("trial_id", "patient"),)

    id: Mapped[str] = mapped_column(sa.String(ID), primary_key=True)
    trial_id: Mapped[str] = mapped_column(sa.ForeignKey("trials.id"), index=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    site: Mapped[str] = mapped_column(sa.String(SITE), index=True)
    status: Mapped[str] = mapped_column(sa.String(STATE), index=True)
    routed_to: Mapped[str | None] = mapped_column(sa.String(KEY), index=True)
    routing_via: Mapped[str | None] = mapped_column(sa.String(STATE))
    routing_reason: Mapped[str | None] = mapped_column(sa.Text)
    #: The holds in force now, as ``{"rule", "reason", "until"}`` objects.
    held_reasons: Mapped[list[Any]] = mapped_column(default=list)
    #: Order of arrival: first come, first routed when capacity is short.
    arrival: Mapped[int] = mapped_column(sa.BigInteger, index=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    trial: Mapped[Trial] = relationship()


class HoldRecord(Base):
    """A rule that held a candidate back: when it started, why, and when it lifted."""

    __tablename__ = "holds"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    candidate_id: Mapped[str] = mapped_column(sa.ForeignKey("candidates.id"), index=True)
    trial_id: Mapped[str] = mapped_column(sa.String(200))
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    rule: Mapped[str] = mapped_column(sa.String(STATE))
    reason: Mapped[str] = mapped_column(sa.Text)
    until: Mapped[datetime | None]
    opened_at: Mapped[datetime]
    released_at: Mapped[datetime | None]


# --------------------------------------------------------------------------- invitations


class Invitation(Base):
    """One invitation of one candidate, routed to one clinician, through the lifecycle.

    ``active`` mirrors "state is not final"; a partial unique index on ``patient`` where active
    makes "at most one open invitation per patient" hold in the database too. ``version`` is an
    optimistic lock: two concurrent transitions cannot both win.
    """

    __tablename__ = "invitations"
    __table_args__ = (
        sa.Index(
            "uq_invitations_active_patient",
            "patient",
            unique=True,
            sqlite_where=sa.text("active = 1"),
            postgresql_where=sa.text("active"),
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(ID), primary_key=True)
    candidate_id: Mapped[str] = mapped_column(sa.ForeignKey("candidates.id"), index=True)
    trial_id: Mapped[str] = mapped_column(sa.ForeignKey("trials.id"), index=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    site: Mapped[str] = mapped_column(sa.String(SITE))
    practitioner: Mapped[str] = mapped_column(sa.String(KEY), index=True)
    state: Mapped[str] = mapped_column(sa.String(STATE), index=True)
    active: Mapped[bool]
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime]
    state_changed_at: Mapped[datetime]
    contacted_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]

    candidate: Mapped[Candidate] = relationship()
    events: Mapped[list[InvitationEvent]] = relationship(
        back_populates="invitation", order_by="InvitationEvent.id"
    )

    __mapper_args__ = {"version_id_col": version}


class InvitationEvent(Base):
    """History: every state an invitation entered, who moved it, when, and why."""

    __tablename__ = "invitation_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    invitation_id: Mapped[str] = mapped_column(sa.ForeignKey("invitations.id"), index=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(sa.Text)
    from_state: Mapped[str | None] = mapped_column(sa.String(STATE))
    to_state: Mapped[str] = mapped_column(sa.String(STATE))
    note: Mapped[str | None] = mapped_column(sa.Text)

    invitation: Mapped[Invitation] = relationship(back_populates="events")


# --------------------------------------------------------------------------- notifications


class OutboxMessage(Base):
    """A notification to deliver, written in the same transaction as the change it announces."""

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(sa.String(ID), primary_key=True)
    #: ``alert`` (new candidate), ``reminder`` or ``digest``.
    kind: Mapped[str] = mapped_column(sa.String(16))
    #: ``email`` or ``webhook``.
    channel: Mapped[str] = mapped_column(sa.String(16))
    #: An email address, or the practitioner key for webhooks.
    recipient: Mapped[str] = mapped_column(sa.Text)
    practitioner: Mapped[str] = mapped_column(sa.String(KEY), index=True)
    subject: Mapped[str] = mapped_column(sa.Text)
    body: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Makes enqueueing idempotent: one alert per invitation and channel, one digest a day.
    dedupe_key: Mapped[str] = mapped_column(sa.String(KEY), unique=True)
    invitation_id: Mapped[str | None] = mapped_column(sa.String(ID), index=True)
    created_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    delivered_at: Mapped[datetime | None]
    #: Set when the dispatcher gave up (max attempts, or a permanent error).
    failed_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)


class SignalSubscription(Base):
    """A regulator's subscription to device-signal notifications (delivered through the outbox):
    which signals (device class, outcome, level; ``None`` for any), which moves (``actions``;
    ``None`` for every one: detect, lapse and each regulator action), where (``channel`` e-mail
    or webhook, ``address`` an e-mail address or an https URL)."""

    __tablename__ = "signal_subscriptions"

    id: Mapped[str] = mapped_column(sa.String(ID), primary_key=True)
    subscriber: Mapped[str] = mapped_column(sa.String(KEY), index=True)
    org: Mapped[str] = mapped_column(sa.String(KEY))
    channel: Mapped[str] = mapped_column(sa.String(16))
    address: Mapped[str] = mapped_column(sa.Text)
    device_class: Mapped[str | None] = mapped_column(sa.String(KEY))
    outcome: Mapped[str | None] = mapped_column(sa.Text)
    level: Mapped[str | None] = mapped_column(sa.String(STATE))
    actions: Mapped[list[Any] | None]
    created_at: Mapped[datetime]
    active: Mapped[bool] = mapped_column(default=True)


# --------------------------------------------------------------------------- consumer bookkeeping


class ConsumerOffset(Base):
    """The next offset to read per partition, committed with the effects of what was read."""

    __tablename__ = "consumer_offsets"

    group_id: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    topic: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    kafka_partition: Mapped[int] = mapped_column(primary_key=True)
    next_offset: Mapped[int] = mapped_column(sa.BigInteger)
    updated_at: Mapped[datetime]


class SkippedMessage(Base):
    """A message that could not be read (malformed, unknown schema): kept visible, not lost."""

    __tablename__ = "skipped_messages"
    __table_args__ = (sa.UniqueConstraint("topic", "kafka_partition", "kafka_offset"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(sa.String(255))
    kafka_partition: Mapped[int]
    kafka_offset: Mapped[int] = mapped_column(sa.BigInteger)
    key: Mapped[str | None] = mapped_column(sa.Text)
    error: Mapped[str] = mapped_column(sa.Text)
    at: Mapped[datetime]


#: APScheduler's SQLAlchemyJobStore table, created here by the migrations (the job store only
#: creates it when missing, so it finds it and leaves it alone).
SCHEDULER_JOBS_TABLE = "recruitment_scheduler_jobs"
scheduler_jobs = sa.Table(
    SCHEDULER_JOBS_TABLE,
    Base.metadata,
    sa.Column("id", sa.Unicode(191), primary_key=True),
    sa.Column("next_run_time", sa.Float(25), index=True),
    sa.Column("job_state", sa.LargeBinary, nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(UTC)
