"""The token revocation list: token ids (``jti``) the API refuses from the next request on.

One SQL table (``revoked_token``, its own Alembic migrations in ``core/token_migrations`` and its
own version table, so it can share a database; by default the audit log's), written by
``concierge token revoke`` and read by every API process at every request: a revocation takes
effect at once in every running process, without a restart. A row keeps the token's expiry
when it is known, so rows of tokens that have expired anyway can be pruned.

If the list cannot be read the API does not guess: the request answers 503 with Retry-After
(:class:`RevocationUnavailable`), never "not revoked".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from core.db import Schema, ensure_schema, make_engine

metadata = sa.MetaData()

revoked_token_table = sa.Table(
    "revoked_token",
    metadata,
    sa.Column("jti", sa.String(200), primary_key=True),
    sa.Column("revoked_at", sa.String(40), nullable=False),
    #: The token's ``exp`` (seconds since the epoch), when known: after it the row may go.
    sa.Column("expires_at", sa.BigInteger),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("revoked_by", sa.Text, nullable=False),
)

#: The table above is made only by the migrations in ``core/token_migrations``.
SCHEMA = Schema(
    name="token revocation list",
    migrations=Path(__file__).parent / "token_migrations",
    version_table="token_alembic_version",
)

#: The longest ``jti`` kept (a longer one cannot have been issued here, and is refused).
MAX_JTI = 200


class RevocationUnavailable(RuntimeError):
    """The revocation list could not be read: whether a token is revoked is unknown."""


@dataclass(frozen=True)
class Revocation:
    jti: str
    revoked_at: str
    expires_at: int | None
    reason: str
    revoked_by: str


class RevocationList:
    """Revoked token ids in SQL (SQLite by default, PostgreSQL in production)."""

    def __init__(self, url: str) -> None:
        ensure_schema(SCHEMA, url)
        self.engine = make_engine(url)

    def revoke(
        self, jti: str, reason: str = "", revoked_by: str = "", expires_at: int | None = None
    ) -> Revocation:
        """Revoke ``jti`` (again: the first revocation stands, and is returned)."""
        if not jti or len(jti) > MAX_JTI:
            raise ValueError(f"a token id is 1 to {MAX_JTI} characters")
        row = Revocation(jti, datetime.now(UTC).isoformat(), expires_at, reason, revoked_by)
        with self.engine.begin() as conn:
            existing = self._get(conn, jti)
            if existing is not None:
                return existing
            conn.execute(revoked_token_table.insert().values(**row.__dict__))
        return row

    def is_revoked(self, jti: str) -> bool:
        """Whether ``jti`` is revoked; :class:`RevocationUnavailable` if that cannot be read."""
        try:
            with self.engine.connect() as conn:
                return (
                    conn.execute(
                        sa.select(revoked_token_table.c.jti).where(revoked_token_table.c.jti == jti)
                    ).first()
                    is not None
                )
        except sa.exc.SQLAlchemyError as exc:
            raise RevocationUnavailable(f"the token revocation list cannot be read: {exc}") from exc

    def entries(self) -> list[Revocation]:
        """Every revocation, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(revoked_token_table).order_by(
                    revoked_token_table.c.revoked_at, revoked_token_table.c.jti
                )
            ).all()
        return [Revocation(**row._mapping) for row in rows]

    def prune(self, now: int) -> int:
        """Forget revocations of tokens that expired before ``now`` (they are refused as
        expired anyway); the number forgotten."""
        with self.engine.begin() as conn:
            result = conn.execute(
                revoked_token_table.delete().where(revoked_token_table.c.expires_at < now)
            )
        return int(result.rowcount or 0)

    def close(self) -> None:
        self.engine.dispose()

    @staticmethod
    def _get(conn: sa.Connection, jti: str) -> Revocation | None:
        row = conn.execute(
            sa.select(revoked_token_table).where(revoked_token_table.c.jti == jti)
        ).first()
        return None if row is None else Revocation(**row._mapping)


__all__ = [
    "SCHEMA",
    "Revocation",
    "RevocationList",
    "RevocationUnavailable",
    "metadata",
    "revoked_token_table",
]
