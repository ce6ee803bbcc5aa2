"""Patient numbers shared by every API process on the database: the publication registry's
bitmaps hold these, not a process's own snapshot ids (which differ between processes and after
a restart), so a set published through one process is recognised by another.

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


def upgrade() -> None:
    op.create_table(
        "dc_patient_numbers",
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("patient", sa.String(128), nullable=False, unique=True),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("dc_patient_numbers")
