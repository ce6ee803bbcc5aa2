"""Keeping the columnar snapshot current from the facts topic.

A :class:`FactsFeed` folds every message of the facts topic (all partitions, from the beginning,
no consumer group: each API process holds a full snapshot) into a
:class:`~feasibility.snapshot.ColumnarSnapshot`; the reading is a
:class:`~infra.mirror.TopicMirror`'s, which survives broker restarts and says how current the
snapshot is. Queries take the snapshot's frames under the same lock, so an ad hoc answer reflects
every envelope consumed before it started.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from confluent_kafka import Message

from core.contracts.facts import envelopes_of
from infra.mirror import ReaderStatus, TopicMirror

if TYPE_CHECKING:
    from .snapshot import ColumnarSnapshot


@dataclass(frozen=True)
class FeedStatus:
    running: bool
    #: connected and fresh (the mirror's ``ready``): false while the broker is lost or behind
    caught_up: bool
    envelopes: int
    messages: int
    #: messages behind the latest measured high watermarks (None: never measured)
    lag: int | None
    offsets: dict[int, int]
    started_at: str
    last_message_at: str | None
    error: str | None
    connected: bool = False
    staleness_seconds: float | None = None
    waiting_for: str | None = None


class FactsFeed:
    """Consume ``topic`` into ``snapshot`` (anything with ``apply(envelope, partition, offset)``)
    under ``lock``."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        snapshot: ColumnarSnapshot,
        lock: threading.Lock,
        poll_batch: int = 2000,
        *,
        stale_after: float = 5.0,
        max_staleness: float = 5.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.snapshot = snapshot
        self.lock = lock
        self.envelopes = 0
        self.messages = 0
        self.started_at = datetime.now(UTC).isoformat()
        self.last_message_at: str | None = None
        self.mirror = TopicMirror(
            "facts-feed",
            bootstrap,
            topic,
            self._apply,
            config={"fetch.max.bytes": 52_428_800, "queued.max.messages.kbytes": 262_144},
            poll_batch=poll_batch,
            stale_after=stale_after,
            max_staleness=max_staleness,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FactsFeed:
        self.mirror.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.mirror.stop(timeout)

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until the snapshot is connected and fresh (see :class:`~infra.mirror.Freshness`)."""
        return self.mirror.wait_ready(timeout)

    def wait_for(self, envelopes: int, timeout: float) -> bool:
        """Wait until at least ``envelopes`` envelopes have been applied."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.envelopes >= envelopes:
                return True
            time.sleep(0.02)
        return self.envelopes >= envelopes

    def readiness(self) -> ReaderStatus:
        return self.mirror.status()

    def wait_positions(self, positions: dict[int, int], timeout: float) -> bool:
        """Wait until the snapshot has applied every message before these offsets."""
        return self.mirror.wait_positions(positions, timeout)

    def lag(self) -> int | None:
        return self.readiness().lag

    # ------------------------------------------------------------------ the fold

    def _apply(self, messages: list[Message]) -> None:
        with self.lock:
            for message in messages:
                partition, offset = message.partition(), message.offset()
                for envelope in envelopes_of(message.value() or b"null"):
                    self.snapshot.apply(envelope, partition=partition, offset=offset)
                    self.envelopes += 1
                self.messages += 1
        self.last_message_at = datetime.now(UTC).isoformat()

    def status(self) -> FeedStatus:
        reader = self.readiness()
        return FeedStatus(
            running=self.mirror.running,
            caught_up=reader.ready,
            envelopes=self.envelopes,
            messages=self.messages,
            lag=reader.lag,
            offsets=dict(reader.positions),
            started_at=self.started_at,
            last_message_at=self.last_message_at,
            error=reader.error,
            connected=reader.connected,
            staleness_seconds=reader.staleness_seconds,
            waiting_for=reader.waiting_for,
        )
