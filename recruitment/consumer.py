"""The recruitment consumer: trials, cohort, facts and reference topics into the database.

Exactly-once effect, the simple way:

* each batch of messages is applied in **one database transaction**, together with the next
  offset of every partition it read (table ``consumer_offsets``);
* the Kafka offsets are committed (``enable.auto.commit=false``) only **after** that transaction
  commits;
* on (re)assignment the consumer seeks to the offsets in the database when it has them, so a crash
  between the two commits replays nothing; and every input carries a counter (cohort ``change``,
  facts ``seq``, trial ``version``, reference ``seq``) that makes a replayed message a no-op
  anyway.

A message that cannot be read (bad JSON, an unknown schema) is recorded in ``skipped_messages``
with the reason and the consumer moves on; a database error rolls the batch back, seeks back to
its first offsets and tries again, and gives up (raises) after a few failures in a row. A Kafka
error (the broker restarting, a leader moving) is recorded and backed off from (0.5 s to 5 s); a
consumer left unusable (a fatal error) is closed and a new one joins the group, resuming from the
database's offsets.

:meth:`RecruitmentConsumer.readiness` tells the truth about lag with the rule every topic reader
uses (:class:`infra.mirror.Freshness`): the high watermarks of the assigned partitions are measured
every ``refresh_seconds`` by a client of its own, and the consumer is ready when it is connected
and has applied (in the database) everything up to watermarks measured at most ``max_staleness``
seconds ago.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from sqlalchemy.orm import Session

from infra.kafka_log import routed
from infra.mirror import Key, ReaderHealth, ReaderStatus
from infra.topics import COHORT, FACTS, REFERENCE, TRIALS

from .contracts import (
    MessageError,
    decode_cohort,
    decode_facts,
    decode_reference_record,
    decode_trial,
    split_cohort_key,
)
from .models import ConsumerOffset, SkippedMessage
from .service import RecruitmentService, UnitOfWork

log = logging.getLogger(__name__)

#: Topic (without prefix) -> what it carries.
TOPIC_KINDS: dict[str, str] = {
    TRIALS: "trials",
    COHORT: "cohort",
    FACTS: "facts",
    REFERENCE: "reference",
}


@dataclass(frozen=True)
class BatchResult:
    messages: int = 0
    applied: int = 0
    skipped: int = 0


class RecruitmentConsumer:
    def __init__(
        self,
        service: RecruitmentService,
        bootstrap: str,
        prefix: str = "",
        group: str = "concierge-recruitment",
        batch_size: int = 500,
        poll_timeout: float = 1.0,
        kinds: Iterable[str] = ("trials", "cohort", "facts", "reference"),
        config: dict[str, Any] | None = None,
        max_failures: int = 5,
        *,
        refresh_seconds: float = 0.5,
        stale_after: float = 5.0,
        max_staleness: float = 5.0,
    ) -> None:
        self.service = service
        self.group = group
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.max_failures = max_failures
        wanted = set(kinds)
        self.topics = {prefix + name: kind for name, kind in TOPIC_KINDS.items() if kind in wanted}
        self._lock = threading.Lock()
        #: next offset per assigned partition, as applied in the database
        self._positions: dict[Key, int] = {}
        self._assignment: list[Key] = []
        self._unresolved: list[Key] = []
        self.health = ReaderHealth(
            "recruitment-consumer",
            bootstrap,
            self._assigned_partitions,
            config=config,
            refresh_seconds=refresh_seconds,
            stale_after=stale_after,
            max_staleness=max_staleness,
        )
        self.settings: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "error_cb": self.health.on_error,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
        }
        self.settings.update(config or {})
        self.consumer = self._consumer()
        self._failures = 0
        self._kafka_failures = 0
        self.total = BatchResult()
        self.assigned = False

    def _consumer(self) -> Consumer:
        consumer = Consumer(routed(self.settings))
        consumer.subscribe(
            list(self.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        return consumer

    # -- assignment --
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = self._stored_offsets(partitions)
        for tp in partitions:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                tp.offset = offset
        log.info(
            "assigned %d partition(s), %d resumed from the database", len(partitions), len(stored)
        )
        consumer.assign(partitions)
        keys = [(tp.topic, tp.partition) for tp in partitions]
        with self._lock:
            self._assignment = keys
            self._positions = dict(stored)
            # no offset in the database: Kafka's committed one, looked up after the callback
            self._unresolved = [(tp.topic, tp.partition) for tp in partitions if tp.offset < 0]
        self.health.forget()  # watermarks of another assignment say nothing about this one
        self.assigned = bool(partitions)

    def _resolve(self) -> None:
        """Where reading resumes for partitions the database has no offset for: Kafka's
        committed offset, if any (otherwise the start; :class:`~infra.mirror.Freshness` counts
        from the low watermark)."""
        with self._lock:
            unresolved, self._unresolved = self._unresolved, []
        try:
            found = self.consumer.committed(
                [TopicPartition(t, p) for t, p in unresolved], timeout=5
            )
        except KafkaException:
            with self._lock:  # asked again after the next poll
                self._unresolved = [k for k in unresolved if k in self._assignment]
            raise
        with self._lock:
            for tp in found:
                key = (tp.topic, tp.partition)
                if tp.offset >= 0 and key in self._assignment and key not in self._positions:
                    self._positions[key] = tp.offset

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = False
        with self._lock:
            self._assignment = []
            self._positions = {}
            self._unresolved = []
        self.health.forget()
        consumer.unassign()

    def _assigned_partitions(self) -> list[Key]:
        with self._lock:
            return list(self._assignment)

    # -- readiness --
    def readiness(self) -> ReaderStatus:
        """Connected, and applied up to fresh high watermarks of every assigned partition."""
        with self._lock:
            positions = {key: self._positions.get(key, 0) for key in self._assignment}
        waiting = None if self.assigned else "waiting for a partition assignment"
        return self.health.status(positions, waiting)

    def _stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[tuple[str, int], int]:
        topics = sorted({tp.topic for tp in partitions})
        if not topics:
            return {}
        with self.service.sessions() as session:
            rows = session.execute(
                sa.select(
                    ConsumerOffset.topic, ConsumerOffset.kafka_partition, ConsumerOffset.next_offset
                ).where(ConsumerOffset.group_id == self.group, ConsumerOffset.topic.in_(topics))
            )
            wanted = {(tp.topic, tp.partition) for tp in partitions}
            return {(t, p): int(o) for t, p, o in rows if (t, p) in wanted}

    # -- the loop --
    def poll(self) -> BatchResult:
        """Read and apply one batch (possibly empty)."""
        self.health.start()
        try:
            messages = self.consumer.consume(self.batch_size, self.poll_timeout)
            readable = [m for m in messages if self._readable(m)]
            if self._unresolved:
                self._resolve()
            if not messages:
                self._advance()
        except KafkaException as exc:
            self._kafka_trouble(exc)
            return BatchResult()
        self._kafka_failures = 0
        if not readable:
            return BatchResult()
        try:
            result = self.process(readable)
        except Exception:
            self._failures += 1
            self._rewind(readable)
            if self._failures >= self.max_failures:
                raise
            log.exception(
                "batch of %d failed (%d in a row); retrying", len(readable), self._failures
            )
            time.sleep(min(0.5 * 2**self._failures, 10.0))
            return BatchResult()
        self._failures = 0
        self.total = BatchResult(
            self.total.messages + result.messages,
            self.total.applied + result.applied,
            self.total.skipped + result.skipped,
        )
        return result

    def run(self, stop: threading.Event | None = None, idle_exit: float | None = None) -> None:
        """Consume until ``stop`` is set, or, with ``idle_exit``, until caught up and idle.

        "Caught up": every assigned partition has been read to its end. Idle time counts only
        while partitions are assigned (joining the group, or a rebalance, is not idleness).
        """
        idle_since = time.monotonic()
        while stop is None or not stop.is_set():
            result = self.poll()
            if result.messages or not self.assigned:
                idle_since = time.monotonic()
            elif idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                if self.caught_up():
                    return
                idle_since = time.monotonic()

    def caught_up(self, timeout: float = 5.0) -> bool:
        """Every assigned partition has been applied up to fresh high watermarks (see
        :meth:`readiness`); waits up to ``timeout`` for the first measurement of a new
        assignment."""
        deadline = time.monotonic() + timeout
        status = self.readiness()
        while status.lag is None and self.assigned and time.monotonic() < deadline:
            time.sleep(0.05)
            status = self.readiness()
        return status.caught_up and self.assigned

    def _advance(self) -> None:
        """Positions past what no message shows (transaction markers, aborted records). Called
        after a poll that delivered nothing: everything delivered before is in the database."""
        with self._lock:
            assignment = list(self._assignment)
        if not assignment:
            return
        found = self.consumer.position([TopicPartition(t, p) for t, p in assignment])
        with self._lock:
            for tp in found:
                key = (tp.topic, tp.partition)
                if tp.offset >= 0 and key in self._assignment:
                    self._positions[key] = max(self._positions.get(key, 0), tp.offset)

    def _kafka_trouble(self, exc: KafkaException) -> None:
        """Record, back off; a consumer left unusable is replaced (it rejoins the group and
        resumes from the database's offsets)."""
        self._kafka_failures += 1
        self.health.record(f"KafkaException: {exc}")
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is not None and error.fatal():
            log.warning("consumer unusable (%s): joining the group again", error)
            with contextlib.suppress(Exception):  # it is being replaced
                self.consumer.close()
            self.assigned = False
            with self._lock:
                self._assignment = []
                self._positions = {}
                self._unresolved = []
            self.consumer = self._consumer()
        time.sleep(min(5.0, 0.5 * 2 ** min(self._kafka_failures - 1, 4)))

    def close(self) -> None:
        self.health.stop()
        self.consumer.close()

    # -- one batch --
    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Apply a batch in one transaction with its offsets; then commit them to Kafka."""
        applied = skipped = 0
        next_offsets: dict[tuple[str, int], int] = {}
        with self.service.sessions.begin() as session:
            work = self.service.unit_of_work(session)
            work.prefetch_cohort(self._cohort_keys(messages))
            for message in messages:
                topic, partition, offset = (
                    message.topic(),
                    message.partition(),
                    message.offset(),
                )
                assert topic is not None and partition is not None and offset is not None
                try:
                    if self.apply(work, self.topics[topic], message):
                        applied += 1
                except MessageError as exc:
                    skipped += 1
                    self._skip(session, message, str(exc))
                next_offsets[(topic, partition)] = offset + 1
            work.finish()
            self._store_offsets(session, next_offsets, work.now)
        with self._lock:
            for key, offset in next_offsets.items():
                if key in self._positions or key in self._assignment:
                    self._positions[key] = max(self._positions.get(key, 0), offset)
        self.commit_kafka([TopicPartition(t, p, o) for (t, p), o in sorted(next_offsets.items())])
        if skipped:
            log.warning("batch of %d: %d message(s) skipped as unreadable", len(messages), skipped)
        return BatchResult(len(messages), applied, skipped)

    def commit_kafka(self, offsets: list[TopicPartition]) -> None:
        """Commit to Kafka, after the database; a failure here loses nothing (see on_assign)."""
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("Kafka offset commit failed (database offsets stand): %s", exc)

    def apply(self, work: UnitOfWork, kind: str, message: Message) -> bool:
        raw_key = message.key()
        key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else raw_key
        value = message.value()
        if kind == "cohort":
            parts = split_cohort_key(key or "")
            if parts is None:
                return False  # the stream worker's bookkeeping
            return work.cohort(parts[0], parts[1], decode_cohort(value, key or ""))
        if kind == "trials":
            trial = decode_trial(value, key)
            trial_id = trial.id if trial is not None else key
            if not trial_id:
                raise MessageError("trial tombstone without a key")
            return work.trial(trial_id, trial)
        if kind == "facts":
            changed = False
            for envelope in decode_facts(value):
                changed = work.facts(envelope) or changed
            return changed
        if kind == "reference":
            if value is None:
                return work.reference_tombstone(key) if key else False
            record = decode_reference_record(value, key)
            return work.reference(record) if record is not None else False
        raise MessageError(f"no handler for {kind}")  # pragma: no cover - topics are fixed

    # -- helpers --
    def _cohort_keys(self, messages: Sequence[Message]) -> list[tuple[str, str]]:
        """The ``(trial, patient)`` keys of a batch's cohort records, read ahead in bulk."""
        keys: list[tuple[str, str]] = []
        for message in messages:
            if self.topics.get(message.topic() or "") != "cohort":
                continue
            raw = message.key()
            key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            try:
                parts = split_cohort_key(key or "")
            except MessageError:
                continue  # skipped when applied, with the reason
            if parts is not None:
                keys.append((parts[0], parts[1]))
        return keys

    def _readable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() == KafkaError._PARTITION_EOF:
            return False
        if error.fatal():
            raise KafkaException(error)
        log.warning("consumer: %s", error)
        return False

    def _rewind(self, messages: Sequence[Message]) -> None:
        """Seek every partition of a failed batch back to its first message."""
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is None or partition is None or offset is None:
                continue
            first.setdefault((topic, partition), offset)
        for (topic, partition), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its new owner starts from the DB
                log.warning("seek %s[%d] failed: %s", topic, partition, exc)

    def _store_offsets(
        self, session: Session, offsets: dict[tuple[str, int], int], now: Any
    ) -> None:
        for (topic, partition), offset in offsets.items():
            row = session.get(ConsumerOffset, (self.group, topic, partition))
            if row is None:
                session.add(
                    ConsumerOffset(
                        group_id=self.group,
                        topic=topic,
                        kafka_partition=partition,
                        next_offset=offset,
                        updated_at=now,
                    )
                )
            elif offset > row.next_offset:
                row.next_offset = offset
                row.updated_at = now

    def _skip(self, session: Session, message: Message, error: str) -> None:
        raw_key = message.key()
        key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else raw_key
        topic, partition, offset = message.topic() or "", message.partition(), message.offset()
        partition = partition if partition is not None else -1
        offset = offset if offset is not None else -1
        log.warning("skipped %s[%s]@%s: %s", topic, partition, offset, error)
        seen = session.scalar(
            sa.select(SkippedMessage.id).where(
                SkippedMessage.topic == topic,
                SkippedMessage.kafka_partition == partition,
                SkippedMessage.kafka_offset == offset,
            )
        )
        if seen is None:  # a replay of the same message records nothing new
            session.add(
                SkippedMessage(
                    topic=topic,
                    kafka_partition=partition,
                    kafka_offset=offset,
                    key=key,
                    error=error[:2000],
                    at=self.service.clock(),
                )
            )


__all__ = ["TOPIC_KINDS", "BatchResult", "RecruitmentConsumer"]
