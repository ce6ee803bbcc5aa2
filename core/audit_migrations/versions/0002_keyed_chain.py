"""The keyed chain: a key id per record and a head row that every append locks.

Adoption of an existing audit log. Its records keep their content, numbers and SHA-256 hashes
and their ``key_id`` stays NULL: they are the *legacy prefix*, verified as before (unkeyed), and
the head row records how many there are (``legacy_records``) so that no unkeyed record may
appear after them. The first keyed record chains onto the last legacy hash, so its HMAC commits
to the whole prefix: from then on a legacy record cannot be changed (and the prefix rebuilt)
without breaking that HMAC, which needs the key.

Why not re-anchor (re-chain the old records under the key here)? The migration would need the
audit key, which must stay out of the database and its tooling (``alembic upgrade`` run by an
operator would chain the history under whatever key that shell has, possibly the development
one); and re-chaining would launder a prefix that had already been altered, where leaving it
as it was keeps the old check meaningful: ``concierge audit verify`` still reports the first
legacy record that does not fit. What the prefix does not get is protection from before this
migration: it is as trustworthy as the unkeyed chain was on the day it was adopted, and the
first anchor published after the adoption fixes it from then on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    # A database made before the store had migrations may hold these already (made from the
    # store's metadata): add only what is missing, as revision 0001 does.
    if "key_id" not in {c["name"] for c in inspector.get_columns("audit_log")}:
        op.add_column("audit_log", sa.Column("key_id", sa.String(40), nullable=True))
    head = sa.table(
        "audit_head",
        sa.column("id", sa.Integer),
        sa.column("chain", sa.String),
        sa.column("seq", sa.Integer),
        sa.column("hash", sa.String),
        sa.column("legacy_records", sa.Integer),
    )
    if not inspector.has_table("audit_head"):
        op.create_table(
            "audit_head",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("chain", sa.String(64), nullable=False),
            sa.Column("seq", sa.Integer, nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Column("legacy_records", sa.Integer, nullable=False),
        )
    if bind.execute(sa.select(head.c.id).where(head.c.id == 1)).first() is not None:
        return
    log = sa.table(
        "audit_log",
        sa.column("seq", sa.Integer),
        sa.column("hash", sa.String),
        sa.column("key_id", sa.String),
    )
    last = bind.execute(sa.select(log.c.seq, log.c.hash).order_by(log.c.seq.desc()).limit(1))
    row = last.first()
    legacy = bind.execute(
        sa.select(sa.func.coalesce(sa.func.max(log.c.seq), 0)).where(log.c.key_id.is_(None))
    ).scalar_one()
    bind.execute(
        head.insert().values(
            id=1,
            # The chain's name on the anchors topic: random, so two deployments never share one.
            chain=uuid.uuid4().hex,
            seq=row.seq if row is not None else 0,
            hash=row.hash if row is not None else GENESIS,
            legacy_records=legacy,
        )
    )


def downgrade() -> None:
    # Keyed records stay, but revision 0001's code cannot verify them (their hash is an HMAC).
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("key_id")
