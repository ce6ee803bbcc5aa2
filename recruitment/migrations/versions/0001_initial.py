"""Initial recruitment schema: trials, profiles, reference data, cohorts, candidates, holds,
invitations and their history, the notification outbox, consumer bookkeeping, scheduler jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = 512
PSEUDONYM = 64
SITE = 128
STATE = 32
ID = 36


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _reference_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("key", sa.String(KEY), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("retracted", sa.Boolean, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "trials",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("title", sa.Text, nullable=True),
        sa.Column("sponsor", sa.Text, nullable=True),
        sa.Column("status", sa.String(STATE), nullable=False),
        sa.Column("target", sa.Integer, nullable=True),
        _ts("registered_at", nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_trials"),
    )
    op.create_table(
        "trial_sites",
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("site", sa.String(SITE), nullable=False),
        sa.Column("target", sa.Integer, nullable=True),
        sa.Column("recruiter", sa.String(KEY), nullable=True),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], name="fk_trial_sites_trial_id_trials"),
        sa.PrimaryKeyConstraint("trial_id", "site", name="pk_trial_sites"),
    )
    op.create_index("ix_trial_sites_recruiter", "trial_sites", ["recruiter"])

    op.create_table(
        "patient_profiles",
        sa.Column("pseudonym", sa.String(PSEUDONYM), nullable=False),
        sa.Column("known", sa.Boolean, nullable=False),
        sa.Column("site", sa.String(SITE), nullable=True),
        sa.Column("region", sa.String(64), nullable=True),
        sa.Column("gp_practice", sa.String(KEY), nullable=True),
        sa.Column("general_practitioners", sa.JSON, nullable=False),
        sa.Column("deceased", sa.Boolean, nullable=False),
        sa.Column("research_opt_out", sa.Boolean, nullable=False),
        _ts("opt_out_changed_at", nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("pseudonym", name="pk_patient_profiles"),
    )
    op.create_table(
        "patient_practitioners",
        sa.Column("patient", sa.String(PSEUDONYM), nullable=False),
        sa.Column("practitioner", sa.String(KEY), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("patient", "practitioner", name="pk_patient_practitioners"),
    )
    op.create_index(
        "ix_patient_practitioners_practitioner", "patient_practitioners", ["practitioner"]
    )
    op.create_table(
        "fact_versions",
        sa.Column("key", sa.String(KEY), nullable=False),
        sa.Column("patient", sa.String(PSEUDONYM), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("retracted", sa.Boolean, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        _ts("effective_at"),
        sa.PrimaryKeyConstraint("key", name="pk_fact_versions"),
    )
    op.create_index("ix_fact_versions_patient", "fact_versions", ["patient"])

    op.create_table(
        "practitioners",
        *_reference_columns(),
        sa.Column("name", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("key", name="pk_practitioners"),
    )
    op.create_table(
        "practitioner_roles",
        *_reference_columns(),
        sa.Column("practitioner", sa.String(KEY), nullable=True),
        sa.Column("organization", sa.String(KEY), nullable=True),
        sa.Column("codes", sa.JSON, nullable=False),
        sa.Column("texts", sa.JSON, nullable=False),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("trial_recruiter", sa.Boolean, nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("key", name="pk_practitioner_roles"),
    )
    op.create_index("ix_practitioner_roles_practitioner", "practitioner_roles", ["practitioner"])
    op.create_index("ix_practitioner_roles_organization", "practitioner_roles", ["organization"])
    op.create_index(
        "ix_practitioner_roles_trial_recruiter", "practitioner_roles", ["trial_recruiter"]
    )
    op.create_table(
        "organizations",
        *_reference_columns(),
        sa.Column("ods_code", sa.String(SITE), nullable=True),
        sa.Column("name", sa.Text, nullable=True),
        sa.Column("part_of", sa.String(KEY), nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("key", name="pk_organizations"),
    )
    op.create_index("ix_organizations_ods_code", "organizations", ["ods_code"])

    op.create_table(
        "cohort_memberships",
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(PSEUDONYM), nullable=False),
        sa.Column("change", sa.Integer, nullable=False),
        sa.Column("member", sa.Boolean, nullable=False),
        sa.Column("site", sa.String(SITE), nullable=True),
        sa.Column("trial_version", sa.Integer, nullable=True),
        sa.Column("steps", sa.String(200), nullable=True),
        _ts("at", nullable=True),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("trial_id", "patient", name="pk_cohort_memberships"),
    )
    op.create_index("ix_cohort_memberships_patient", "cohort_memberships", ["patient"])

    op.create_table(
        "candidates",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(PSEUDONYM), nullable=False),
        sa.Column("site", sa.String(SITE), nullable=False),
        sa.Column("status", sa.String(STATE), nullable=False),
        sa.Column("routed_to", sa.String(KEY), nullable=True),
        sa.Column("routing_via", sa.String(STATE), nullable=True),
        sa.Column("routing_reason", sa.Text, nullable=True),
        sa.Column("held_reasons", sa.JSON, nullable=False),
        sa.Column("arrival", sa.BigInteger, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], name="fk_candidates_trial_id_trials"),
        sa.PrimaryKeyConstraint("id", name="pk_candidates"),
        sa.UniqueConstraint("trial_id", "patient", name="uq_candidates_trial_id_patient"),
    )
    for column in ("trial_id", "patient", "site", "status", "routed_to", "arrival"):
        op.create_index(f"ix_candidates_{column}", "candidates", [column])

    op.create_table(
        "holds",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("candidate_id", sa.String(ID), nullable=False),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(PSEUDONYM), nullable=False),
        sa.Column("rule", sa.String(STATE), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        _ts("until", nullable=True),
        _ts("opened_at"),
        _ts("released_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["candidate_id"], ["candidates.id"], name="fk_holds_candidate_id_candidates"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_holds"),
    )
    op.create_index("ix_holds_candidate_id", "holds", ["candidate_id"])
    op.create_index("ix_holds_patient", "holds", ["patient"])

    op.create_table(
        "invitations",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("candidate_id", sa.String(ID), nullable=False),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("patient", sa.String(PSEUDONYM), nullable=False),
        sa.Column("site", sa.String(SITE), nullable=False),
        sa.Column("practitioner", sa.String(KEY), nullable=False),
        sa.Column("state", sa.String(STATE), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        _ts("created_at"),
        _ts("state_changed_at"),
        _ts("contacted_at", nullable=True),
        _ts("closed_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["candidate_id"], ["candidates.id"], name="fk_invitations_candidate_id_candidates"
        ),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], name="fk_invitations_trial_id_trials"),
        sa.PrimaryKeyConstraint("id", name="pk_invitations"),
    )
    for column in ("candidate_id", "trial_id", "patient", "practitioner", "state"):
        op.create_index(f"ix_invitations_{column}", "invitations", [column])
    # At most one open invitation per patient, across all trials, enforced by the database.
    op.create_index(
        "uq_invitations_active_patient",
        "invitations",
        ["patient"],
        unique=True,
        sqlite_where=sa.text("active = 1"),
        postgresql_where=sa.text("active"),
    )

    op.create_table(
        "invitation_events",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("invitation_id", sa.String(ID), nullable=False),
        _ts("at"),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("from_state", sa.String(STATE), nullable=True),
        sa.Column("to_state", sa.String(STATE), nullable=False),
        sa.Column("note", sa.Text, nullable=True),
        sa.ForeignKeyConstraint(
            ["invitation_id"],
            ["invitations.id"],
            name="fk_invitation_events_invitation_id_invitations",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_invitation_events"),
    )
    op.create_index("ix_invitation_events_invitation_id", "invitation_events", ["invitation_id"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("recipient", sa.Text, nullable=False),
        sa.Column("practitioner", sa.String(KEY), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("dedupe_key", sa.String(KEY), nullable=False),
        sa.Column("invitation_id", sa.String(ID), nullable=True),
        _ts("created_at"),
        sa.Column("attempts", sa.Integer, nullable=False),
        _ts("next_attempt_at", nullable=True),
        _ts("delivered_at", nullable=True),
        _ts("failed_at", nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("dedupe_key", name="uq_outbox_dedupe_key"),
    )
    for column in ("practitioner", "invitation_id", "next_attempt_at"):
        op.create_index(f"ix_outbox_{column}", "outbox", [column])

    op.create_table(
        "consumer_offsets",
        sa.Column("group_id", sa.String(200), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("group_id", "topic", "kafka_partition", name="pk_consumer_offsets"),
    )
    op.create_table(
        "skipped_messages",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=True),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer, nullable=False),
        sa.Column("kafka_offset", sa.BigInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=False),
        _ts("at"),
        sa.PrimaryKeyConstraint("id", name="pk_skipped_messages"),
        sa.UniqueConstraint(
            "topic",
            "kafka_partition",
            "kafka_offset",
            name="uq_skipped_messages_topic_kafka_partition_kafka_offset",
        ),
    )

    op.create_table(
        "recruitment_scheduler_jobs",
        sa.Column("id", sa.Unicode(191), nullable=False),
        sa.Column("next_run_time", sa.Float(25), nullable=True),
        sa.Column("job_state", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_recruitment_scheduler_jobs"),
    )
    op.create_index(
        "ix_recruitment_scheduler_jobs_next_run_time",
        "recruitment_scheduler_jobs",
        ["next_run_time"],
    )


def downgrade() -> None:
    for table in (
        "recruitment_scheduler_jobs",
        "skipped_messages",
        "consumer_offsets",
        "outbox",
        "invitation_events",
        "invitations",
        "holds",
        "candidates",
        "cohort_memberships",
        "organizations",
        "practitioner_roles",
        "practitioners",
        "fact_versions",
        "patient_practitioners",
        "patient_profiles",
        "trial_sites",
        "trials",
    ):
        op.drop_table(table)
