"""Local checkpoints of patient state: a restart replays only the facts after the checkpoint.

Per partition of the facts topic, one RocksDB database (through ``rocksdict``) under the
worker's data directory holds

* ``p:<pseudonym>`` -> the patient's entries (:mod:`.store`), JSON;
* ``meta`` -> what the checkpoint reflects: the facts offset (every message before it is folded
  in, none after), and the identity of what it was folded from: the topic's name and id, the
  partition, the partition count and a fingerprint of the pseudonym key.

Every checkpoint is **one** write batch (the patients changed since the last one, and ``meta``)
written with the write-ahead log synced, so RocksDB applies all of it or none of it, whatever
kills the process: ``meta`` never names an offset whose state is not all there.

The worker writes a checkpoint only at an offset the consumer group has committed (see
``StreamApp.maybe_checkpoint``): every effect of the messages before it (cohort records, device
contributions) is then durable, so a restart folds the tail up to the committed offset without
effects, as a rebuild from offset 0 does.

A restart does not read the checkpoint whole: it checks ``meta`` (:meth:`Checkpoints.open`) and
the store reads each patient when it is first needed (:class:`PartitionReader`), so recovery
reads the patients the facts after the checkpoint touch, however large the history. Between
checkpoints the store keeps the changed patients in memory (write-behind) and may drop the others
(they equal the checkpoint): the database always holds the state at ``meta``'s offset, whole.

A checkpoint is refused, and the partition rebuilt from offset 0, when it is missing, cannot be
opened or decoded, was made from another topic (name or id: a topic deleted and created again),
partition count or pseudonym key, or names an offset past the topic's end or the group's committed
offset, or before the topic's first offset. The refusal is logged with its reason and shown on
``/readyz``; the partition stays not ready until the rebuild has caught up.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

log = logging.getLogger(__name__)

FORMAT = 1
META = b"meta"
PATIENT = b"p:"


def key_fingerprint(secret: bytes) -> str:
    """A fingerprint of the pseudonym key that reveals nothing of it (a hash of a hash, so the
    checkpoint never holds anything an HMAC with the key could be checked against)."""
    return hashlib.sha256(b"concierge-checkpoint:" + hashlib.sha256(secret).digest()).hexdigest()[
        :32
    ]


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must have been folded from to be used."""

    topic: str
    partitions: int
    key: str
    #: the topic's id (a UUID string; a topic created again has a new one), when the broker says
    topic_id: str | None = None

    def meta(self, partition: int, offset: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "topic": self.topic,
            "topic_id": self.topic_id,
            "partition": partition,
            "partitions": self.partitions,
            "key": self.key,
            "offset": offset,
            "written_at": time.time(),
        }

    def mismatch(self, partition: int, meta: Mapping[str, Any]) -> str | None:
        """Why ``meta`` does not belong to this identity (None when it does)."""
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')!r}, not {FORMAT}"
        if meta.get("topic") != self.topic or meta.get("partition") != partition:
            return f"made from {meta.get('topic')}[{meta.get('partition')}]"
        if meta.get("partitions") != self.partitions:
            return f"made with {meta.get('partitions')} partitions, not {self.partitions}"
        if meta.get("key") != self.key:
            return "made with another pseudonym key"
        if self.topic_id and meta.get("topic_id") and meta.get("topic_id") != self.topic_id:
            return "made from another topic of the same name (deleted and created again)"
        if not isinstance(meta.get("offset"), int) or meta["offset"] < 0:
            return f"offset {meta.get('offset')!r} is not an offset"
        return None


@dataclass
class Loaded:
    patients: dict[str, dict[str, dict[str, Any]]]
    offset: int
    written_at: float


class PartitionReader:
    """One partition's checkpoint read patient by patient (:class:`.store.Backing`): what the
    store reads through when a patient is not in memory. Reads see every batch written
    before them (RocksDB reads are consistent with completed writes)."""

    def __init__(self, checkpoints: Checkpoints, partition: int) -> None:
        self._checkpoints = checkpoints
        self.partition = partition

    def get(self, patient: str) -> dict[str, dict[str, Any]] | None:
        raw = self._checkpoints._db(self.partition).get(PATIENT + patient.encode())
        if raw is None:
            return None
        entries = orjson.loads(raw)
        if not isinstance(entries, dict):
            # a damaged value: nothing to guess from, and a silent empty state would be wrong
            raise CheckpointRefused("a patient's entries are not an object")
        return entries

    def patients(self) -> Iterator[str]:
        """Every patient of the checkpoint, in key order (keys only: nothing is decoded)."""
        for key in self._checkpoints._db(self.partition).keys(from_key=PATIENT):
            if not isinstance(key, bytes) or not key.startswith(PATIENT):
                break
            yield key[len(PATIENT) :].decode()


@dataclass
class Opened:
    """A checked checkpoint, read lazily: the offset it reflects and its reader."""

    reader: PartitionReader
    offset: int
    written_at: float


class CheckpointRefused(Exception):
    """A checkpoint that cannot be used; the message says why (no patient data in it)."""


