"""Standby checkpoints: a worker keeps the patient state of the facts partitions it does not own.

With ``CONCIERGE_STREAM_STANDBY`` on, each worker runs a :class:`Standby` beside its stream: a
plain consumer (``assign()``, never a member of the group, never committing) reads the facts
partitions the worker is not assigned and folds them into the same per-partition checkpoints the
worker keeps of its own partitions (:mod:`.checkpoint`, same directory, same identity). It has no
effects: no cohort record, no device contribution, nothing produced. When a partition fails over
to this worker, the ordinary recovery path (``StreamApp._load_partition``) opens that checkpoint
and folds only the facts after it.

The checkpoint invariants of :mod:`.checkpoint` hold unchanged because the standby folds each
partition **up to the worker group's committed offset and no further**, and writes a checkpoint
only when its fold stands exactly there: every message before the offset it writes has had its
effects made durable by the partition's owner. Messages past the committed offset are held back
(and the partition paused when many are) until the group commits past them. The group's
committed offsets are read from the coordinator with a client that never joins the group (an
OffsetFetch), as the worker reads its own.

Handing a partition over (:meth:`Standby.release`) is synchronous: the standby stops following it
and returns once no fold or write of it is under way, so the recovery that opens the checkpoint
next is its only user. A partition revoked from the worker is followed again from its checkpoint
(the owner's last one). Written from scratch rather than with Faust's ``table_standby_replicas``,
which covers Faust tables only: the patient state is this package's own store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from core.contracts.facts import envelopes_of
from infra.kafka_log import routed

from .checkpoint import CheckpointRefused, Checkpoints
from .store import PatientStore

log = logging.getLogger(__name__)

#: Messages held back past the committed offset before the partition is paused.
HOLD_LIMIT = 5000
#: How often the group's committed offsets and the partitions' ends are read (seconds).
REFRESH_SECONDS = 1.0
#: After a partition's checkpoint cannot be opened (its database still held by a write of the
#: owner that is finishing), how long before the standby tries again (seconds).
RETRY_SECONDS = 2.0


@dataclass
class Followed:
    """One partition the standby follows."""

    store: PatientStore
    #: the next facts offset to fold (everything before it is in ``store``)
    position: int
    #: the offset of the checkpoint on disk (what a failover would start from; -1: none yet)
    written: int
    #: the group's committed offset: the fold never goes past it
    target: int = 0
    #: the partition's end offset when last read
    end: int = 0
    #: messages read past ``target``, folded once the group commits past them
    held: list[tuple[int, bytes | None]] = field(default_factory=list)
    paused: bool = False
    due: float = 0.0
    #: the next offset the consumer must deliver (-1: the first delivery sets it)
    seen: int = -1
    #: the checkpoint's state when following started: "loaded", or why it was refused
    started_from: str = "loaded"


class Standby:
    """Follows the facts partitions the worker does not own, on a thread of its own."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        checkpoints: Callable[[], Checkpoints],
        checkpoint_seconds: float,
        cache_patients: int = 0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self._checkpoints_of = checkpoints
        self.checkpoint_seconds = checkpoint_seconds
        self.cache_patients = cache_patients
        #: the partitions the worker wants followed (every one it does not own)
        self._wanted: set[int] = set()
        self._followed: dict[int, Followed] = {}
        #: held by the thread while it folds or writes, and by release() while it takes over
        self._lock = threading.Lock()
        #: partitions whose checkpoint could not be opened: when to try again
        self._retry_at: dict[int, float] = {}
        self._assigned: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._offsets: Consumer | None = None
        self._refreshed = 0.0
        #: checkpoints written, messages folded (for /health)
        self.written = 0
        self.folded = 0
        self.errors: list[str] = []

    # ------------------------------------------------------------------ the worker's side

    def follow(self, partitions: set[int]) -> None:
        """The partitions to follow from now on (the worker's unowned ones)."""
        with self._lock:
            self._wanted = set(partitions)

    def release(self, partition: int) -> int | None:
        """Stop following ``partition`` (it is assigned to the worker) and return the offset of
        the standby checkpoint on disk (None: it was not followed). Blocks until no fold or
        write of it is under way (call it off the event loop)."""
        with self._lock:
            self._wanted.discard(partition)
            followed = self._followed.pop(partition, None)
        return None if followed is None or followed.written < 0 else followed.written

    def start(self) -> Standby:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="standby", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def status(self) -> dict[str, Any]:
        """Per followed partition: the standby checkpoint's offset and how far it is behind the
        group's committed offset and the topic's end (messages). No patient data."""
        with self._lock:
            partitions = {
                str(p): {
                    "checkpoint": f.written if f.written >= 0 else None,
                    "folded_to": f.position,
                    "committed": f.target,
                    "end": f.end,
                    "behind_committed": max(0, f.target - max(0, f.written)),
                    "behind_end": max(0, f.end - max(0, f.written)),
                    "started_from": f.started_from,
                }
                for p, f in sorted(self._followed.items())
            }
            waiting = sorted(self._wanted - set(self._followed))
        return {
            "partitions": partitions,
            "waiting": waiting,
            "checkpoints_written": self.written,
            "messages_folded": self.folded,
            "errors": self.errors[-5:],
        }

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        self._consumer = Consumer(
            routed(
                {
                    "bootstrap.servers": self.bootstrap,
                    # never used to join a group or commit: assign() only
                    "group.id": "concierge-standby-unused",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "fetch.max.bytes": 52_428_800,
                }
            )
        )
        # a client with the worker's group id reads the committed offsets (OffsetFetch); it
        # never subscribes, so it never joins the group
        self._offsets = Consumer(
            routed(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": self.group,
                    "enable.auto.commit": False,
                }
            )
        )
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as exc:  # the broker away, a write failing: said, then again
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    del self.errors[:-20]
                    log.warning("standby: %s; retrying", exc)
                    time.sleep(1.0)
        finally:
            self._consumer.close()
            self._offsets.close()

    def _step(self) -> None:
        assert self._consumer is not None
        self._sync_assignment()
        if not self._assigned:
            time.sleep(0.2)
            return
        now = time.monotonic()
        if now - self._refreshed >= REFRESH_SECONDS:
            self._refresh()
            self._refreshed = now
        messages = self._consumer.consume(2000, timeout=0.2)
        self._take(
            (message.partition(), message.offset(), message.value())
            for message in messages
            if message.error() is None
        )

    def _take(self, messages: Iterable[tuple[int | None, int | None, bytes | None]]) -> None:
        """Fold the messages read below each partition's target, hold back the rest, and write
        the checkpoints due."""
        with self._lock:
            for partition, offset, value in messages:
                if partition is None or offset is None:
                    continue
                followed = self._followed.get(partition)
                if followed is None:
                    continue  # released meanwhile
                expected = followed.position if followed.seen < 0 else followed.seen
                if offset < expected:
                    continue  # read twice
                if offset > expected:
                    # the facts topic is neither compacted nor written in transactions, so its
                    # offsets have no holes: messages were not delivered, and a fold without
                    # them would be silently wrong. Followed again from the checkpoint on disk.
                    self._restart(partition, f"offsets {expected} to {offset - 1} not delivered")
                    continue
                followed.seen = offset + 1
                if followed.held or offset >= followed.target:
                    followed.held.append((offset, value))
                else:
                    self._fold(partition, followed, offset, value)
            for partition, followed in self._followed.items():
                self._drain(partition, followed)
                if (
                    len(followed.held) >= HOLD_LIMIT
                    and not followed.paused
                    and self._consumer is not None
                ):
                    # the fetch resumes after the last message delivered (the last held)
                    self._consumer.pause([TopicPartition(self.topic, partition)])
                    followed.paused = True
                self._maybe_write(partition, followed)

    def _restart(self, partition: int, reason: str) -> None:
        """Stop following ``partition`` as it stands; the next step follows it again from its
        checkpoint on disk (what was folded since is read again)."""
        self._followed.pop(partition, None)
        self.errors.append(f"partition {partition}: {reason}; following again from the checkpoint")
        del self.errors[:-20]
        log.warning(
            "standby: partition %s: %s; following it again from its checkpoint", partition, reason
        )

    def _sync_assignment(self) -> None:
        """Unassign the partitions released, open and assign the ones newly wanted."""
        assert self._consumer is not None
        with self._lock:
            stale = self._assigned - set(self._followed)
            new = self._wanted - set(self._followed)
        if stale:
            self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in stale])
            self._assigned -= stale
        for partition in sorted(new):
            if time.monotonic() < self._retry_at.get(partition, 0.0):
                continue
            self._begin(partition)

    def _begin(self, partition: int) -> None:
        """Start following ``partition`` from its checkpoint (the same checks as the recovery
        path), or from its first offset when there is none or it is refused."""
        assert self._consumer is not None
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self.topic, partition), timeout=10
        )
        committed = self._committed([partition])[partition]
        position = self._open(partition, low, high, committed)
        if position is None:
            return
        if partition in self._assigned:
            self._consumer.incremental_unassign([TopicPartition(self.topic, partition)])
        self._consumer.incremental_assign([TopicPartition(self.topic, partition, position)])
        self._assigned.add(partition)

    def _open(self, partition: int, low: int, high: int, committed: int) -> int | None:
        """Follow ``partition`` from its checkpoint when it passes the recovery path's checks
        against the topic's first and end offsets and the group's committed offset, else from
        the first offset: the offset to read from (None: not now)."""
        checkpoints = self._checkpoints_of()
        with self._lock:
            if partition not in self._wanted or partition in self._followed:
                return None
            started_from = "loaded"
            try:
                opened = checkpoints.open(partition)
                if opened.offset > high:
                    raise CheckpointRefused(f"offset {opened.offset} is past the topic's end")
                if opened.offset > committed:
                    raise CheckpointRefused(
                        f"offset {opened.offset} is past the group's committed offset {committed}"
                    )
                if opened.offset < low:
                    raise CheckpointRefused(f"offset {opened.offset} is before the topic's start")
                reader, position = opened.reader, opened.offset
            except CheckpointRefused as exc:
                reason = str(exc)
                if reason.startswith("unreadable"):
                    # most likely still open for a write of the owner's that is finishing: the
                    # checkpoint may be good, so it is not discarded; tried again shortly
                    self._retry_at[partition] = time.monotonic() + RETRY_SECONDS
                    log.warning("standby: partition %s checkpoint %s; retrying", partition, reason)
                    return None
                if reason != "no checkpoint":
                    log.warning(
                        "standby: partition %s checkpoint refused (%s); folding from offset 0",
                        partition,
                        reason,
                    )
                checkpoints.discard(partition)
                reader, position, started_from = checkpoints.reader(partition), low, reason
            store = PatientStore(self.cache_patients)
            store.install(partition, {}, changed=set(), backing=reader)
            self._followed[partition] = Followed(
                store,
                position,
                written=position if started_from == "loaded" else -1,
                target=committed,
                end=high,
                due=time.monotonic() + self.checkpoint_seconds,
                started_from=started_from,
            )
            self._retry_at.pop(partition, None)
        return position

    def _committed(self, partitions: list[int]) -> dict[int, int]:
        assert self._offsets is not None
        found = self._offsets.committed(
            [TopicPartition(self.topic, p) for p in partitions], timeout=10
        )
        offsets: dict[int, int] = {}
        for tp in found:
            if tp.error is not None:
                raise KafkaException(tp.error)
            offsets[tp.partition] = max(0, int(tp.offset))  # never committed: -1001
        return offsets

    def _refresh(self) -> None:
        """Read the group's committed offsets and the ends of the followed partitions."""
        assert self._consumer is not None
        with self._lock:
            partitions = sorted(self._followed)
        if not partitions:
            return
        committed = self._committed(partitions)
        ends: dict[int, int] = {}
        for partition in partitions:
            try:
                _low, ends[partition] = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=5
                )
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not isinstance(error, KafkaError) or not error.retriable():
                    raise
        self._targets(committed, ends)

    def _targets(self, committed: dict[int, int], ends: dict[int, int]) -> None:
        """Take the group's committed offsets as the folds' targets, and the topic's ends."""
        with self._lock:
            for partition, offset in committed.items():
                followed = self._followed.get(partition)
                if followed is None:
                    continue
                # the committed offset never moves back under a working group; if it did, the
                # fold stays where it is and waits (it never writes past what is committed)
                followed.target = max(followed.target, offset)
                if partition in ends:
                    followed.end = ends[partition]

    def _drain(self, partition: int, followed: Followed) -> None:
        """Fold the held messages the group has now committed past."""
        if not followed.held:
            return
        index = 0
        for offset, value in followed.held:
            if offset >= followed.target:
                break
            if offset >= followed.position:
                self._fold(partition, followed, offset, value)
            index += 1
        del followed.held[:index]
        if followed.paused and len(followed.held) < HOLD_LIMIT // 2 and self._consumer:
            self._consumer.resume([TopicPartition(self.topic, partition)])
            followed.paused = False

    def _fold(self, partition: int, followed: Followed, offset: int, value: bytes | None) -> None:
        """Fold one facts message as the worker's stream does, without its effects."""
        followed.position = offset + 1
        if value is None:
            return
        try:
            envelopes = envelopes_of(value)
        except orjson.JSONDecodeError:
            return  # the owner skips it too (and logs it)
        for envelope in envelopes:
            if isinstance(envelope, dict) and "patient" in envelope and "seq" in envelope:
                followed.store.apply(partition, envelope)
        self.folded += 1

    def _maybe_write(self, partition: int, followed: Followed) -> None:
        """Write the standby checkpoint when one is due and the fold stands exactly at the
        group's committed offset (the one offset every effect before which is durable)."""
        if followed.position != followed.target or followed.position <= max(0, followed.written):
            return
        now = time.monotonic()
        if now < followed.due:
            return
        checkpoints = self._checkpoints_of()
        changed = followed.store.begin_checkpoint(partition)
        batch = checkpoints.encode(
            partition, followed.position, followed.store.patients(partition), changed
        )
        try:
            checkpoints.write(partition, batch)
        except Exception:
            followed.store.end_checkpoint(partition, written=False)
            raise
        followed.store.end_checkpoint(partition, written=True)
        followed.written = followed.position
        followed.due = now + self.checkpoint_seconds
        self.written += 1
