"""The follow-up consumer: the facts topic into the follow-up tables, exactly once.

By default one instance per deployment reads every partition of the facts topic (``assign``,
no group rebalances). With ``group`` (``CONCIERGE_FOLLOWUP_GROUP=true``) several instances share
the partitions as a Kafka consumer group: the group only hands partitions out (it never commits
an offset); the assignment callback seeks each partition it is given to the offset the
database holds. Offsets are written compare-and-set (the offset this instance read from must
still be there), so an instance that kept a partition's batch across a rebalance cannot commit it
after the new owner moved on: its transaction rolls back and it reads the database's offsets
again. Each batch is applied in **one database transaction** together with the next offset
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
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
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


class Fenced(RuntimeError):
    """A partition's offset in the database is not the one this instance read from: another
    instance owns it now (or did meanwhile). The batch is rolled back."""


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
        group: str | None = None,
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
            # never commits: offsets live in the database
            "group.id": group or "concierge-followup-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "error_cb": self.health.on_error,
        }
        settings.update(config or {})
        self.group = group
        self.consumer = Consumer(routed(settings))
        self.total = Outcome()
        self.messages = 0

    def _assigned(self) -> list[Key]:
        with self._lock:
            return list(self._partitions)

    def assigned(self) -> list[int]:
        """The facts topic's partitions this instance reads now."""
        return sorted(p for _, p in self._assigned())

    def _stored_offsets(self) -> dict[int, int]:
        with self.sessions() as session:
            return {
                int(p): int(o)
                for p, o in session.execute(
                    sa.select(FollowupOffset.kafka_partition, FollowupOffset.next_offset).where(
                        FollowupOffset.topic == self.topic
                    )
                )
            }

    def start(self, timeout: float = 30.0) -> None:
        """Assign every partition at the offsets the database holds (the start when none); in
        a group, subscribe: partitions come through :meth:`_on_assign`."""
        metadata = self.consumer.list_topics(self.topic, timeout=timeout)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"the facts topic {self.topic} is not there: create the topics")
        self.health.start()
        if self.group is not None:
            self.beat(started=True)
            self.consumer.subscribe(
                [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )  # fmt: skip
            log.info("follow-up consumer %s joined group %s", self.name, self.group)
            return
        self._take([TopicPartition(self.topic, p) for p in sorted(topic.partitions)])
        self.beat(started=True)  # with a row for every partition it reads

    def _take(self, given: list[TopicPartition]) -> None:
        """Read ``given`` from the offsets the database holds (the start when none)."""
        stored = self._stored_offsets()
        mine = {tp.partition for tp in given}
        assignment = [TopicPartition(self.topic, p, stored.get(p, OFFSET_BEGINNING))
                      for p in sorted(mine)]  # fmt: skip
        self.consumer.assign(assignment)
        with self._lock:
            self._partitions = [(self.topic, p) for p in sorted(mine)]
            self._positions = {(self.topic, p): stored.get(p, 0) for p in sorted(mine)}
            self._stored = {p: o for p, o in stored.items() if p in mine}
        self.health.forget()
        log.info("follow-up consumer %s assigned partitions %s (%d resumed)", self.name,
                 sorted(mine), len(self._stored))  # fmt: skip

    def _on_assign(self, consumer: Consumer, given: list[TopicPartition]) -> None:
        """The group's assignment callback: seek to the database's offsets."""
        self._take(given)

    def _on_revoke(self, consumer: Consumer, taken: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in taken}
        consumer.unassign()
        with self._lock:
            self._partitions = [k for k in self._partitions if k[1] not in gone]
            self._positions = {k: o for k, o in self._positions.items() if k[1] not in gone}
            self._stored = {p: o for p, o in self._stored.items() if p not in gone}
        self.health.forget()
        log.info("follow-up consumer %s gave up partitions %s", self.name, sorted(gone))

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
        mine = {p for _, p in self._assigned()}
        # a partition given up by a rebalance inside this poll is its new owner's to read
        readable = [m for m in messages if m.error() is None and m.partition() in mine]
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
        if started:  # instances of a group beat under names of their own: forget the long gone
            session.execute(
                sa.delete(ConsumerBeat).where(ConsumerBeat.beat_at < now - timedelta(days=1))
            )
        row = session.get(ConsumerBeat, self.name)
        if row is None:
            session.add(ConsumerBeat(name=self.name, started_at=now, beat_at=now))
        else:
            row.beat_at = now
            if started:
                row.started_at = now

    def _write_offsets(self, session: Session, offsets: dict[int, int], now: datetime) -> None:
        """Compare-and-set: each partition's offset moves only from the one this instance read
        from (:class:`Fenced` otherwise; a row that appeared meanwhile fails its insert)."""
        with self._lock:
            expected = {p: self._stored.get(p) for p in offsets}
        for partition, next_offset in offsets.items():
            if expected[partition] is None:
                session.add(FollowupOffset(topic=self.topic, kafka_partition=partition,
                                           next_offset=next_offset, committed_at=now))  # fmt: skip
                session.flush()
                continue
            moved = session.execute(
                sa.update(FollowupOffset)
                .where(
                    FollowupOffset.topic == self.topic,
                    FollowupOffset.kafka_partition == partition,
                    FollowupOffset.next_offset == expected[partition],
                )
                .values(next_offset=next_offset, committed_at=now)
            )
            if cast("sa.CursorResult[Any]", moved).rowcount != 1:
                raise Fenced(f"{self.topic}[{partition}] moved on from {expected[partition]}")

    def _committed(self, offsets: dict[int, int]) -> None:
        with self._lock:
            for partition, next_offset in offsets.items():
                key = (self.topic, partition)
                self._positions[key] = max(self._positions.get(key, 0), next_offset)
                self._stored[partition] = next_offset

    def process(self, messages: Sequence[Message]) -> Outcome:
        out = Outcome()
        offsets: dict[int, int] = {}
        # Parsed before the transaction: it holds the database's write lock (BEGIN IMMEDIATE on
        # SQLite, shared with recruitment), and validating a catch-up batch took seconds of it.
        parsed: list[tuple[int, int, list[ResourceFacts] | str]] = []
        for message in messages:
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            offsets[partition] = offset + 1
            try:
                parsed.append((partition, offset, [
                    ResourceFacts.model_validate(item)
                    for item in envelopes_of(message.value() or b"")
                ]))  # fmt: skip
            except (ValueError, ValidationError) as exc:
                parsed.append((partition, offset, f"{type(exc).__name__}: {str(exc)[:500]}"))
        with self.sessions.begin() as session:
            for partition, offset, envelopes in parsed:
                if isinstance(envelopes, str):
                    session.add(SkippedMessage(topic=self.topic, kafka_partition=partition,
                                               kafka_offset=offset, key=None, error=envelopes,
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
        """Back to the database's offsets (another instance may have moved them)."""
        try:
            stored = self._stored_offsets()
        except Exception:
            stored = {}
        with self._lock:
            for key in list(self._positions):
                if key[1] in stored:
                    self._positions[key] = stored[key[1]]
                    self._stored[key[1]] = stored[key[1]]
            positions = dict(self._positions)
        for (topic, partition), offset in positions.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException:
                log.warning("could not seek %s[%d] back; re-assigning", topic, partition)
                self._take([TopicPartition(t, p) for t, p in self._assigned()])
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