class Checkpoints:
    """The checkpoint databases of one worker: ``directory/p<partition>``."""

    def __init__(self, directory: Path, identity: Identity) -> None:
        self.directory = directory
        self.identity = identity
        self._dbs: dict[int, Rdict] = {}
        self._write = WriteOptions()
        self._write.sync = True

    def path(self, partition: int) -> Path:
        return self.directory / f"p{partition}"

    def _options(self) -> Options:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        return options

    def _db(self, partition: int) -> Rdict:
        db = self._dbs.get(partition)
        if db is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            db = Rdict(str(self.path(partition)), self._options())
            db.set_write_options(self._write)
            self._dbs[partition] = db
        return db

    def _meta(self, partition: int) -> dict[str, Any]:
        """The partition's checked metadata (raises :class:`CheckpointRefused`, or RocksDB's
        and orjson's own errors for the caller to wrap)."""
        db = self._db(partition)
        raw = db.get(META)
        if raw is None:
            raise CheckpointRefused("no checkpoint metadata")
        meta = orjson.loads(raw)
        if not isinstance(meta, dict):
            raise CheckpointRefused("checkpoint metadata is not an object")
        reason = self.identity.mismatch(partition, meta)
        if reason is not None:
            raise CheckpointRefused(reason)
        return meta

    def open(self, partition: int) -> Opened:
        """The partition's checkpoint, checked against the identity, without reading its
        patients (the restart path: the store reads each when it is first needed).
        :class:`CheckpointRefused` as :meth:`load`."""
        if not self.path(partition).exists():
            raise CheckpointRefused("no checkpoint")
        try:
            meta = self._meta(partition)
        except CheckpointRefused:
            raise
        except Exception as exc:  # RocksDB's corruption and I/O errors, undecodable JSON
            self.close(partition)
            raise CheckpointRefused(f"unreadable ({type(exc).__name__}: {exc})") from exc
        return Opened(
            PartitionReader(self, partition),
            int(meta["offset"]),
            float(meta.get("written_at") or 0.0),
        )

    def reader(self, partition: int) -> PartitionReader:
        """A reader of the partition's database as it stands (empty after :meth:`discard`),
        for a partition rebuilt from offset 0 whose next checkpoints go there."""
        return PartitionReader(self, partition)

    def load(self, partition: int) -> Loaded:
        """The partition's whole checkpoint in memory (for tests and checks; a restart uses
        :meth:`open`), checked against the identity; :class:`CheckpointRefused`
        when there is none or it cannot be used (the caller checks the offset against the
        topic and the group)."""
        if not self.path(partition).exists():
            raise CheckpointRefused("no checkpoint")
        try:
            db = self._db(partition)
            meta = self._meta(partition)
            patients: dict[str, dict[str, dict[str, Any]]] = {}
            for key, value in db.items(from_key=PATIENT):
                if not isinstance(key, bytes) or not key.startswith(PATIENT):
                    break
                entries = orjson.loads(value)
                if not isinstance(entries, dict):
                    raise CheckpointRefused("a patient's entries are not an object")
                patients[key[len(PATIENT) :].decode()] = entries
        except CheckpointRefused:
            raise
        except Exception as exc:  # RocksDB's corruption and I/O errors, undecodable JSON
            self.close(partition)
            raise CheckpointRefused(f"unreadable ({type(exc).__name__}: {exc})") from exc
        return Loaded(patients, int(meta["offset"]), float(meta.get("written_at") or 0.0))

    def discard(self, partition: int) -> None:
        """Remove the partition's checkpoint (before a rebuild replaces a refused one)."""
        self.close(partition)
        path = self.path(partition)
        if path.exists():
            try:
                Rdict.destroy(str(path), self._options())
            except Exception:  # a directory RocksDB cannot read: remove it as files
                shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path, ignore_errors=True)

    def encode(
        self,
        partition: int,
        offset: int,
        patients: Mapping[str, Mapping[str, Any]],
        changed: Iterable[str],
    ) -> WriteBatch:
        """One batch: the changed patients' entries as they stand, and the new ``meta``. Built
        by the caller while the state is still (nothing else folds into it meanwhile)."""
        batch = WriteBatch(raw_mode=True)
        for patient in changed:
            entries = patients.get(patient)
            if entries is not None:
                batch.put(PATIENT + patient.encode(), orjson.dumps(entries))
        batch.put(META, orjson.dumps(self.identity.meta(partition, offset)))
        return batch

    def write(self, partition: int, batch: WriteBatch) -> None:
        """Apply one batch atomically (synced write-ahead log): all of it or none of it."""
        self._db(partition).write(batch)

    def close(self, partition: int) -> None:
        db = self._dbs.pop(partition, None)
        if db is not None:
            try:
                db.close()
            except Exception:  # closing a database that failed to open
                log.debug("closing the checkpoint of partition %s failed", partition)

    def close_all(self) -> None:
        for partition in list(self._dbs):
            self.close(partition)
