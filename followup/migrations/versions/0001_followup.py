"""The follow-up tables: plans, consents, participants, forwarded versions, the feed and its
cursors, safety events, offsets.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "followup_plans",
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("plan", sa.JSON, nullable=False),
        sa.Column("declared_by", sa.Text, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("trial_id", name="pk_followup_plans"),
    )
    op.create_table(
        "followup_consents",
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("patient", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("live", sa.Boolean, nullable=False),
        sa.Column("research_opt_out", sa.Boolean, nullable=False),
        sa.Column("trials", sa.JSON, nullable=False),
        sa.Column("period_start", TS, nullable=True),
        sa.Column("period_end", TS, nullable=True),
        sa.Column("ingested_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_followup_consents"),
    )
    op.create_index("ix_followup_consents_patient", "followup_consents", ["patient"])
    op.create_table(
        "followup_participants",
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(64), nullable=False),
        sa.Column("pseudonym", sa.String(64), nullable=False),
        sa.Column("invitation_id", sa.String(36), nullable=False),
        sa.Column("arm", sa.String(100), nullable=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("stopped_at", TS, nullable=True),
        sa.Column("stop_reason", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("trial_id", "patient", name="pk_followup_participants"),
    )
    op.create_index("ix_followup_participants_patient", "followup_participants", ["patient"])
    op.create_index("ix_followup_participants_pseudonym", "followup_participants", ["pseudonym"])
    op.create_table(
        "followup_forwarded",
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("patient", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("live", sa.Boolean, nullable=False),
        sa.Column("outcomes", sa.JSON, nullable=False),
        sa.Column("feed_seq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("trial_id", "key", name="pk_followup_forwarded"),
    )
    op.create_index("ix_followup_forwarded_patient", "followup_forwarded", ["patient"])
    op.create_table(
        "followup_feed",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("participant", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_followup_feed"),
        sa.UniqueConstraint("trial_id", "seq", name="uq_followup_feed_trial_id_seq"),
    )
    op.create_index("ix_followup_feed_trial_id", "followup_feed", ["trial_id"])
    op.create_table(
        "followup_trial_cursors",
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("written", sa.BigInteger, nullable=False),
        sa.Column("published", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("trial_id", name="pk_followup_trial_cursors"),
    )
    op.create_table(
        "followup_safety_events",
        sa.Column("id", sa.String(768), nullable=False),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("participant", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(100), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("outbox_id", sa.String(36), nullable=True),
        sa.Column("ingested_at", TS, nullable=False),
        sa.Column("detected_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_followup_safety_events"),
    )
    op.create_index("ix_followup_safety_events_trial_id", "followup_safety_events", ["trial_id"])
    op.create_table(
        "followup_offsets",
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("topic", "kafka_partition", name="pk_followup_offsets"),
    )


def downgrade() -> None:
    for name in (
        "followup_offsets",
        "followup_safety_events",
        "followup_trial_cursors",
        "followup_feed",
        "followup_forwarded",
        "followup_participants",
        "followup_consents",
        "followup_plans",
    ):
        op.drop_table(name)
