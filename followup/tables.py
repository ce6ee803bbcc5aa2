"""The follow-up tables (SQLAlchemy 2 ORM), made only by the Alembic migrations in
``followup/migrations`` (their own version table, so they share the recruitment database).

Nothing identifying is stored: patients are site pseudonyms, participants are trial pseudonyms.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from recruitment.models import NAMING, UtcDateTime

KEY = 512
PSEUDONYM = 64
TRIAL = 200


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class FollowupPlan(Base):
    """A trial's follow-up plan (:class:`followup.plans.Plan` as JSON) and who declared it."""

    __tablename__ = "followup_plans"

    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), primary_key=True)
    version: Mapped[int]
    plan: Mapped[dict[str, Any]]
    declared_by: Mapped[str] = mapped_column(sa.Text)
    updated_at: Mapped[datetime]


class FollowupConsent(Base):
    """The latest version of each Consent resource, as far as follow-up reads it."""

    __tablename__ = "followup_consents"

    key: Mapped[str] = mapped_column(sa.String(KEY), primary_key=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    seq: Mapped[int]
    live: Mapped[bool]
    research_opt_out: Mapped[bool]
    trials: Mapped[list[Any]]
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]
    ingested_at: Mapped[datetime]


class Participant(Base):
    """A patient followed up for a trial: their trial pseudonym, arm, and whether it runs."""

    __tablename__ = "followup_participants"

    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), primary_key=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), primary_key=True, index=True)
    pseudonym: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    invitation_id: Mapped[str] = mapped_column(sa.String(36))
    arm: Mapped[str | None] = mapped_column(sa.String(100))
    active: Mapped[bool]
    #: Facts ingested from this instant on are forwarded (enrolment and consent both in force).
    started_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]
    stop_reason: Mapped[str | None] = mapped_column(sa.Text)


class Forwarded(Base):
    """The version of each resource a trial last received (so a correction retracts it)."""

    __tablename__ = "followup_forwarded"

    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(KEY), primary_key=True)
    patient: Mapped[str] = mapped_column(sa.String(PSEUDONYM), index=True)
    seq: Mapped[int]
    #: The trial holds this version (False: retracted, or out of scope).
    live: Mapped[bool]
    #: Names of the plan's outcomes this version matches (endpoint counts read these).
    outcomes: Mapped[list[Any]]
    feed_seq: Mapped[int] = mapped_column(sa.BigInteger)


class FeedEntry(Base):
    """The trial's feed, in order: ``seq`` is the cursor of the API and of the trial's topic."""

    __tablename__ = "followup_feed"
    __table_args__ = (sa.UniqueConstraint("trial_id", "seq"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)  # fmt: skip
    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), index=True)
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    participant: Mapped[str] = mapped_column(sa.String(PSEUDONYM))
    type: Mapped[str] = mapped_column(sa.String(16))
    body: Mapped[dict[str, Any]]
    at: Mapped[datetime]


class TrialCursor(Base):
    """Per trial: the last feed seq written, and the last one the relay published."""

    __tablename__ = "followup_trial_cursors"

    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), primary_key=True)
    written: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    published: Mapped[int] = mapped_column(sa.BigInteger, default=0)


class SafetyEvent(Base):
    """A safety event: the audit record of one match of an outcome, and the notification queued
    for it (one per trial, outcome and resource: a correction that still matches is no new
    event)."""

    __tablename__ = "followup_safety_events"

    id: Mapped[str] = mapped_column(sa.String(KEY + 256), primary_key=True)
    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), index=True)
    participant: Mapped[str] = mapped_column(sa.String(PSEUDONYM))
    outcome: Mapped[str] = mapped_column(sa.String(100))
    key: Mapped[str] = mapped_column(sa.String(KEY))
    seq: Mapped[int]
    version: Mapped[str] = mapped_column(sa.String(64))
    #: ``notified`` (queued in the outbox), ``no-contact``, or ``uninterpretable`` (a result
    #: that could not be compared: told to the contact all the same).
    status: Mapped[str] = mapped_column(sa.String(32))
    detail: Mapped[str | None] = mapped_column(sa.Text)
    outbox_id: Mapped[str | None] = mapped_column(sa.String(36))
    ingested_at: Mapped[datetime]
    detected_at: Mapped[datetime]


class FollowupOffset(Base):
    """The next facts offset per partition, committed with the effects of what was read."""

    __tablename__ = "followup_offsets"

    topic: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    kafka_partition: Mapped[int] = mapped_column(primary_key=True)
    next_offset: Mapped[int] = mapped_column(sa.BigInteger)
    #: When the consumer last committed this partition's offset (None: before migration 0002).
    committed_at: Mapped[datetime | None]


class ConsumerBeat(Base):
    """A follow-up consumer's heartbeat: written every second or so while its loop runs, idle
    or not, so a reader of the feed can tell a consumer that is down (or never ran) from one
    with nothing to do (:mod:`followup.progress`)."""

    __tablename__ = "followup_consumer_beats"

    name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    started_at: Mapped[datetime]
    beat_at: Mapped[datetime]


class ExportJob(Base):
    """A ``$export`` job (:mod:`followup.export`): kept here, not in an API process's memory, so
    its status URL answers after a restart and from any API process of the site."""

    __tablename__ = "followup_exports"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    trial_id: Mapped[str] = mapped_column(sa.String(TRIAL), index=True)
    #: the requester's token subject: the job is theirs alone
    owner: Mapped[str] = mapped_column(sa.Text)
    request: Mapped[str] = mapped_column(sa.Text)
    started: Mapped[datetime]
    since: Mapped[int] = mapped_column(sa.BigInteger)
    #: the feed seq the export ends at (the feed as written at kick-off)
    upto: Mapped[int] = mapped_column(sa.BigInteger)
    written: Mapped[int] = mapped_column(sa.BigInteger)
    #: ``running``, ``done`` or ``failed``
    state: Mapped[str] = mapped_column(sa.String(16))
    error: Mapped[str | None] = mapped_column(sa.Text)
    files: Mapped[list[Any]]
    #: how current the follow-up tables were at kick-off (``followup.progress.Standing.body``)
    standing: Mapped[dict[str, Any]]
    #: a running job is its runner's until then; after it, any API process may run it again
    lease_until: Mapped[datetime]
