"""The token revocation list: one row per revoked token id (``jti``).

Revision ID: 0001
Revises:
Create Date: 2026-12-14
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
        "revoked_token",
        sa.Column("jti", sa.String(200), primary_key=True),
        sa.Column("revoked_at", sa.String(40), nullable=False),
        sa.Column("expires_at", sa.BigInteger),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("revoked_by", sa.Text, nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("revoked_token")
