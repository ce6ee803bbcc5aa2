"""The sponsor workspace: the history of saved questions' cohort changes (the cohort topic is
compacted), each saved question's baseline, and every answer a sponsor got.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ws_cohort_changes",
        sa.Column("trial", sa.String(200), primary_key=True),
        sa.Column("patient", sa.String(128), primary_key=True),
        sa.Column("change", sa.Integer, primary_key=True),
        sa.Column("member", sa.Boolean, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "ws_cohort_baselines",
        sa.Column("trial", sa.String(200), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "ws_sponsor_answers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("trial", sa.String(200), nullable=True),
        sa.Column("title", sa.Text, nullable=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        if_not_exists=True,
    )
    op.create_index(
        "ix_ws_sponsor_answers_org_at", "ws_sponsor_answers", ["org", "at"], if_not_exists=True
    )


def downgrade() -> None:
    for table in ("ws_sponsor_answers", "ws_cohort_baselines", "ws_cohort_changes"):
        op.drop_table(table)
