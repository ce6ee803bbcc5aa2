"""What an attacker who can write the audit database does to it (for the audit tests)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from core.audit import GENESIS, AuditLog, audit_table, head_table, key_id, record_mac

#: The record fields a record's HMAC covers besides its number, predecessor and key id.
FIELDS = ("at", "actor", "role", "org", "action", "detail")


def rebuild(log: AuditLog, key: bytes, edit: dict[int, dict[str, Any]]) -> None:
    """Edit records (seq -> new values), re-chain every record from the first edited one on
    under ``key`` (the real key, or another), and move the head row to match."""
    rows = list(log.records())
    first = min(edit)
    prev = rows[first - 2]["hash"] if first > 1 else GENESIS
    with log.engine.begin() as conn:
        for row in rows[first - 1 :]:
            row.update(edit.get(row["seq"], {}))
            row["prev_hash"] = prev
            row["key_id"] = key_id(key)
            row["hash"] = record_mac(
                key, prev, row["seq"], *(row[f] for f in FIELDS), identifier=row["key_id"]
            )
            prev = row["hash"]
            conn.execute(
                sa.update(audit_table).where(audit_table.c.seq == row["seq"]).values(**row)
            )
        conn.execute(sa.update(head_table).values(hash=prev))


def truncate(log: AuditLog, keep: int) -> None:
    """Cut off every record after ``keep`` and move the head row back to match."""
    with log.engine.begin() as conn:
        conn.execute(sa.delete(audit_table).where(audit_table.c.seq > keep))
        last = conn.execute(sa.select(audit_table.c.hash).where(audit_table.c.seq == keep))
        conn.execute(sa.update(head_table).values(seq=keep, hash=last.scalar_one()))
