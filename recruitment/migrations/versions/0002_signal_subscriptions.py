"""Regulators' subscriptions to device-signal notifications (delivered through the outbox).

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

KEY = 512
STATE = 32
ID = 36


def upgrade() -> None:
    op.create_table(
        "signal_subscriptions",
        sa.Column("id", sa.String(ID), nullable=False),
        sa.Column("subscriber", sa.String(KEY), nullable=False),
        sa.Column("org", sa.String(KEY), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("device_class", sa.String(KEY), nullable=True),
        sa.Column("outcome", sa.Text, nullable=True),
        sa.Column("level", sa.String(STATE), nullable=True),
        sa.Column("actions", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_signal_subscriptions"),
    )
    op.create_index("ix_signal_subscriptions_subscriber", "signal_subscriptions", ["subscriber"])


def downgrade() -> None:
    op.drop_index("ix_signal_subscriptions_subscriber", table_name="signal_subscriptions")
    op.drop_table("signal_subscriptions")
