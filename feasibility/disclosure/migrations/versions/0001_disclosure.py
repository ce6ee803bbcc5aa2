"""The disclosure registry (publications, relations, overlap events, last answers) and the query
budget (questions, locks) as they were before migrations (a table that exists already is kept,
with its rows).

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dc_publications",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("cardinality", sa.Integer, nullable=False),
        sa.Column("bitmap", sa.LargeBinary, nullable=False),
        sa.Column("value", sa.Integer, nullable=True),
        sa.Column("display", sa.Text, nullable=False),
        sa.Column("hidden", sa.Boolean, nullable=False),
        sa.Column("copied_from", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        if_not_exists=True,
    )
    op.create_index(
        "ix_dc_publications_cardinality", "dc_publications", ["cardinality"], if_not_exists=True
    )
    op.create_table(
        "dc_relations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("parent", sa.Integer, nullable=False),
        sa.Column("children", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "dc_overlap_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("hits", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        if_not_exists=True,
    )
    op.create_index(
        "ix_dc_overlap_events_org_at", "dc_overlap_events", ["org", "at"], if_not_exists=True
    )
    op.create_table(
        "dc_answers",
        sa.Column("org", sa.Text, primary_key=True),
        sa.Column("fingerprint", sa.Text, primary_key=True),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "dc_budget_queries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("org", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        if_not_exists=True,
    )
    op.create_index(
        "ix_dc_budget_queries_org_at", "dc_budget_queries", ["org", "at"], if_not_exists=True
    )
    op.create_table(
        "dc_budget_locks",
        sa.Column("org", sa.Text, primary_key=True),
        sa.Column("locked", sa.Boolean, nullable=False),
        sa.Column("locked_at", sa.Float, nullable=True),
        sa.Column("unlocked_at", sa.Float, nullable=True),
        if_not_exists=True,
    )


def downgrade() -> None:
    for table in (
        "dc_budget_locks",
        "dc_budget_queries",
        "dc_answers",
        "dc_overlap_events",
        "dc_relations",
        "dc_publications",
    ):
        op.drop_table(table)
