"""The audit log: append-only and tamper-evident, a keyed chain with anchors outside the database.

Every API request writes one record (who, role, organisation, method, path, status, and for reads
of identifiable data the pseudonyms read). Each record carries an HMAC-SHA256, under the audit
key (``CONCIERGE_AUDIT_KEY``, never stored in the audit database), of its content, its number and
the previous record's HMAC; the record names the key by id (:func:`key_id`), so the key can be
rotated (``CONCIERGE_AUDIT_RETIRED_KEYS`` keeps the old ones for verification). Whoever can write
the table but does not hold the key cannot alter, insert or remove a record without
:meth:`AuditLog.verify` finding the first record that no longer fits.

Two things the database alone cannot show: a chain rebuilt by somebody who does hold the key,
and the newest records cut off (with the head row moved back to match). For those the API
publishes the chain's head (its last record's seq, HMAC and time) to an append-only Kafka topic
(:mod:`infra.audit_anchors`); :meth:`AuditLog.check_anchors` compares the database with every
anchor: a record whose HMAC is not the one anchored for its seq was rewritten, an anchored seq
the database no longer holds was cut off.

Ordering across processes is the database's: one head row (``audit_head``) is locked for the
whole append (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every write transaction begins
``BEGIN IMMEDIATE``), so writers in any number of processes and threads take turns, and each
record's number and predecessor are read and written in the same transaction as the record.

Records written before the chain was keyed (revision 0002 of ``core/audit_migrations``) stay as
they were, a *legacy prefix* checked with the old unkeyed SHA-256; see that revision for why.
``concierge audit verify`` walks the chain; ``--against-anchors`` also checks the anchors. See
``docs/explanation/security.md`` (Audit trail and anchors).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from core.contracts.audit import AuditAnchor, signed_body
from core.db import READ_ONLY, Schema, ensure_schema, make_engine

if TYPE_CHECKING:
    from core.settings import Settings

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
    #: The record's HMAC-SHA256 under the key ``key_id`` names (a legacy record: its SHA-256).
    sa.Column("hash", sa.String(64), nullable=False),
    #: The audit key that chained this record (:func:`key_id`); NULL for a legacy record.
    sa.Column("key_id", sa.String(40), nullable=True),
)

#: The chain's head, one row (``id`` 1): the last record's seq and HMAC, locked by every append.
#: ``chain`` identifies this audit log on the anchors topic; ``legacy_records`` is how many
#: unkeyed records the migration to a keyed chain found (they may only be the first ones).
head_table = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("chain", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("legacy_records", sa.Integer, nullable=False),
)
HEAD_ID = 1

#: The tables above are made only by the migrations in ``core/audit_migrations``.
SCHEMA = Schema(
    name="audit log",
    migrations=Path(__file__).parent / "audit_migrations",
    version_table="audit_alembic_version",
)

GENESIS = "0" * 64
#: Versions what a record's HMAC covers (a later format gets a new tag, never a new meaning).
RECORD_TAG = "concierge.audit-record/2"
#: At most this many problems are listed one by one; the rest are counted.
MAX_LISTED_PROBLEMS = 20


class AuditError(RuntimeError):
    """The audit log cannot be written as it is (its head row is gone: the database was
    altered)."""


def key_id(key: bytes) -> str:
    """A key's public name: the first 16 hex digits of an HMAC of a fixed text under it (which
    tells nothing about the key, and names it the same on every machine that holds it)."""
    return "k-" + hmac.new(key, b"concierge audit key id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKeys:
    """The key new records are chained with and the retired ones still accepted when verifying."""

    current: bytes
    retired: tuple[bytes, ...] = ()
    _by_id: dict[str, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in (self.current, *self.retired):
            if len(key) < 32:
                raise ValueError("an audit key must be at least 32 bytes")
        by_id = {key_id(key): key for key in self.retired}
        by_id[key_id(self.current)] = self.current
        object.__setattr__(self, "_by_id", by_id)

    @property
    def current_id(self) -> str:
        return key_id(self.current)

    def get(self, identifier: str) -> bytes | None:
        return self._by_id.get(identifier)

    @property
    def development(self) -> bool:
        """Whether the current key is the built-in development key (never in production)."""
        from core.settings import DEVELOPMENT_AUDIT_KEY

        return self.current == DEVELOPMENT_AUDIT_KEY.encode()

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditKeys:
        current, retired = settings.audit_keys()
        return cls(current, retired)


def legacy_digest(
    prev: str, seq: int, at: str, actor: str, role: str, org: str, action: str, detail: str
) -> str:
    """The unkeyed SHA-256 of a record written before the chain was keyed (revision 0001)."""
    body = json.dumps([prev, seq, at, actor, role, org, action, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def record_mac(
    key: bytes,
    prev: str,
    seq: int,
    at: str,
    actor: str,
    role: str,
    org: str,
    action: str,
    detail: str,
    identifier: str,
) -> str:
    """A record's HMAC-SHA256: its content, number, predecessor's HMAC and key id, as one JSON
    array (so no field can bleed into the next)."""
    body = json.dumps(
        [RECORD_TAG, prev, seq, at, actor, role, org, action, detail, identifier],
        separators=(",", ":"),
    )
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _mac_of_row(key: bytes, row: dict[str, Any]) -> str:
    return record_mac(
        key,
        row["prev_hash"],
        row["seq"],
        row["at"],
        row["actor"],
        row["role"],
        row["org"],
        row["action"],
        row["detail"],
        row["key_id"],
    )


@dataclass(frozen=True)
class Head:
    """The head row: the chain's id, its last record's seq and HMAC (and that record's time)."""

    chain: str
    seq: int
    hash: str
    legacy_records: int
    at: str | None = None


@dataclass(frozen=True)
class Verification:
    """What walking the chain found: ``ok`` or the first record that does not fit and why."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    reason: str | None = None
    #: Unkeyed records at the start (written before the chain was keyed).
    legacy_records: int = 0
    chain: str | None = None
    head_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AnchorCheck:
    """What comparing the database with the published anchors found."""

    ok: bool
    chain: str
    #: Anchors of this chain whose signature holds, all compared with the database.
    anchors: int
    #: The newest anchored record (by seq): ``seq``, ``hmac``, ``at``, ``published_at``.
    latest: dict[str, Any] | None
    #: Records after the latest anchor: covered by their HMACs only, not by an anchor yet.
    unanchored_records: int
    #: The last record the database holds (0: none).
    database_seq: int
    #: Anchors of other chains on the topic (other deployments sharing it), not checked.
    other_chains: int = 0
    first_bad_seq: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Problems:
    """Problems listed one by one up to :data:`MAX_LISTED_PROBLEMS`, then counted."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, text: str) -> None:
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(text)
        else:
            self.more += 1

    def __bool__(self) -> bool:
        return bool(self.listed)

    def as_list(self) -> list[str]:
        tail = [f"... and {self.more} more"] if self.more else []
        return self.listed + tail


@dataclass(frozen=True)
class AuditEntry:
    """One record to append: who (actor, role, organisation), what (action) and the detail."""

    actor: str
    role: str
    org: str
    action: str
    detail: dict[str, Any]


class AuditLog:
    """The audit log at ``url`` (migrated when opened), chained under ``keys`` (by default the
    configured ``CONCIERGE_AUDIT_KEY`` and ``CONCIERGE_AUDIT_RETIRED_KEYS``)."""

    def __init__(self, url: str, keys: AuditKeys | None = None) -> None:
        if keys is None:
            from core.settings import get_settings

            keys = AuditKeys.from_settings(get_settings())
        self.keys = keys
        ensure_schema(SCHEMA, url)
        # SQLite: each write transaction takes the write lock at BEGIN (IMMEDIATE), so two
        # appends never read the same head; reads begin deferred and never wait for a writer.
        self.engine = make_engine(url, immediate_writes=True)
        self._reader = self.engine.execution_options(**{READ_ONLY: True})
        # Threads of one process queue here first: a cheap hand-over, where SQLite would make
        # them poll for its write lock. Across processes the database alone orders appends.
        self._lock = threading.Lock()

    def append(
        self, actor: str, role: str, org: str, action: str, detail: dict[str, Any] | None = None
    ) -> int:
        """Add one record after the head, in one transaction holding the head row; its seq."""
        return self.append_many([AuditEntry(actor, role, org, action, detail or {})])[0]

    def append_many(self, entries: Sequence[AuditEntry]) -> list[int]:
        """Add records after the head in order, all in one transaction holding the head row
        (a group commit: one lock, one commit for the lot); their seqs, in order. Each record
        is chained to the one before it exactly as :meth:`append` would chain it."""
        if not entries:
            return []
        identifier = self.keys.current_id
        texts = [json.dumps(e.detail, sort_keys=True, separators=(",", ":")) for e in entries]
        with self._lock, self.engine.begin() as conn:
            head = conn.execute(
                sa.select(head_table.c.seq, head_table.c.hash)
                .where(head_table.c.id == HEAD_ID)
                .with_for_update()  # PostgreSQL: writers queue here; SQLite: BEGIN IMMEDIATE
            ).first()
            if head is None:
                raise AuditError(
                    "the audit log's head row (audit_head) is missing: the audit database was "
                    "altered; run `concierge audit verify`"
                )
            seq, prev = head.seq, head.hash
            rows: list[dict[str, Any]] = []
            for entry, text in zip(entries, texts, strict=True):
                seq += 1
                at = datetime.now(UTC).isoformat()  # under the lock: times follow the seq order
                mac = record_mac(
                    self.keys.current,
                    prev,
                    seq,
                    at,
                    entry.actor,
                    entry.role,
                    entry.org,
                    entry.action,
                    text,
                    identifier,
                )
                rows.append(
                    {
                        "seq": seq,
                        "at": at,
                        "actor": entry.actor,
                        "role": entry.role,
                        "org": entry.org,
                        "action": entry.action,
                        "detail": text,
                        "prev_hash": prev,
                        "hash": mac,
                        "key_id": identifier,
                    }
                )
                prev = mac
            conn.execute(audit_table.insert(), rows)
            conn.execute(
                head_table.update().where(head_table.c.id == HEAD_ID).values(seq=seq, hash=prev)
            )
        return [row["seq"] for row in rows]

    def _read(self) -> sa.Connection:
        """A connection for a consistent read of several statements: one snapshot (SQLite's
        deferred transaction; PostgreSQL's REPEATABLE READ)."""
        conn = self._reader.connect()
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        return conn

    def head(self) -> Head:
        """The head row and its record's time; :class:`AuditError` when the row is gone."""
        with self._read() as conn:
            return self._head(conn)

    @staticmethod
    def _head(conn: sa.Connection) -> Head:
        row = conn.execute(
            sa.select(head_table, audit_table.c.at)
            .select_from(head_table.outerjoin(audit_table, audit_table.c.seq == head_table.c.seq))
            .where(head_table.c.id == HEAD_ID)
        ).first()
        if row is None:
            raise AuditError("the audit log's head row (audit_head) is missing")
        return Head(row.chain, row.seq, row.hash, row.legacy_records, row.at)

    def records(self) -> Iterator[dict[str, Any]]:
        with self._read() as conn:
            yield from self._records(conn)

    @staticmethod
    def _records(conn: sa.Connection) -> Iterator[dict[str, Any]]:
        rows = conn.execution_options(yield_per=1000).execute(
            sa.select(audit_table).order_by(audit_table.c.seq)
        )
        for row in rows:
            yield dict(row._mapping)

    def verify(self) -> Verification:
        """Walk the chain from the first record: every number present, each record linked to
        its predecessor and carrying its own HMAC under a known key (or, in the legacy prefix,
        its SHA-256), and the head row naming the last record."""
        with self._read() as conn:
            try:
                head: Head | None = self._head(conn)
            except AuditError:
                head = None
            return self._walk(self._records(conn), head)

    def _walk(self, rows: Iterable[dict[str, Any]], head: Head | None) -> Verification:
        prev = GENESIS
        count = legacy = 0
        legacy_allowed = head.legacy_records if head is not None else 0
        keyed_seen = False
        chain = head.chain if head is not None else None
        head_seq = head.seq if head is not None else None

        def bad(seq: int, reason: str) -> Verification:
            return Verification(False, count, seq, reason, legacy, chain, head_seq)

        for expected_seq, row in enumerate(rows, start=1):
            count += 1
            seq = row["seq"]
            if seq != expected_seq:
                return bad(seq, f"record {expected_seq} missing")
            if row["prev_hash"] != prev:
                return bad(seq, "chain broken (prev_hash)")
            if row["key_id"] is None:
                if keyed_seen:
                    return bad(seq, "unkeyed record after keyed ones (record altered)")
                if seq > legacy_allowed:
                    return bad(
                        seq,
                        f"unkeyed record beyond the {legacy_allowed} legacy records the "
                        "keyed chain adopted (record altered)",
                    )
                digest = legacy_digest(
                    prev,
                    seq,
                    row["at"],
                    row["actor"],
                    row["role"],
                    row["org"],
                    row["action"],
                    row["detail"],
                )
                if not hmac.compare_digest(digest, row["hash"]):
                    return bad(seq, "record altered (hash)")
                legacy += 1
            else:
                keyed_seen = True
                key = self.keys.get(row["key_id"])
                if key is None:
                    return bad(
                        seq,
                        f"record chained with an unknown key {row['key_id']} (give it in "
                        "CONCIERGE_AUDIT_RETIRED_KEYS if it is a retired key)",
                    )
                if not hmac.compare_digest(_mac_of_row(key, row), row["hash"]):
                    return bad(seq, "record altered (hmac)")
            prev = row["hash"]
        if head is None:
            return bad(count + 1, "the head row (audit_head) is missing")
        if head.seq != count or head.hash != prev:
            if head.seq > count:
                reason = f"the head names record {head.seq}, the records end at {count}: removed"
            else:
                reason = f"the head names record {head.seq}, the records go on to {count}"
            return bad(min(head.seq, count) + 1, reason)
        return Verification(True, count, None, None, legacy, chain, head_seq)

    # -------------------------------------------------------------------------- anchors

    def sign_anchor(self, head: Head, published_at: str, publisher: str) -> AuditAnchor:
        """An anchor of ``head``, signed with the current key."""
        if head.seq < 1:
            raise AuditError("nothing to anchor: the audit log has no records")
        if head.at is None:
            raise AuditError(f"the head names record {head.seq}, which is missing")
        identifier = self.keys.current_id
        body = signed_body(head.chain, head.seq, head.hash, head.at, published_at, publisher,
                           identifier)  # fmt: skip
        return AuditAnchor(
            chain=head.chain,
            seq=head.seq,
            hmac=head.hash,
            at=head.at,
            published_at=published_at,
            publisher=publisher,
            key_id=identifier,
            mac=hmac.new(self.keys.current, body, hashlib.sha256).hexdigest(),
        )

    def check_anchors(
        self, anchors: Iterable[AuditAnchor | str], batch_size: int = 1000
    ) -> AnchorCheck:
        """Compare the database with every anchor of this chain (an ``str`` item is a message
        of the topic that is not an anchor: a problem too). A record whose HMAC differs from the
        anchored one was rewritten (whatever the chain says about itself); an anchored seq the
        database does not hold was removed, and when it lies beyond the last record, the newest
        records were cut off. Anchors are read in batches, so memory stays bounded however long
        the topic is."""
        with self._read() as conn:
            head = self._head(conn)
            last = conn.execute(sa.select(sa.func.max(audit_table.c.seq))).scalar() or 0
        problems = _Problems()
        checked = other_chains = 0
        latest: AuditAnchor | None = None
        first_bad: list[int] = []
        pending: dict[int, list[AuditAnchor]] = {}
        for item in anchors:
            if isinstance(item, str):
                problems.add(f"not an anchor: {item}")
                continue
            if item.chain != head.chain:
                other_chains += 1
                continue
            key = self.keys.get(item.key_id)
            if key is None:
                problems.add(
                    f"anchor of record {item.seq} published at {item.published_at} is signed "
                    f"with an unknown key {item.key_id}"
                )
                continue
            expected = hmac.new(key, item.signed_body(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, item.mac):
                problems.add(
                    f"anchor of record {item.seq} published at {item.published_at} has a bad "
                    "signature: not published by a holder of the audit key"
                )
                continue
            checked += 1
            if latest is None or item.seq > latest.seq:
                latest = item
            pending.setdefault(item.seq, []).append(item)
            if len(pending) >= batch_size:
                self._compare(pending, last, problems, first_bad)
                pending = {}
        if pending:
            self._compare(pending, last, problems, first_bad)
        if checked == 0 and last > 0:
            problems.add(
                f"no anchor of chain {head.chain} was found: nothing to check the database "
                "against (is the API publishing anchors, CONCIERGE_AUDIT_ANCHOR_SECONDS > 0?)"
            )
        return AnchorCheck(
            ok=not problems,
            chain=head.chain,
            anchors=checked,
            latest=(
                None
                if latest is None
                else {
                    "seq": latest.seq,
                    "hmac": latest.hmac,
                    "at": latest.at,
                    "published_at": latest.published_at,
                }
            ),
            unanchored_records=max(0, last - (latest.seq if latest is not None else 0)),
            database_seq=last,
            other_chains=other_chains,
            first_bad_seq=min(first_bad) if first_bad else None,
            problems=problems.as_list(),
        )

    def _compare(
        self,
        pending: dict[int, list[AuditAnchor]],
        last: int,
        problems: _Problems,
        first_bad: list[int],
    ) -> None:
        with self._read() as conn:
            found = dict(
                conn.execute(
                    sa.select(audit_table.c.seq, audit_table.c.hash).where(
                        audit_table.c.seq.in_(sorted(pending))
                    )
                ).all()
            )
        for seq in sorted(pending):
            for anchor in pending[seq]:
                if seq not in found:
                    first_bad.append(min(seq, last + 1))
                    if seq > last:
                        problems.add(
                            f"record {seq} was anchored at {anchor.published_at} but the "
                            f"database ends at record {last}: the newest records were removed"
                        )
                    else:
                        problems.add(
                            f"record {seq} was anchored at {anchor.published_at} but is missing"
                        )
                elif not hmac.compare_digest(found[seq], anchor.hmac):
                    first_bad.append(seq)
                    problems.add(
                        f"record {seq} is not the record anchored at {anchor.published_at}: "
                        "the chain was rewritten from there or before"
                    )


class AuditWriter:
    """The audit log's writer thread: requests hand it their record and wait for it to be
    committed, and it writes whatever has queued meanwhile in one transaction
    (:meth:`AuditLog.append_many`, a group commit).

    Why: one transaction per request serialises every request on the audit head's lock and pays
    a commit (and on SQLite a WAL sync) each; under load that, not the reading, was the API's
    ceiling. With the writer a burst of N requests costs one commit. Nothing is weakened: a
    caller's :class:`~concurrent.futures.Future` resolves only once its record is committed (so
    a response that waits for it is never sent unaudited), or fails with the writer's error.
    The queue holds at most one record per request in flight, so it needs no bound of its own;
    a batch holds at most ``max_batch`` records.
    """

    def __init__(self, log: AuditLog, max_batch: int = 512) -> None:
        self.log = log
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[AuditEntry, Future[int]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        #: Records committed and transactions used (a batch per transaction), for /metrics
        #: and tests.
        self.records = 0
        self.batches = 0

    def submit(
        self, actor: str, role: str, org: str, action: str, detail: dict[str, Any] | None = None
    ) -> Future[int]:
        """Queue one record; the future gives its seq once it is committed."""
        future: Future[int] = Future()
        with self._start_lock:
            if self._closed:
                raise AuditError("the audit writer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
            self._queue.put((AuditEntry(actor, role, org, action, detail or {}), future))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                seqs = self.log.append_many([entry for entry, _ in batch])
            except BaseException as exc:  # every waiter learns its record was not written
                for _, future in batch:
                    future.set_exception(exc)
            else:
                self.records += len(batch)
                self.batches += 1
                for (_, future), seq in zip(batch, seqs, strict=True):
                    future.set_result(seq)
            if stop:
                return

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread (later submits raise :class:`AuditError`)."""
        with self._start_lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)


__all__ = [
    "GENESIS",
    "SCHEMA",
    "AnchorCheck",
    "AuditEntry",
    "AuditError",
    "AuditKeys",
    "AuditLog",
    "AuditWriter",
    "Head",
    "Verification",
    "audit_table",
    "head_table",
    "key_id",
    "legacy_digest",
    "metadata",
    "record_mac",
]
