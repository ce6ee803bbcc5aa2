"""The follow-up consumer: the facts topic into the follow-up tables, exactly once.

One instance per deployment reads every partition of the facts topic (``assign``, no group
rebalances). Each batch is applied in **one database transaction** together with the next offset
of every partition it read (``followup_offsets``); on start it seeks to those offsets. So a
SIGKILL at any moment either lost the whole batch (read again: nothing was written) or committed
it with its offsets (never read again): the feed, the safety events and the outbox rows exist
exactly once. Every offset row says when it was committed, and the loop writes a heartbeat
(``followup_consumer_beats``) about every ``beat_seconds``, idle or not, with the positions it
reached past transaction markers, so the API can tell how far behind the consumer is, and
whether it runs at all, from the database alone (:mod:`followup.progress`). A message that
cannot be read is recorded in recruitment's ``skipped_messages`` with the reason, never dropped
silently. Readiness is the one rule of every reader (:class:`infra.mirror.ReaderHealth`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from core.contracts.facts import ResourceFacts, envelopes_of
from infra.kafka_log import routed
from infra.mirror import Key, ReaderHealth, ReaderStatus
from infra.topics import FACTS
from recruitment.models import SkippedMessage, utcnow

from .engine import FollowupEngine, Outcome
from .tables import ConsumerBeat, FollowupOffset

log = logging.getLogger(__name__)


class FollowupConsumer:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        engine: FollowupEngine,
        bootstrap: str,
        prefix: str = "",
        *,
        batch_size: int = 500,
        poll_timeout: float = 0.5,
        config: dict[str, Any] | None = None,
        name: str = "concierge-followup",
        beat_seconds: float = 1.0,
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.beat_seconds = beat_seconds
        self._beaten = float("-inf")
        self._expired = float("-inf")
        self._stored: dict[int, int] = {}  # next offsets the database holds, per partition
        self.engine = engine
        self.topic = prefix + FACTS
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self._lock = threading.Lock()
        self._positions: dict[Key, int] = {}
        self._partitions: list[Key] = []
        self.health = ReaderHealth("followup-consumer", bootstrap, self._assigned, config=config)
        settings: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": "concierge-followup-reader",  # never commits: offsets live in the database
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "error_cb": self.health.on_error,
        }
        settings.update(config or {})
        self.consumer = Consumer(routed(settings))
        self.total = Outcome()
        self.messages = 0

    def _assigned(self) -> list[Key]:
        with self._lock:
            return list(self._partitions)

    def start(self, timeout: float = 30.0) -> None:
        """Assign every partition at the offsets the database holds (the start when none)."""
        metadata = self.consumer.list_topics(self.topic, timeout=timeout)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"the facts topic {self.topic} is not there: create the topics")
        with self.sessions() as session:
            stored = {
                int(p): int(o)
                for p, o in session.execute(
                    sa.select(FollowupOffset.kafka_partition, FollowupOffset.next_offset).where(
                        FollowupOffset.topic == self.topic
                    )
                )
            }
        partitions = sorted(topic.partitions)
        assignment = [TopicPartition(self.topic, p, stored.get(p, -2)) for p in partitions]
        self.consumer.assign(assignment)
        with self._lock:
            self._partitions = [(self.topic, p) for p in partitions]
            self._positions = {(self.topic, p): stored.get(p, 0) for p in partitions}
            self._stored = dict(stored)
        self.beat(started=True)
        self.health.start()
        log.info("follow-up consumer assigned %d partitions (%d resumed)", len(partitions),
                 len(stored))  # fmt: skip

    def readiness(self) -> ReaderStatus:
        with self._lock:
            positions = dict(self._positions)
        return self.health.status(positions, None if positions else "not started")

    def poll(self) -> int:
        """Read and apply one batch; how many messages it held."""
        try:
            # wait for the first message only; then take what is already fetched, without
            # waiting for a full batch (a trickle must not wait out the poll timeout)
            first = self.consumer.poll(self.poll_timeout)
            messages = [] if first is None else [first]
            if first is not None and self.batch_size > 1:
                messages += self.consumer.consume(self.batch_size - 1, 0)
        except KafkaException as exc:
            self.health.record(f"KafkaException: {exc}")
            time.sleep(0.5)
            return 0
        readable = [m for m in messages if m.error() is None]
        for m in messages:
            if m.error() is not None:
                self.health.record(str(m.error()))
        if not readable:
            self._advance()
            return 0
        try:
            self.process(readable)
        except Exception:
            # nothing of the batch was committed: read it again from the database's offsets
            log.exception("follow-up batch of %d failed; reading it again", len(readable))
            self._rewind()
            time.sleep(1.0)
            return 0
        return len(readable)

    def beat(self, *, started: bool = False) -> None:
        """The heartbeat, in a transaction of its own, with the positions the consumer reached
        past transaction markers (every message before them is applied: ``_advance``)."""
        now = utcnow()
        with self._lock:
            ahead = {p: o for (_, p), o in self._positions.items() if o > self._stored.get(p, -1)}
        with self.sessions.begin() as session:
            self._write_beat(session, now, started)
            self._write_offsets(session, ahead, now)
        self._committed(ahead)
        self._beaten = time.monotonic()

    def expire(self) -> Outcome:
        """Withdraw participants whose consent period has ended (``FollowupEngine.expire``), in
        a transaction of its own."""
        out = Outcome()
        with self.sessions.begin() as session:
            self.engine.expire(session, out)
        self._expired = time.monotonic()
        self.total.withdrawn += out.withdrawn
        return out

    def _write_beat(self, session: Session, now: datetime, started: bool = False) -> None:
        row = session.get(ConsumerBeat, self.name)
        if row is None:
            session.add(ConsumerBeat(name=self.name, started_at=now, beat_at=now))
        else:
            row.beat_at = now
            if started:
                row.started_at = now

    def _write_offsets(self, session: Session, offsets: dict[int, int], now: datetime) -> None:
        for partition, next_offset in offsets.items():
            row = session.get(FollowupOffset, (self.topic, partition))
            if row is None:
                session.add(FollowupOffset(topic=self.topic, kafka_partition=partition,
                                           next_offset=next_offset, committed_at=now))  # fmt: skip
            else:
                row.next_offset, row.committed_at = next_offset, now

    def _committed(self, offsets: dict[int, int]) -> None:
        with self._lock:
            for partition, next_offset in offsets.items():
                key = (self.topic, partition)
                self._positions[key] = max(self._positions.get(key, 0), next_offset)
                self._stored[partition] = next_offset

    def process(self, messages: Sequence[Message]) -> Outcome:
        out = Outcome()
        offsets: dict[int, int] = {}
        with self.sessions.begin() as session:
            for message in messages:
                partition, offset = message.partition(), message.offset()
                assert partition is not None and offset is not None
                offsets[partition] = offset + 1
                try:
                    envelopes = [
                        ResourceFacts.model_validate(item)
                        for item in envelopes_of(message.value() or b"")
                    ]
                except (ValueError, ValidationError) as exc:
                    session.add(SkippedMessage(topic=self.topic, kafka_partition=partition,
                                               kafka_offset=offset, key=None,
                                               error=f"{type(exc).__name__}: {str(exc)[:500]}",
                                               at=utcnow()))  # fmt: skip
                    continue
                self.engine.apply(session, envelopes, out)
            now = utcnow()
            self._write_offsets(session, offsets, now)
            self._write_beat(session, now)
        self._committed(offsets)
        self._beaten = time.monotonic()
        self.messages += len(messages)
        self.total.feed += out.feed
        self.total.safety += out.safety
        self.total.started += out.started
        self.total.withdrawn += out.withdrawn
        return out

    def _advance(self) -> None:
        """Positions past transaction markers (nothing delivered is left unapplied)."""
        with self._lock:
            keys = list(self._partitions)
        if not keys:
            return
        try:
            found = self.consumer.position([TopicPartition(t, p) for t, p in keys])
        except KafkaException:
            return
        with self._lock:
            for tp in found:
                key = (tp.topic, tp.partition)
                if tp.offset >= 0:
                    self._positions[key] = max(self._positions.get(key, 0), tp.offset)

    def _rewind(self) -> None:
        with self._lock:
            positions = dict(self._positions)
        for (topic, partition), offset in positions.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException:
                log.warning("could not seek %s[%d] back; re-assigning", topic, partition)
                self.consumer.unassign()
                self.start()
                return

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll()
            if time.monotonic() - self._beaten >= self.beat_seconds:
                try:
                    self.beat()
                except Exception:  # the database is away: no beat says so to every reader
                    log.exception("follow-up heartbeat failed")
            if time.monotonic() - self._expired >= self.beat_seconds:
                try:
                    self.expire()
                except Exception:  # tried again on the next round; nothing half-done
                    log.exception("follow-up consent period timer failed")
                    self._expired = time.monotonic()

    def close(self) -> None:
        self.health.stop()
        self.consumer.close()
