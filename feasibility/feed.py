"""Keeping the columnar snapshot current from the facts topic.

A :class:`FactsFeed` reads every partition of the facts topic from the beginning (no consumer
group: each API process holds a full snapshot) and applies each envelope to a
:class:`~feasibility.snapshot.ColumnarSnapshot` in a background thread. Queries take the
snapshot's frames under the same lock, so an ad hoc answer reflects every envelope consumed
before it started; the feed reports its lag so answers can say how current they are.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from fhir_adapters.facts import envelopes_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedStatus:
    running: bool
    caught_up: bool
    envelopes: int
    messages: int
    lag: int
    offsets: dict[int, int]
    started_at: str
    last_message_at: str | None
    error: str | None


class FactsFeed:
    """Consume ``topic`` into ``snapshot`` (anything with ``apply(envelope, partition, offset)``)
    under ``lock``."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        snapshot: Any,
        lock: threading.Lock,
        poll_batch: int = 2000,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.snapshot = snapshot
        self.lock = lock
        self.poll_batch = poll_batch
        self.offsets: dict[int, int] = {}
        self.highwater: dict[int, int] = {}
        self.envelopes = 0
        self.messages = 0
        self.error: str | None = None
        self.started_at = datetime.now(UTC).isoformat()
        self.last_message_at: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._caught_up = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FactsFeed:
        self._thread = threading.Thread(target=self._run, name="facts-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_caught_up(self, timeout: float) -> bool:
        return self._caught_up.wait(timeout)

    def wait_for(self, envelopes: int, timeout: float) -> bool:
        """Wait until at least ``envelopes`` envelopes have been applied."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.envelopes >= envelopes:
                return True
            time.sleep(0.02)
        return self.envelopes >= envelopes

    # ------------------------------------------------------------------ loop

    def _consumer(self) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "concierge-snapshot-unused",  # required by the client; never joined
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.max.bytes": 52_428_800,
                "queued.max.messages.kbytes": 262_144,
            }
        )
        metadata = consumer.list_topics(self.topic, timeout=30)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise KafkaException(f"topic {self.topic} is not available: {topic and topic.error}")
        partitions = sorted(topic.partitions)
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        return consumer

    def _refresh_highwater(self, consumer: Consumer) -> None:
        for partition in list(self.highwater) or self._partitions(consumer):
            _, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=10, cached=False
            )
            self.highwater[partition] = high

    def _partitions(self, consumer: Consumer) -> list[int]:
        return [tp.partition for tp in consumer.assignment()]

    def lag(self) -> int:
        return sum(max(0, high - self.offsets.get(p, 0)) for p, high in self.highwater.items())

    def _run(self) -> None:
        try:
            consumer = self._consumer()
        except Exception as exc:  # surfaced through status(); the API keeps serving
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("facts feed could not start: %s", self.error)
            return
        try:
            self._refresh_highwater(consumer)
            next_refresh = time.monotonic() + 1.0
            while not self._stop.is_set():
                messages = consumer.consume(self.poll_batch, timeout=0.2)
                if messages:
                    self._apply(messages)
                if time.monotonic() >= next_refresh or not messages:
                    self._refresh_highwater(consumer)
                    next_refresh = time.monotonic() + 1.0
                    if self.lag() == 0:
                        self._caught_up.set()
        except Exception as exc:  # pragma: no cover - reported, not swallowed silently
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("facts feed stopped")
        finally:
            consumer.close()

    def _apply(self, messages: list[Any]) -> None:
        with self.lock:
            for message in messages:
                if message.error() is not None:
                    log.warning("facts feed: %s", message.error())
                    continue
                partition, offset = message.partition(), message.offset()
                for envelope in envelopes_of(message.value()):
                    self.snapshot.apply(envelope, partition=partition, offset=offset)
                    self.envelopes += 1
                self.offsets[partition] = offset + 1
                self.messages += 1
        self.last_message_at = datetime.now(UTC).isoformat()

    def status(self) -> FeedStatus:
        return FeedStatus(
            running=self._thread is not None and self._thread.is_alive(),
            caught_up=self._caught_up.is_set(),
            envelopes=self.envelopes,
            messages=self.messages,
            lag=self.lag(),
            offsets=dict(self.offsets),
            started_at=self.started_at,
            last_message_at=self.last_message_at,
            error=self.error,
        )
