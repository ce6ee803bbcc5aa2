"""The follow-up consumer's progress: when each offset was committed, and heartbeats.

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

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("followup_offsets") as batch:
        batch.add_column(sa.Column("committed_at", TS, nullable=True))
    op.create_table(
        "followup_consumer_beats",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("beat_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_followup_consumer_beats"),
    )


def downgrade() -> None:
    op.drop_table("followup_consumer_beats")
    with op.batch_alter_table("followup_offsets") as batch:
        batch.drop_column("committed_at")
