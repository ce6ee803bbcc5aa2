"""Per-patient state backed by the facts topic itself.

Patient state is a fold of the facts topic (:mod:`.patient_state`: per resource, the envelope
with the highest ``seq``), and the facts topic is kept forever, so the topic *is* the state's
changelog: writing every change to a second, Faust-managed changelog would double the work for
nothing (Kafka Streams makes the same optimisation for tables read straight from a topic). A
worker that is assigned a partition rebuilds that partition's state by reading it from the
beginning, then goes on from its committed offset; envelopes it sees twice change nothing.

State is kept per partition: ``partition -> patient -> resource key -> entry``, and for the
patients evaluated since, their patient view (:class:`core.patient_view.PatientFold`, updated
per event; the entries stay the state and its digest). Rebuilding reads with a plain Kafka
consumer (tens of thousands of envelopes a second). The worker keeps local checkpoints
(:mod:`.checkpoint`: the state plus the offset it reflects) and reads patients from them
lazily: memory holds the patients changed since the last checkpoint and a bounded cache of the
others (:class:`PatientStore`), so a restart opens the checkpoint and folds only the tail after
it (:func:`fold_tail`), reading just the patients the tail touches; more partitions spread the
state over more workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from core.contracts.facts import envelopes_of
from core.patient_view import PatientFold, PatientView
from infra.kafka_log import routed

from . import patient_state

log = logging.getLogger(__name__)

Entries = dict[str, dict[str, Any]]


@dataclass
class Change:
    """What applying one envelope did to a patient's state."""

    patient: str
    key: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any]
    applied: bool


