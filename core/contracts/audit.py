"""The audit anchor (``concierge.audit-anchor/1``): the head of an audit chain (its last record's
seq, HMAC and time) as published to the anchors topic, keyed by chain id and kept forever. The
API publishes one whenever the head has moved (:mod:`infra.audit_anchors`); ``concierge audit
verify --against-anchors`` reads them all back and checks the database against each. See
``docs/explanation/security.md`` (Audit trail and anchors) and
``docs/reference/topics-and-facts.md``.

The anchor is itself signed (``mac``, HMAC-SHA256 under the audit key named by ``key_id``), so
a message somebody without the key appends to the topic is told apart from a real anchor.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AUDIT_ANCHOR_SCHEMA = "concierge.audit-anchor/1"

#: Hex digits of an HMAC-SHA256 (or, for legacy records, SHA-256).
DIGEST_PATTERN = r"^[0-9a-f]{64}$"


class AuditAnchor(BaseModel):
    """One published head of one audit chain."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    schema_: Literal["concierge.audit-anchor/1"] = Field(
        default="concierge.audit-anchor/1", alias="schema"
    )
    #: The chain's id (``audit_head.chain`` in the audit database); also the message key.
    chain: str = Field(min_length=1, max_length=64)
    #: The head record's number.
    seq: int = Field(ge=1)
    #: The head record's ``hash`` column: its HMAC (SHA-256 for a legacy record).
    hmac: str = Field(pattern=DIGEST_PATTERN)
    #: The head record's time (its ``at`` column).
    at: str = Field(min_length=1, max_length=40)
    #: When the anchor was published (ISO 8601, UTC) and by which process (``host:pid``).
    published_at: str = Field(min_length=1, max_length=40)
    publisher: str = Field(max_length=300)
    #: The audit key that signed this anchor (by id; see ``core.audit.key_id``).
    key_id: str = Field(min_length=1, max_length=40)
    #: HMAC-SHA256 of :meth:`signed_body` under that key.
    mac: str = Field(pattern=DIGEST_PATTERN)

    def signed_body(self) -> bytes:
        """What ``mac`` covers: every other field, in a fixed order."""
        return signed_body(
            self.chain, self.seq, self.hmac, self.at, self.published_at, self.publisher, self.key_id
        )

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def signed_body(
    chain: str, seq: int, hmac: str, at: str, published_at: str, publisher: str, key_id: str
) -> bytes:
    fields = [AUDIT_ANCHOR_SCHEMA, chain, seq, hmac, at, published_at, publisher, key_id]
    return json.dumps(fields, separators=(",", ":")).encode()


__all__ = ["AUDIT_ANCHOR_SCHEMA", "DIGEST_PATTERN", "AuditAnchor", "signed_body"]
