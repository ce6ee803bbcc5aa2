"""Ingest epochs: one row per ingestor started on this vault, so an ingestor knows whether one
ran before it (whose last batch may be on the broker but not in the index).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
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
        "ingest_epoch",
        sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("started_at", sa.String(40), nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("ingest_epoch")
