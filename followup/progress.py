"""How current the follow-up tables are, told to every reader of them (the API's routes).

The feed, the safety events, the endpoint counts and the exports are read from the database,
written there by ``concierge followup`` (:mod:`followup.consumer`), which may be behind or not
running. An answer read from them says so rather than look current:

* the consumer's true position is the next offset per partition it **committed in the
  database** (``followup_offsets``, with the effects of what it read), compared with the facts
  topic's high watermarks (per partition, read-committed) that this process measures itself
  through :class:`infra.mirror.ReaderHealth`: the one readiness rule of every reader. The
  answer is *complete* when those offsets have reached high watermarks measured at most
  ``max_lag_seconds`` ago; otherwise it is ``partial``, with the messages ``lag`` behind (per
  partition too) and ``as_of``, the time of the newest measurement the offsets have reached
  (every fact written to the facts topic before it is in the answer);
* the consumer is *down* when its newest heartbeat (``followup_consumer_beats``, written about
  every second whether or not facts arrive) is older than ``down_after_seconds``, or it never
  ran: then, and while this process cannot measure the watermarks (broker unreachable), nothing
  can say how stale the tables are, and the routes answer 503 with ``Retry-After``.

Heartbeats are compared with this process's clock: the consumer and the API must keep time
within a fraction of ``down_after_seconds`` (NTP).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from confluent_kafka.admin import AdminClient
from sqlalchemy.orm import Session, sessionmaker

from infra.mirror import Key, ReaderHealth, ReaderStatus
from infra.topics import FACTS

from .tables import ConsumerBeat, FollowupOffset

#: Client settings passed on to the metadata client (how to reach the cluster).
_SHARED = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "reconnect.")

#: Seconds a client is told to wait when the consumer is down or the lag cannot be measured.
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class Standing:
    """How current the follow-up tables are now, as a route reports it."""

    #: False: the consumer is down, never ran, or the lag cannot be measured (503)
    available: bool
    #: behind by more than the bound (answered, flagged)
    partial: bool
    #: messages behind the latest measured high watermarks (None: not measured)
    lag: int | None
    #: the newest watermark measurement the committed offsets reached (None: none)
    as_of: datetime | None
    #: why not available or partial, in words
    waiting_for: str | None = None
    committed_at: datetime | None = None
    beat_at: datetime | None = None
    offsets: dict[int, int] = field(default_factory=dict)
    high_watermarks: dict[int, int] = field(default_factory=dict)
    lags: dict[int, int] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """What a JSON answer carries: ``partial``, ``lag``, ``as_of`` and the consumer's
        position per partition."""

        def text(at: datetime | None) -> str | None:
            return None if at is None else at.isoformat()

        return {
            "partial": self.partial,
            "lag": self.lag,
            "as_of": text(self.as_of),
            "consumer": {
                "waiting_for": self.waiting_for,
                "committed_at": text(self.committed_at),
                "beat_at": text(self.beat_at),
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "high_watermarks": {str(p): h for p, h in sorted(self.high_watermarks.items())},
                "lags": {str(p): n for p, n in sorted(self.lags.items())},
            },
        }

    def headers(self) -> dict[str, str]:
        """The same for an answer that is not JSON (an NDJSON file)."""
        out = {"X-Followup-Partial": "true" if self.partial else "false"}
        if self.lag is not None:
            out["X-Followup-Lag"] = str(self.lag)
        if self.as_of is not None:
            out["X-Followup-As-Of"] = self.as_of.isoformat()
        return out


class Progress(Protocol):
    def standing(self) -> Standing: ...


@dataclass(frozen=True)
class Recorded:
    """What the database says of the consumer."""

    offsets: dict[int, int]
    committed_at: datetime | None
    beat_at: datetime | None


def judge(
    recorded: Recorded,
    reader: ReaderStatus,
    now: datetime,
    down_after_seconds: float,
) -> Standing:
    """The standing, pure: the database's record of the consumer, the readiness rule applied to
    its committed offsets (``reader``), and the time now."""
    topic = next(iter(reader.topics), None)
    lags = dict(reader.lags.get(topic, {})) if topic is not None else {}
    effective = reader.topics.get(topic, {}) if topic is not None else {}
    highs = {p: effective.get(p, 0) + n for p, n in lags.items()}
    as_of = (
        None
        if reader.staleness_seconds is None
        else now - timedelta(seconds=reader.staleness_seconds)
    )
    common = {
        "lag": reader.lag,
        "as_of": as_of,
        "committed_at": recorded.committed_at,
        "beat_at": recorded.beat_at,
        "offsets": dict(recorded.offsets),
        "high_watermarks": highs,
        "lags": lags,
    }
    reason: str | None = None
    if recorded.beat_at is None:
        reason = "the follow-up consumer (concierge followup) has never run"
    elif (now - recorded.beat_at).total_seconds() > down_after_seconds:
        reason = (
            f"the follow-up consumer is down: last heartbeat {recorded.beat_at.isoformat()}, "
            f"over {down_after_seconds:g} s ago"
        )
    elif not reader.connected or reader.lag is None:
        reason = f"the facts topic's high watermarks: {reader.waiting_for or 'not measured'}"
    if reason is not None:
        return Standing(available=False, partial=True, waiting_for=reason, **common)  # type: ignore[arg-type]
    partial = not reader.caught_up
    waiting = None
    if partial:
        waiting = f"the follow-up consumer is behind: {reader.waiting_for or 'catching up'}"
    return Standing(available=True, partial=partial, waiting_for=waiting, **common)  # type: ignore[arg-type]


def recorded(session: Session, topic: str) -> Recorded:
    rows = session.execute(
        sa.select(
            FollowupOffset.kafka_partition, FollowupOffset.next_offset, FollowupOffset.committed_at
        ).where(FollowupOffset.topic == topic)
    ).all()
    committed = [at for _, _, at in rows if at is not None]
    beat = session.scalar(sa.select(sa.func.max(ConsumerBeat.beat_at)))
    if beat is not None and beat.tzinfo is None:  # SQLite's max() bypasses the column type
        beat = beat.replace(tzinfo=UTC)
    return Recorded(
        offsets={int(p): int(o) for p, o, _ in rows},
        committed_at=max(committed) if committed else None,
        beat_at=beat,
    )


class ConsumerProgress:
    """The standing of the follow-up consumer, for an API process: the offsets it committed
    (read from the database at each question) against the facts topic's high watermarks (a
    daemon thread of :class:`~infra.mirror.ReaderHealth` measures them every half second)."""

    #: How often the facts topic's partitions are looked up again (it may grow).
    METADATA_SECONDS = 30.0

    def __init__(
        self,
        sessions: sessionmaker[Session],
        bootstrap: str,
        prefix: str = "",
        *,
        max_lag_seconds: float = 5.0,
        down_after_seconds: float = 15.0,
        config: Mapping[str, Any] | None = None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.sessions = sessions
        self.topic = prefix + FACTS
        self.down_after_seconds = down_after_seconds
        self.wall = wall
        self._bootstrap = bootstrap
        self._config = dict(config or {})
        self._lock = threading.Lock()
        self._partitions: list[Key] = []
        self._looked_up = float("-inf")
        self._admin: AdminClient | None = None
        self.health = ReaderHealth(
            "followup-consumer",
            bootstrap,
            self._wanted,
            config=config,
            max_staleness=max_lag_seconds,
            stale_after=max(5.0, max_lag_seconds),
        )

    def _wanted(self) -> list[Key]:
        """The facts topic's partitions (called on the measuring thread only)."""
        if time.monotonic() - self._looked_up >= self.METADATA_SECONDS or not self._partitions:
            if self._admin is None:
                # as ReaderHealth's own admin client: no logger setting (see infra.mirror)
                shared = {k: v for k, v in self._config.items() if k.startswith(_SHARED)}
                self._admin = AdminClient({"bootstrap.servers": self._bootstrap, **shared})
            try:
                metadata = self._admin.list_topics(self.topic, timeout=5)
                found = metadata.topics.get(self.topic)
                if found is not None and found.error is None and found.partitions:
                    with self._lock:
                        self._partitions = [(self.topic, p) for p in sorted(found.partitions)]
                    self._looked_up = time.monotonic()
            except Exception as exc:  # the health thread records and retries
                self.health.record(f"metadata of {self.topic}: {type(exc).__name__}: {exc}")
        with self._lock:
            return list(self._partitions)

    def start(self) -> ConsumerProgress:
        self.health.start()
        return self

    def stop(self) -> None:
        self.health.stop()

    def standing(self) -> Standing:
        with self.sessions() as session:
            found = recorded(session, self.topic)
        positions = {(self.topic, p): o for p, o in found.offsets.items()}
        return judge(found, self.health.status(positions), self.wall(), self.down_after_seconds)
