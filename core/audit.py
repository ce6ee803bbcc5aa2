"""The audit log: append-only and tamper-evident (a hash chain), with a verify command.

Every API request writes one record (who, role, organisation, method, path, status, and for reads
of identifiable data the pseudonyms read). Each record's hash covers its content and the previous
record's hash, so deleting, reordering or editing any record breaks the chain from that point on;
``concierge audit verify`` walks the chain.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from core.db import READ_ONLY, Schema, ensure_schema, make_engine

metadata = sa.MetaData()

audit_table = sa.Table(
    "audit_log",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

#: The table above is made only by the migrations in ``core/audit_migrations``.
SCHEMA = Schema(
    name="audit log",
    migrations=Path(__file__).parent / "audit_migrations",
    version_table="audit_alembic_version",
)

GENESIS = "0" * 64


def _digest(
    prev: str, seq: int, at: str, actor: str, role: str, org: str, action: str, detail: str
) -> str:
    body = json.dumps([prev, seq, at, actor, role, org, action, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    reason: str | None = None


class AuditLog:
    def __init__(self, url: str) -> None:
        ensure_schema(SCHEMA, url)
        # Several processes append (the API, the stream worker's state pages): on SQLite each
        # append takes the write lock at BEGIN, so reading the last record and writing the next
        # is one step; deferred, two processes read the same last record and one failed.
        self.engine = make_engine(url, immediate_writes=True)
        self._lock = threading.Lock()

    def append(
        self, actor: str, role: str, org: str, action: str, detail: dict[str, Any] | None = None
    ) -> int:
        text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
        at = datetime.now(UTC).isoformat()
        with self._lock, self.engine.begin() as conn:
            last = conn.execute(
                sa.select(audit_table.c.seq, audit_table.c.hash)
                .order_by(audit_table.c.seq.desc())
                .limit(1)
            ).first()
            seq = (last.seq + 1) if last else 1
            prev = last.hash if last else GENESIS
            conn.execute(
                audit_table.insert().values(
                    seq=seq,
                    at=at,
                    actor=actor,
                    role=role,
                    org=org,
                    action=action,
                    detail=text,
                    prev_hash=prev,
                    hash=_digest(prev, seq, at, actor, role, org, action, text),
                )
            )
        return seq

    def records(self) -> Iterator[dict[str, Any]]:
        with self.engine.execution_options(**{READ_ONLY: True}).connect() as conn:
            for row in conn.execute(sa.select(audit_table).order_by(audit_table.c.seq)):
                yield dict(row._mapping)

    def verify(self) -> Verification:
        prev = GENESIS
        count = 0
        for expected_seq, row in enumerate(self.records(), start=1):
            count += 1
            if row["seq"] != expected_seq:
                return Verification(False, count, row["seq"], f"record {expected_seq} missing")
            if row["prev_hash"] != prev:
                return Verification(False, count, row["seq"], "chain broken (prev_hash)")
            digest = _digest(
                prev,
                row["seq"],
                row["at"],
                row["actor"],
                row["role"],
                row["org"],
                row["action"],
                row["detail"],
            )
            if digest != row["hash"]:
                return Verification(False, count, row["seq"], "record altered (hash)")
            prev = row["hash"]
        return Verification(True, count)
