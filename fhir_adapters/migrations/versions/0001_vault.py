"""The identity vault and resource index as they were before migrations (a table that exists
already is kept, with its rows): identity, patient identifiers, resource index, reference
summaries, subscription state, sequence floors.

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
        "identity",
        sa.Column("pseudonym", sa.String(64), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("resource_id", sa.Text, nullable=False),
        sa.Column("nhs_number", sa.String(16)),
        sa.Column("family", sa.Text),
        sa.Column("given", sa.Text),
        sa.Column("birth_date", sa.String(10)),
        sa.Column("gender", sa.String(16)),
        sa.Column("postcode", sa.String(16)),
        sa.Column("phone", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("address_json", sa.Text),
        sa.Column("identifiers_json", sa.Text),
        sa.Column("updated_at", sa.String(40), nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "patient_identifier",
        sa.Column("identifier_hash", sa.String(64), primary_key=True),
        sa.Column("pseudonym", sa.String(64), nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "resource_index",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("patient", sa.String(64)),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("last_updated", sa.String(40)),
        sa.Column("version_id", sa.String(64)),
        sa.Column("retracted", sa.Boolean, nullable=False),
        sa.Column("seen", sa.Text, nullable=False),
        if_not_exists=True,
    )
    op.create_index("ix_resource_index_patient", "resource_index", ["patient"], if_not_exists=True)
    op.create_table(
        "reference_summary",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "subscription_state",
        sa.Column("subscription", sa.Text, primary_key=True),
        sa.Column("last_event", sa.BigInteger, nullable=False),
        if_not_exists=True,
    )
    op.create_table(
        "seq_floor",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    for table in (
        "seq_floor",
        "subscription_state",
        "reference_summary",
        "resource_index",
        "patient_identifier",
        "identity",
    ):
        op.drop_table(table)
