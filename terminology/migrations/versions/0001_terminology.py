"""The terminology store: releases, SNOMED CT concepts, descriptions and hierarchy, the FTS5
search index, FHIR ValueSets and the load generation.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from terminology.tables import SEARCH_DDL, SEARCH_TABLE

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "terminology_releases",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("system", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("concepts", sa.Integer, nullable=False),
        sa.Column("active_concepts", sa.Integer, nullable=False),
        sa.Column("is_a", sa.Integer, nullable=False),
        sa.Column("descriptions", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("current", sa.Boolean, nullable=False),
    )
    op.create_table(
        "sct_concepts",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("module", sa.BigInteger, nullable=False),
        sa.Column("effective", sa.Text, nullable=False),
        sa.Column("fsn", sa.Text, nullable=True),
        sa.Column("term", sa.Text, nullable=True),
        sa.Column("semantic_tag", sa.Text, nullable=True),
        sa.Column("descendants", sa.Integer, nullable=False),
    )
    op.create_table(
        "sct_descriptions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("concept", sa.BigInteger, nullable=False),
        sa.Column("term", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("preferred", sa.Boolean, nullable=False),
    )
    op.create_index("ix_sct_descriptions_concept", "sct_descriptions", ["concept"])
    op.create_table(
        "sct_hierarchy",
        sa.Column("release", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("arrays", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "fhir_valuesets",
        sa.Column("url", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=True),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "terminology_state",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Integer, nullable=False),
    )
    op.execute(SEARCH_DDL)


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {SEARCH_TABLE}")
    for table in (
        "terminology_state",
        "fhir_valuesets",
        "sct_hierarchy",
        "sct_descriptions",
        "sct_concepts",
        "terminology_releases",
    ):
        op.drop_table(table)
