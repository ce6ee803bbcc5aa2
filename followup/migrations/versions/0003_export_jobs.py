"""``$export`` jobs in the database (they survive an API restart).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "followup_exports",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("trial_id", sa.String(200), nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("started", TS, nullable=False),
        sa.Column("since", sa.BigInteger, nullable=False),
        sa.Column("upto", sa.BigInteger, nullable=False),
        sa.Column("written", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("files", sa.JSON, nullable=False),
        sa.Column("standing", sa.JSON, nullable=False),
        sa.Column("lease_until", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_followup_exports"),
    )
    op.create_index("ix_followup_exports_trial_id", "followup_exports", ["trial_id"])


def downgrade() -> None:
    op.drop_index("ix_followup_exports_trial_id", "followup_exports")
    op.drop_table("followup_exports")
