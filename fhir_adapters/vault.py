"""The site's local store: identity vault and resource index. Never published to Kafka.

This is one of the few modules that touch identifiable data (names, addresses, telecom, NHS
numbers); nothing here is logged. It keeps:

* ``identity``: the identifiable part of each Patient, by pseudonym, for clinicians later;
* ``patient_identifier``: HMACs of every identifier a patient has, for conditional references;
* ``resource_index``: per resource key its patient, version sequence and content hash, so the
  adapter can drop re-sent versions, order updates, and retract on DELETE;
* ``reference_summary``: organisations and devices, to resolve sites, regions and device models;
* ``subscription_state``: the last event number seen per FHIR Subscription, to detect gaps;
* ``seq_floor``: per resource key, the highest ``seq`` published in a batch whose publication
  failed. Such a message may still have reached the broker, so that ``seq`` is never used again
  for other content (the resource index itself is left as it was before the failure).

Two implementations behind one small interface: SQLAlchemy (SQLite by default, PostgreSQL in
production) and an in-memory one for unit tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from core.contracts.facts import DeviceDescription, OrganizationRecord
from core.db import Schema, ensure_schema, make_engine

from .extract import IdentityRecord


@dataclass(frozen=True)
class IndexEntry:
    key: str
    patient: str | None
    seq: int
    content_hash: str
    last_updated: str | None
    version_id: str | None
    retracted: bool
    #: Short hashes of earlier contents of this resource (most recent last, at most 8), so a
    #: re-sent earlier version without version metadata is recognised and ignored.
    seen: str = ""

    def has_seen(self, digest: str) -> bool:
        return digest[:16] in self.seen.split()

    def seen_with(self, digest: str) -> str:
        hashes = [h for h in self.seen.split() if h != digest[:16]]
        hashes.append(digest[:16])
        return " ".join(hashes[-8:])


class Vault(Protocol):
    def get_index(self, keys: Iterable[str]) -> dict[str, IndexEntry]: ...
    def put_index(self, entries: Iterable[IndexEntry]) -> None: ...
    def put_identity(
        self, pseudonym: str, source: str, identity: IdentityRecord, identifier_hashes: list[str]
    ) -> None: ...
    def patient_by_identifier(self, identifier_hash: str) -> str | None: ...
    def get_identity(self, pseudonym: str) -> dict[str, Any] | None: ...
    def put_organization(self, key: str, record: OrganizationRecord) -> None: ...
    def get_organization(self, key: str) -> OrganizationRecord | None: ...
    def put_device(self, key: str, description: DeviceDescription) -> None: ...
    def get_device(self, key: str) -> DeviceDescription | None: ...
    def subscription_event(self, subscription: str) -> int | None: ...
    def set_subscription_event(self, subscription: str, event: int) -> None: ...
    def get_seq_floors(self, keys: Iterable[str]) -> dict[str, int]: ...
    def put_seq_floors(self, floors: dict[str, int]) -> None: ...
    def start_epoch(self) -> int: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


metadata = sa.MetaData()

identity_table = sa.Table(
    "identity",
    metadata,
    sa.Column("pseudonym", sa.String(64), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("resource_id", sa.Text, nullable=False),
    sa.Column("nhs_number", sa.String(16)),
    sa.Column("family", sa.Text),
    sa.Column("given", sa.Text),
    sa.Column("birth_date", sa.String(10)),
    sa.Column("gender", sa.String(16)),
    sa.Column("postcode", sa.String(16)),
    sa.Column("phone", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("address_json", sa.Text),
    sa.Column("identifiers_json", sa.Text),
    sa.Column("updated_at", sa.String(40), nullable=False),
)

patient_identifier_table = sa.Table(
    "patient_identifier",
    metadata,
    sa.Column("identifier_hash", sa.String(64), primary_key=True),
    sa.Column("pseudonym", sa.String(64), nullable=False),
)

resource_index_table = sa.Table(
    "resource_index",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("patient", sa.String(64), index=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("last_updated", sa.String(40)),
    sa.Column("version_id", sa.String(64)),
    sa.Column("retracted", sa.Boolean, nullable=False),
    sa.Column("seen", sa.Text, nullable=False, default=""),
)

reference_summary_table = sa.Table(
    "reference_summary",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)

subscription_state_table = sa.Table(
    "subscription_state",
    metadata,
    sa.Column("subscription", sa.Text, primary_key=True),
    sa.Column("last_event", sa.BigInteger, nullable=False),
)

seq_floor_table = sa.Table(
    "seq_floor",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
)

#: One row per ingestor started on the vault (:meth:`SqlVault.start_epoch`).
ingest_epoch_table = sa.Table(
    "ingest_epoch",
    metadata,
    sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("started_at", sa.String(40), nullable=False),
)

#: The tables above are made only by the migrations in ``fhir_adapters/migrations``.
SCHEMA = Schema(
    name="identity vault",
    migrations=Path(__file__).parent / "migrations",
    version_table="vault_alembic_version",
)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SqlVault:
    """The vault on a relational database through SQLAlchemy Core, committed per batch."""

    _CHUNK = 400

    def __init__(self, url: str) -> None:
        ensure_schema(SCHEMA, url)
        self.engine = make_engine(url)
        self._conn = self.engine.connect()
        self._tx = self._conn.begin()
        self._orgs: dict[str, OrganizationRecord | None] = {}
        self._statements: dict[str, Any] = {}
        self._identity_buffer: dict[str, dict[str, Any]] = {}
        self._identifier_buffer: dict[str, str] = {}
        self._devices: dict[str, DeviceDescription | None] = {}

    # -- index --
    def get_index(self, keys: Iterable[str]) -> dict[str, IndexEntry]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, IndexEntry] = {}
        t = resource_index_table
        for start in range(0, len(wanted), self._CHUNK):
            chunk = wanted[start : start + self._CHUNK]
            rows = self._conn.execute(sa.select(t).where(t.c.key.in_(chunk)))
            for row in rows:
                found[row.key] = IndexEntry(
                    row.key,
                    row.patient,
                    row.seq,
                    row.content_hash,
                    row.last_updated,
                    row.version_id,
                    bool(row.retracted),
                    row.seen or "",
                )
        return found

    def put_index(self, entries: Iterable[IndexEntry]) -> None:
        rows = [e.__dict__ for e in entries]
        if not rows:
            return
        self._upsert(resource_index_table, rows, "key")

    def _upsert(self, table: sa.Table, rows: list[dict[str, Any]], pk: str) -> None:
        stmt = self._statements.get(table.name)
        if stmt is None:
            stmt = self._statements[table.name] = self._upsert_statement(table, pk)
        self._conn.execute(stmt, rows)

    def _upsert_statement(self, table: sa.Table, pk: str) -> Any:
        """INSERT .. ON CONFLICT DO UPDATE, built once per table (building it is costly)."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table)
            stmt = stmt.on_conflict_do_update(
                index_elements=[pk],
                set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name != pk},
            )
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            pstmt = pg_insert(table)
            stmt = pstmt.on_conflict_do_update(  # type: ignore[assignment]
                index_elements=[pk],
                set_={c.name: pstmt.excluded[c.name] for c in table.columns if c.name != pk},
            )
        else:  # pragma: no cover - other databases are not supported targets
            raise RuntimeError(f"unsupported database {dialect}")
        return stmt

    # -- identity --
    def put_identity(
        self, pseudonym: str, source: str, identity: IdentityRecord, identifier_hashes: list[str]
    ) -> None:
        row = {
            "pseudonym": pseudonym,
            "source": source,
            "resource_id": identity.resource_id,
            "nhs_number": identity.nhs_number,
            "family": identity.family,
            "given": identity.given,
            "birth_date": identity.birth_date.isoformat() if identity.birth_date else None,
            "gender": identity.gender,
            "postcode": identity.postcode,
            "phone": identity.phone,
            "email": identity.email,
            "address_json": json.dumps(identity.address),
            "identifiers_json": json.dumps(identity.identifiers),
            "updated_at": _now(),
        }
        # Buffered and written in one statement per batch at commit(); reads see the buffer.
        self._identity_buffer[pseudonym] = row
        for h in identifier_hashes:
            self._identifier_buffer[h] = pseudonym

    def patient_by_identifier(self, identifier_hash: str) -> str | None:
        if identifier_hash in self._identifier_buffer:
            return self._identifier_buffer[identifier_hash]
        t = patient_identifier_table
        row = self._conn.execute(
            sa.select(t.c.pseudonym).where(t.c.identifier_hash == identifier_hash)
        ).first()
        return row.pseudonym if row else None

    def get_identity(self, pseudonym: str) -> dict[str, Any] | None:
        if pseudonym in self._identity_buffer:
            return dict(self._identity_buffer[pseudonym])
        t = identity_table
        row = self._conn.execute(sa.select(t).where(t.c.pseudonym == pseudonym)).first()
        return dict(row._mapping) if row else None

    def get_identities(self, pseudonyms: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Several identities in a few queries (absent pseudonyms are left out)."""
        wanted = list(dict.fromkeys(pseudonyms))
        found = {p: dict(self._identity_buffer[p]) for p in wanted if p in self._identity_buffer}
        rest = [p for p in wanted if p not in found]
        t = identity_table
        for start in range(0, len(rest), 500):
            chunk = rest[start : start + 500]
            for row in self._conn.execute(sa.select(t).where(t.c.pseudonym.in_(chunk))):
                found[row.pseudonym] = dict(row._mapping)
        return found

    # -- reference summaries --
    def put_organization(self, key: str, record: OrganizationRecord) -> None:
        self._orgs[key] = record
        self._upsert(
            reference_summary_table,
            [{"key": key, "kind": "organization", "body": record.model_dump_json()}],
            "key",
        )

    def get_organization(self, key: str) -> OrganizationRecord | None:
        if key not in self._orgs:
            body = self._summary(key)
            self._orgs[key] = OrganizationRecord.model_validate_json(body) if body else None
        return self._orgs[key]

    def put_device(self, key: str, description: DeviceDescription) -> None:
        self._devices[key] = description
        self._upsert(
            reference_summary_table,
            [{"key": key, "kind": "device", "body": description.model_dump_json()}],
            "key",
        )

    def get_device(self, key: str) -> DeviceDescription | None:
        if key not in self._devices:
            body = self._summary(key)
            self._devices[key] = DeviceDescription.model_validate_json(body) if body else None
        return self._devices[key]

    def _summary(self, key: str) -> str | None:
        t = reference_summary_table
        row = self._conn.execute(sa.select(t.c.body).where(t.c.key == key)).first()
        return row.body if row else None

    # -- subscriptions --
    def subscription_event(self, subscription: str) -> int | None:
        t = subscription_state_table
        row = self._conn.execute(
            sa.select(t.c.last_event).where(t.c.subscription == subscription)
        ).first()
        return int(row.last_event) if row else None

    def set_subscription_event(self, subscription: str, event: int) -> None:
        self._upsert(
            subscription_state_table,
            [{"subscription": subscription, "last_event": event}],
            "subscription",
        )

    # -- seq floors --
    def get_seq_floors(self, keys: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, int] = {}
        t = seq_floor_table
        for start in range(0, len(wanted), self._CHUNK):
            chunk = wanted[start : start + self._CHUNK]
            for row in self._conn.execute(sa.select(t).where(t.c.key.in_(chunk))):
                found[row.key] = int(row.seq)
        return found

    def put_seq_floors(self, floors: dict[str, int]) -> None:
        if floors:
            rows = [{"key": k, "seq": v} for k, v in floors.items()]
            self._upsert(seq_floor_table, rows, "key")

    def start_epoch(self) -> int:
        """Record that an ingestor starts on this vault, in a transaction of its own; the
        number of ingestors started before it (0 for the first)."""
        with self.engine.begin() as conn:
            inserted = conn.execute(
                ingest_epoch_table.insert().values(started_at=_now())
            ).inserted_primary_key
            assert inserted is not None
            epoch = int(inserted[0])
            earlier = conn.execute(
                sa.select(sa.func.count()).where(ingest_epoch_table.c.epoch < epoch)
            ).scalar_one()
        return int(earlier)

    def _flush_buffers(self) -> None:
        if self._identity_buffer:
            self._upsert(identity_table, list(self._identity_buffer.values()), "pseudonym")
            self._identity_buffer.clear()
        if self._identifier_buffer:
            self._upsert(
                patient_identifier_table,
                [
                    {"identifier_hash": h, "pseudonym": p}
                    for h, p in self._identifier_buffer.items()
                ],
                "identifier_hash",
            )
            self._identifier_buffer.clear()

    def commit(self) -> None:
        self._flush_buffers()
        self._tx.commit()
        self._tx = self._conn.begin()

    def rollback(self) -> None:
        self._tx.rollback()
        self._identity_buffer.clear()
        self._identifier_buffer.clear()
        self._orgs.clear()
        self._devices.clear()
        self._tx = self._conn.begin()

    def close(self) -> None:
        if self._tx.is_active:
            self._flush_buffers()
            self._tx.commit()
        self._conn.close()
        self.engine.dispose()


_ABSENT = object()


class MemoryVault:
    """An in-memory vault for unit tests, transactional like the SQL one: every write is
    journalled until ``commit``, and ``rollback`` undoes the writes since."""

    def __init__(self) -> None:
        self.index: dict[str, IndexEntry] = {}
        self.identity: dict[str, dict[str, Any]] = {}
        self.identifiers: dict[str, str] = {}
        self.orgs: dict[str, OrganizationRecord] = {}
        self.devices: dict[str, DeviceDescription] = {}
        self.subscriptions: dict[str, int] = {}
        self.seq_floors: dict[str, int] = {}
        self.epochs = 0
        self._journal: list[tuple[dict[str, Any], str, Any]] = []

    def start_epoch(self) -> int:
        self.epochs += 1
        return self.epochs - 1

    def _set(self, table: dict[str, Any], key: str, value: Any) -> None:
        self._journal.append((table, key, table.get(key, _ABSENT)))
        table[key] = value

    def get_index(self, keys: Iterable[str]) -> dict[str, IndexEntry]:
        return {k: self.index[k] for k in keys if k in self.index}

    def put_index(self, entries: Iterable[IndexEntry]) -> None:
        for entry in entries:
            self._set(self.index, entry.key, entry)

    def put_identity(
        self, pseudonym: str, source: str, identity: IdentityRecord, identifier_hashes: list[str]
    ) -> None:
        self._set(self.identity, pseudonym, {"source": source, **identity.__dict__})
        for h in identifier_hashes:
            self._set(self.identifiers, h, pseudonym)

    def patient_by_identifier(self, identifier_hash: str) -> str | None:
        return self.identifiers.get(identifier_hash)

    def get_identity(self, pseudonym: str) -> dict[str, Any] | None:
        return self.identity.get(pseudonym)

    def put_organization(self, key: str, record: OrganizationRecord) -> None:
        self._set(self.orgs, key, record)

    def get_organization(self, key: str) -> OrganizationRecord | None:
        return self.orgs.get(key)

    def put_device(self, key: str, description: DeviceDescription) -> None:
        self._set(self.devices, key, description)

    def get_device(self, key: str) -> DeviceDescription | None:
        return self.devices.get(key)

    def subscription_event(self, subscription: str) -> int | None:
        return self.subscriptions.get(subscription)

    def set_subscription_event(self, subscription: str, event: int) -> None:
        self._set(self.subscriptions, subscription, event)

    def get_seq_floors(self, keys: Iterable[str]) -> dict[str, int]:
        return {k: self.seq_floors[k] for k in keys if k in self.seq_floors}

    def put_seq_floors(self, floors: dict[str, int]) -> None:
        for key, seq in floors.items():
            self._set(self.seq_floors, key, seq)

    def commit(self) -> None:
        self._journal.clear()

    def rollback(self) -> None:
        for table, key, old in reversed(self._journal):
            if old is _ABSENT:
                table.pop(key, None)
            else:
                table[key] = old
        self._journal.clear()

    def close(self) -> None:
        return None