def canonical(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry in the canonical form of :func:`patient_state.entry_of` (for digests and pages;
    the store keeps the envelope object itself, so the hot path copies nothing)."""
    provenance = dict(entry.get("provenance") or {})
    provenance.pop("ingested_at", None)
    return {
        "seq": int(entry["seq"]),
        "retracted": bool(entry.get("retracted", False)),
        "facts": list(entry.get("facts") or ()),
        "provenance": provenance,
    }


class Backing(Protocol):
    """Where a partition's patients that are not in memory are read from: the partition's
    local checkpoint (:class:`.checkpoint.PartitionReader`), which holds every patient's entries
    as of the checkpoint's offset."""

    def get(self, patient: str) -> Entries | None: ...

    def patients(self) -> Iterator[str]: ...


class PartitionView(Mapping[str, Entries]):
    """A backed partition's patients, read through: those in memory and those only in the
    checkpoint. Reading every patient reads the whole checkpoint (a saved question evaluated
    on the whole partition does; nothing on the restart path does), and what it reads is not
    kept in memory."""

    def __init__(self, store: PatientStore, partition: int) -> None:
        self._store = store
        self._partition = partition

    def __getitem__(self, patient: str) -> Entries:
        entries = self._store.peek(self._partition, patient)
        if entries is None:
            raise KeyError(patient)
        return entries

    def __iter__(self) -> Iterator[str]:
        live = self._store.partitions.get(self._partition, {})
        backing = self._store.backing(self._partition)
        seen: set[str] = set()
        if backing is not None:
            for patient in backing.patients():
                seen.add(patient)
                yield patient
        for patient in list(live):
            if patient not in seen:
                yield patient

    def __len__(self) -> int:
        return sum(1 for _ in self)


class PatientStore:
    """Patients' live resources, per partition of the facts topic. An entry is the envelope
    object as decoded (``seq``, ``retracted``, ``facts``, ``provenance`` and the envelope's
    other fields), kept as it is.

    A partition is held either wholly in memory, or **backed** by its local checkpoint
    (:meth:`install` with ``backing``): then memory holds the patients changed since the last
    checkpoint (write-behind: the next checkpoint writes them, in one batch with the offset
    they reflect) and a bounded cache of others, read from the checkpoint when first needed.
    A patient that is not changed is the same in memory and in the checkpoint, so dropping it
    from memory loses nothing; a changed one stays until a checkpoint holding it is on disk.
    A restart therefore opens the checkpoint and reads only the patients the facts after it
    touch: its cost follows the tail, not the history (:mod:`.checkpoint`)."""

    def __init__(self, cache_patients: int = 0) -> None:
        #: per partition, the patients held in memory (all of them unless backed)
        self.partitions: dict[int, dict[str, Entries]] = {}
        self._resources: dict[int, int] = {}
        #: per partition, the patient view kept per event (:class:`core.patient_view.PatientFold`)
        #: of each patient whose view was asked for since the partition was installed; made on
        #: first use, so a rebuild parses nothing
        self._folds: dict[int, dict[str, PatientFold]] = {}
        #: per partition, the patients changed since its last local checkpoint (all of them
        #: after a rebuild from offset 0: :mod:`.checkpoint`)
        self.changed: dict[int, set[str]] = {}
        #: per partition, the patients of a checkpoint being written (still not evictable)
        self._pending: dict[int, set[str]] = {}
        self._backing: dict[int, Backing] = {}
        #: patients kept in memory across the backed partitions beyond the changed ones
        #: (0: no bound); split evenly between the partitions held
        self.cache_patients = cache_patients
        self._trim_at: dict[int, int] = {}
        self.loads = 0
        self.evictions = 0

    def ready(self, partition: int) -> bool:
        return partition in self.partitions

    def install(
        self,
        partition: int,
        patients: dict[str, Entries],
        changed: set[str] | None = None,
        backing: Backing | None = None,
    ) -> None:
        """Hold ``patients`` as the partition's state; ``changed``: the patients that differ
        from the partition's local checkpoint (default: all of them); ``backing``: the
        checkpoint the patients not in ``patients`` are read from (none: ``patients`` is the
        whole partition)."""
        self.partitions[partition] = patients
        self._resources[partition] = sum(len(e) for e in patients.values())
        self._folds.pop(partition, None)
        self._pending.pop(partition, None)
        self._trim_at.pop(partition, None)
        self.changed[partition] = set(patients) if changed is None else changed
        if backing is None:
            self._backing.pop(partition, None)
        else:
            self._backing[partition] = backing

    def drop(self, partition: int) -> None:
        self.partitions.pop(partition, None)
        self._resources.pop(partition, None)
        self._folds.pop(partition, None)
        self.changed.pop(partition, None)
        self._pending.pop(partition, None)
        self._backing.pop(partition, None)
        self._trim_at.pop(partition, None)

    def backing(self, partition: int) -> Backing | None:
        return self._backing.get(partition)

    def view(self, partition: int, patient: str) -> PatientView:
        """The patient's view (:mod:`core.patient_view`), kept current per event: the one fold
        that cohorts and device contributions read."""
        folds = self._folds.setdefault(partition, {})
        fold = folds.get(patient)
        if fold is None:
            fold = PatientFold.from_entries(patient, self.patient(partition, patient))
            folds[patient] = fold
        return fold.view()

    def patient(self, partition: int, patient: str) -> Entries:
        """The patient's entries (empty when the partition has none), read from the checkpoint
        into memory when the partition is backed and they are not there yet."""
        live = self.partitions.get(partition)
        if live is None:
            return {}
        entries = live.get(patient)
        if entries is None:
            entries = self._load(partition, live, patient)
            if entries is None:
                return {}
        return entries

    def peek(self, partition: int, patient: str) -> Entries | None:
        """The patient's entries without keeping them in memory (None: no such patient)."""
        entries = self.partitions.get(partition, {}).get(patient)
        if entries is None:
            backing = self._backing.get(partition)
            if backing is not None:
                entries = backing.get(patient)
        return entries

    def _load(self, partition: int, live: dict[str, Entries], patient: str) -> Entries | None:
        backing = self._backing.get(partition)
        if backing is None:
            return None
        entries = backing.get(patient)
        if entries is None:
            return None
        self.loads += 1
        if len(live) >= self._trim_at.get(partition, 0):
            self.trim(partition)  # before it is held: the caller goes on with these entries
        live[patient] = entries
        return entries

    def patients(self, partition: int) -> Mapping[str, Entries]:
        """Every patient of the partition: the dictionary itself when it is held in memory, a
        read-through view when it is backed (:class:`PartitionView`)."""
        if partition in self._backing:
            return PartitionView(self, partition)
        return self.partitions.get(partition, {})

    def apply(self, partition: int, envelope: Mapping[str, Any]) -> Change:
        patients = self.partitions.setdefault(partition, {})
        patient = str(envelope["patient"])
        key = str(envelope["key"])
        entries = patients.get(patient)
        if entries is None:
            entries = self._load(partition, patients, patient)
            if entries is None:
                entries = patients[patient] = {}
        old = entries.get(key)
        new: dict[str, Any] = envelope  # type: ignore[assignment]
        applied = old is None or int(old["seq"]) < int(new["seq"])
        if applied:
            entries[key] = new
            changed = self.changed.get(partition)
            if changed is not None:
                changed.add(patient)
            if old is None:
                self._resources[partition] = self._resources.get(partition, 0) + 1
            fold = self._folds.get(partition, {}).get(patient)
            if fold is not None:
                fold.apply(key, new)  # parses this resource only
        return Change(patient, key, old, new if applied else (old or new), applied)

    # ------------------------------------------------------------------ write-behind

    def begin_checkpoint(self, partition: int) -> set[str]:
        """The patients the next checkpoint must write (changed since the last one); they stay
        in memory until :meth:`end_checkpoint` says the checkpoint is on disk."""
        changed = self.changed.get(partition, set())
        self._pending[partition] = self._pending.get(partition, set()) | changed
        self.changed[partition] = set()
        return changed

    def end_checkpoint(self, partition: int, written: bool) -> None:
        """The checkpoint begun last is on disk (``written``), or was not written: its patients
        are changed again, for the next one."""
        pending = self._pending.pop(partition, set())
        if partition not in self.partitions:
            return
        if not written:
            self.changed[partition] = pending | self.changed.get(partition, set())
        elif partition in self._backing:
            self.trim(partition)

    def trim(self, partition: int) -> None:
        """Drop patients that equal the checkpoint from memory, oldest loaded first, down to
        the partition's share of ``cache_patients``; changed ones stay (write-behind)."""
        live = self.partitions.get(partition)
        if not self.cache_patients or live is None or partition not in self._backing:
            return
        cap = max(1, self.cache_patients // max(1, len(self._backing)))
        keep = self.changed.get(partition, set())
        pending = self._pending.get(partition, set())
        folds = self._folds.get(partition, {})
        excess = len(live) - cap
        if excess > 0:
            victims: list[str] = []
            for patient in live:
                if patient in keep or patient in pending:
                    continue
                victims.append(patient)
                if len(victims) >= excess:
                    break
            for patient in victims:
                resources = len(live.pop(patient))
                self._resources[partition] = self._resources.get(partition, 0) - resources
                folds.pop(patient, None)
            self.evictions += len(victims)
            if len(folds) > len(live):  # views of patients with no entries held
                for patient in [p for p in folds if p not in live]:
                    del folds[patient]
        # the next trim when a tenth more is held (changed patients can hold it above the cap)
        self._trim_at[partition] = max(cap, len(live)) + max(1, cap // 10)

    # ------------------------------------------------------------------ whole state

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(state key, entry)`` for every resource held, as :mod:`.patient_state` keys them
        (a backed partition's are read from its checkpoint as well)."""
        for partition in list(self.partitions):
            for patient, entries in list(self.patients(partition).items()):
                for key, entry in list(entries.items()):
                    yield patient_state.state_key(patient, key), canonical(entry)

    def digest(self) -> dict[str, Any]:
        return patient_state.digest(self.items())

    def counts(self) -> dict[str, int]:
        """Partitions, patients and resources (a backed partition is counted by reading its
        checkpoint through)."""
        patients = resources = 0
        for partition, live in list(self.partitions.items()):
            if partition in self._backing:
                for entries in self.patients(partition).values():
                    patients += 1
                    resources += len(entries)
            else:
                patients += len(live)
                resources += self._resources.get(partition, 0)
        return {"partitions": len(self.partitions), "patients": patients, "resources": resources}

    def held(self) -> dict[str, int]:
        """What memory holds, for ``/metrics`` and the benchmarks: patients in memory, those
        changed since the last checkpoint, and the patients read from checkpoints and dropped
        from memory since the start."""
        return {
            "patients_in_memory": sum(len(p) for p in self.partitions.values()),
            "patients_changed": sum(len(c) for c in self.changed.values()),
            "patients_loaded": self.loads,
            "patients_evicted": self.evictions,
        }


def _watermarks(
    consumer: Consumer, topic: str, partition: int, timeout: float = 30.0
) -> tuple[int, int]:
    """The partition's low and high watermarks, asked again while the broker answers with a
    retriable error (a partition just created or whose leader is moving says 'not leader')."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=max(1.0, deadline - time.monotonic())
            )
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            retriable = isinstance(error, KafkaError) and (
                error.retriable()
                or error.code()
                in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
            )
            if not retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _partition_messages(
    bootstrap: str,
    topic: str,
    partition: int,
    start: int | None = None,
    end: int | None = None,
    timeout: float = 600.0,
) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """``(offset, key, value)`` of every message of ``partition`` in ``[start, end)``: from its
    beginning when ``start`` is None, to its end offset when the read starts when ``end`` is
    None (a fetch returns more than asked for: what lies past ``end`` is not yielded). The one
    reader of a partition's range that the rebuild, the gap replay and the table check share."""
    consumer = Consumer(
        routed(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "concierge-rebuild-unused",
                "enable.auto.commit": False,
                "fetch.max.bytes": 52_428_800,
            }
        )
    )
    try:
        low, high = _watermarks(consumer, topic, partition)
        if end is not None:
            high = min(high, end)
        position = low if start is None else max(start, low)
        if high <= position:
            return
        consumer.assign(
            [TopicPartition(topic, partition, OFFSET_BEGINNING if start is None else position)]
        )
        deadline = time.monotonic() + timeout
        while position < high:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {topic}[{partition}] took over {timeout:.0f} s "
                    f"(at offset {position} of {high})"
                )
            for message in consumer.consume(5000, timeout=0.5):
                offset = message.offset()
                if message.error() is not None or offset is None:
                    continue
                if offset >= high:
                    position = high
                    break
                position = offset + 1
                yield offset, message.key(), message.value()
    finally:
        consumer.close()


def partition_end(bootstrap: str, topic: str, partition: int) -> int:
    """The partition's end offset (high watermark) now."""
    consumer = Consumer(
        routed({"bootstrap.servers": bootstrap, "group.id": "concierge-rebuild-unused"})
    )
    try:
        return _watermarks(consumer, topic, partition)[1]
    finally:
        consumer.close()


def read_partition(
    bootstrap: str,
    topic: str,
    partition: int,
    end: int | None = None,
    timeout: float = 600.0,
) -> tuple[dict[str, Entries], int, int]:
    """Fold a facts partition from its beginning up to ``end`` (default: its end offset when
    the read starts): ``(patients, envelopes read, end)``, exactly the messages before ``end``:
    the state then reflects the stream's position, no more (the hooks of what comes after, cohort
    and device updates, run when the stream delivers it)."""
    high = partition_end(bootstrap, topic, partition)
    if end is not None:
        high = min(high, end)
    store = PatientStore()
    read = 0
    for _offset, _key, value in _partition_messages(
        bootstrap, topic, partition, end=high, timeout=timeout
    ):
        if value is None:
            continue
        for envelope in envelopes_of(value):
            store.apply(partition, envelope)
            read += 1
    return store.partitions.get(partition, {}), read, high


def fold_tail(
    bootstrap: str,
    topic: str,
    partition: int,
    backing: Backing,
    start: int,
    end: int,
    timeout: float = 600.0,
) -> tuple[dict[str, Entries], int, set[str]]:
    """Fold the messages of ``partition`` in ``[start, end)`` over ``backing`` (a checkpoint,
    which reflects everything before ``start``), reading from it only the patients those
    messages touch: ``(the touched patients' entries, envelopes read, patients changed)``."""
    store = PatientStore()
    store.install(partition, {}, changed=set(), backing=backing)
    read = 0
    for _offset, _key, value in _partition_messages(
        bootstrap, topic, partition, start, end, timeout
    ):
        if value is None:
            continue
        for envelope in envelopes_of(value):
            store.apply(partition, envelope)
            read += 1
    return store.partitions[partition], read, store.changed[partition]


def watermarks(bootstrap: str, topic: str, partition: int) -> tuple[int, int]:
    """The partition's first offset and end offset now."""
    consumer = Consumer(
        routed({"bootstrap.servers": bootstrap, "group.id": "concierge-rebuild-unused"})
    )
    try:
        return _watermarks(consumer, topic, partition)
    finally:
        consumer.close()


def read_messages(
    bootstrap: str, topic: str, partition: int, start: int, end: int, timeout: float = 600.0
) -> list[tuple[int, bytes]]:
    """The raw facts messages of ``partition`` in ``[start, end)`` as ``(offset, value)``: the
    gap another member of the group processed while this worker did not hold the partition."""
    return [
        (offset, value)
        for offset, _key, value in _partition_messages(
            bootstrap, topic, partition, start, end, timeout
        )
        if value is not None
    ]


def read_table_partition(
    bootstrap: str, topic: str, partition: int, timeout: float = 600.0
) -> dict[str, Any]:
    """The latest value of every key of a table's changelog partition, as it stands when the
    read starts: ``key -> decoded JSON value`` (None for a tombstone). Keys as the worker's
    published tables write them (raw strings; a JSON-quoted string is unquoted)."""
    latest: dict[str, Any] = {}
    for _offset, raw, value in _partition_messages(bootstrap, topic, partition, timeout=timeout):
        raw = raw or b""
        key = orjson.loads(raw) if raw.startswith(b'"') else raw.decode()
        latest[str(key)] = None if value is None else orjson.loads(value)
    return latest
