"""Reading a topic from the beginning, through broker restarts, and telling the truth about lag.

A :class:`TopicMirror` is the one place that reads a whole topic (every partition, from the
beginning, no consumer group commits) on a daemon thread and hands each batch to a fold (the
facts snapshot, the cohort view, the trial registry, the signal monitor). It survives a broker
restart or a leader change: an exception in its loop is recorded, backed off (0.5 s to 5 s) and
carried on from; a consumer that cannot go on (a fatal error, closed, or stalled while behind) is
closed and replaced by one assigned at the saved positions, so nothing is read twice or skipped.

Whether a reader is *ready* is decided by one pure rule, :class:`Freshness`:

* every ``refresh_seconds`` a separate admin client measures the high watermarks ``H(t)`` of the
  reader's partitions (the last stable offsets, as a read-committed consumer sees them), with the
  time ``t`` the request was sent;
* the reader is *caught up* when its positions have reached some ``H(t)`` with
  ``now - t <= max_staleness`` (under continuous load lag is never exactly 0, but a reader that is
  at most a refresh behind has everything written until ``t``);
* it is *connected* when a broker round trip (metadata, watermarks) succeeded within
  ``stale_after`` seconds and no "all brokers down" came after it; a reader that loses the broker
  is not ready within ``stale_after`` seconds, even if no data flows.

:class:`ReaderHealth` applies the rule to any reader (it is also what the recruitment group
consumer reports with), and :class:`ReaderStatus` is what ``/readyz`` shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from infra.kafka_log import routed

log = logging.getLogger(__name__)

#: A partition of a topic: ``(topic, partition)``.
Key = tuple[str, int]

#: Client settings a reader passes on to its admin client too (how to reach the cluster).
_SHARED_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "reconnect.")

#: Reconnect quickly once the broker is back (librdkafka waits up to 10 s by default).
_RECONNECT = {"reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 1000}


@dataclass(frozen=True)
class ReaderStatus:
    name: str
    #: connected AND caught up: what /readyz reports
    ready: bool
    #: a broker round trip (metadata/watermarks) succeeded within ``stale_after`` seconds
    connected: bool
    #: consumed up to high watermarks measured at most ``max_staleness`` seconds ago
    caught_up: bool
    #: messages behind the latest measured high watermarks; None when never measured
    lag: int | None
    #: now minus the time of the newest watermark measurement consumed up to; None if never
    staleness_seconds: float | None
    #: next offset per partition (of the reader's one topic; empty for a reader of several)
    positions: dict[int, int]
    #: why not ready, in words
    waiting_for: str | None
    #: the last error seen (kept after recovery: ``ready`` is the truth)
    error: str | None
    #: next offset per partition of each topic read
    topics: dict[str, dict[int, int]] = field(default_factory=dict)
    #: messages behind the latest measured high watermark, per partition of each topic (the
    #: parts of ``lag``; empty when never measured): what ``/metrics`` shows per partition
    lags: dict[str, dict[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["positions"] = {str(p): o for p, o in sorted(self.positions.items())}
        body["topics"] = {
            t: {str(p): o for p, o in sorted(parts.items())} for t, parts in self.topics.items()
        }
        body["lags"] = {
            t: {str(p): n for p, n in sorted(parts.items())} for t, parts in self.lags.items()
        }
        if self.staleness_seconds is not None:
            body["staleness_seconds"] = round(self.staleness_seconds, 3)
        return body


@dataclass(frozen=True)
class Mark:
    """High (and low) watermarks measured by a request sent at ``at`` (monotonic seconds)."""

    at: float
    highs: Mapping[Key, int]
    lows: Mapping[Key, int]

    def behind(self, positions: Mapping[Key, int]) -> int:
        """Messages between ``positions`` and these high watermarks."""
        return sum(self.behind_by_partition(positions).values())

    def behind_by_partition(self, positions: Mapping[Key, int]) -> dict[Key, int]:
        """:meth:`behind`, per partition measured."""
        return {k: max(0, high - self.position(k, positions)) for k, high in self.highs.items()}

    def position(self, key: Key, positions: Mapping[Key, int]) -> int:
        # nothing below the low watermark exists: a reader that has read nothing there yet
        # starts at it (an emptied partition, low == high, is reached without a message)
        return max(positions.get(key, 0), self.lows.get(key, 0))


@dataclass(frozen=True)
class Verdict:
    connected: bool
    caught_up: bool
    lag: int | None
    staleness: float | None
    positions: dict[Key, int]
    #: monotonic time since which the broker is unreachable (None: connected, or never was)
    down_since: float | None
    #: monotonic time of the latest measurement (None: never measured)
    measured_at: float | None
    #: ``lag`` per partition (empty when never measured)
    lags: dict[Key, int] = field(default_factory=dict)


class Freshness:
    """The readiness rule, pure: fed round trips, outages and watermark measurements with their
    (monotonic) times; asked with the reader's positions and the time now."""

    def __init__(self, *, stale_after: float, max_staleness: float, capacity: int = 256) -> None:
        self.stale_after = stale_after
        self.max_staleness = max_staleness
        self.capacity = max(4, capacity)
        self._marks: list[Mark] = []  # oldest first; [0] may be the newest one reached
        self._contact: float | None = None
        self._down: float | None = None
        self._started: float | None = None

    def start(self, at: float) -> None:
        if self._started is None:
            self._started = at

    def contact(self, at: float) -> None:
        """A broker round trip completed at ``at``."""
        self._contact = at if self._contact is None else max(self._contact, at)

    def down(self, at: float) -> None:
        """The client reported every broker down at ``at``."""
        self._down = at if self._down is None else max(self._down, at)

    def forget(self) -> None:
        """The reader's partitions changed: the old measurements say nothing about them."""
        self._marks.clear()

    def measured(
        self, at: float, highs: Mapping[Key, int], lows: Mapping[Key, int] | None = None
    ) -> None:
        mark = Mark(at, dict(highs), dict(lows or {}))
        last = self._marks[-1] if self._marks else None
        if last is not None and at < last.at:
            return  # an answer overtaken by a newer one
        if last is not None and (last.highs, last.lows) == (mark.highs, mark.lows):
            self._marks[-1] = mark  # nothing written since: the same watermarks, newer
            return
        self._marks.append(mark)
        if len(self._marks) > self.capacity:
            # far behind for long: keep every other of the older half (coarser, never wrong:
            # a reader credited with an older mark is only said to be staler than it is)
            half = len(self._marks) // 2
            self._marks = self._marks[:1] + self._marks[1:half:2] + self._marks[half:]

    def connected(self, now: float) -> bool:
        if self._contact is None or now - self._contact > self.stale_after:
            return False
        return self._down is None or self._down < self._contact

    def verdict(self, now: float, positions: Mapping[Key, int]) -> Verdict:
        connected = self.connected(now)
        down_since: float | None = None
        if not connected:
            if self._down is not None and (self._contact is None or self._down >= self._contact):
                down_since = self._down
            else:
                down_since = self._contact
        reached: Mark | None = None
        for index in range(len(self._marks) - 1, -1, -1):
            if self._marks[index].behind(positions) == 0:
                reached = self._marks[index]
                del self._marks[:index]  # older marks are superseded by this one
                break
        latest = self._marks[-1] if self._marks else None
        staleness = None if reached is None else max(0.0, now - reached.at)
        effective = dict(positions)
        if latest is not None:
            effective.update({k: latest.position(k, positions) for k in latest.highs})
        return Verdict(
            connected=connected,
            caught_up=staleness is not None and staleness <= self.max_staleness,
            lag=None if latest is None else latest.behind(positions),
            staleness=staleness,
            positions=effective,
            down_since=down_since,
            measured_at=None if latest is None else latest.at,
            lags={} if latest is None else latest.behind_by_partition(positions),
        )


def _clock_text(monotonic_at: float, now: float) -> str:
    return datetime.fromtimestamp(time.time() - (now - monotonic_at)).strftime("%H:%M:%S")


def waiting_text(verdict: Verdict, now: float, max_staleness: float) -> str | None:
    """Why a reader is not ready, in words (None when it is)."""
    if not verdict.connected:
        if verdict.down_since is None:
            return "connecting to the broker (no answer yet)"
        return f"broker unreachable since {_clock_text(verdict.down_since, now)}"
    if verdict.lag is None:
        return "waiting for the first high-watermark measurement"
    if verdict.caught_up:
        return None
    if verdict.lag > 0:
        return f"catching up: {verdict.lag} messages behind"
    age = now - (verdict.measured_at or now)
    return f"no high watermarks measured in the last {max_staleness:g} s (last {age:.1f} s ago)"


def _shared(config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (config or {}).items() if k.startswith(_SHARED_PREFIXES)}


class ReaderHealth:
    """A reader's :class:`Freshness`, kept fed: a daemon thread measures the high watermarks of
    ``partitions()`` every ``refresh_seconds`` with an admin client of its own (so a measurement
    never queues behind the reader's fetches), and the reader reports round trips, errors and
    librdkafka's ``error_cb`` here."""

    def __init__(
        self,
        name: str,
        bootstrap: str,
        partitions: Callable[[], Collection[Key]],
        *,
        config: Mapping[str, Any] | None = None,
        refresh_seconds: float = 0.5,
        stale_after: float = 5.0,
        max_staleness: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.config = dict(config or {})
        self.refresh_seconds = refresh_seconds
        self.stale_after = stale_after
        self.max_staleness = max_staleness
        self.clock = clock
        self.freshness = Freshness(stale_after=stale_after, max_staleness=max_staleness)
        self.error: str | None = None
        self.errors = 0
        self._logged_at = float("-inf")
        self._generation = 0  # bumped when the partitions change (a measurement spans it)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: futures of the admin client's requests still outstanding
        self._pending: list[Future[Any]] = []
        #: replaced admin clients, with their outstanding futures and since when all are done:
        #: released only from the measuring thread once every future is done and a grace period
        #: has passed. librdkafka completes admin futures on its own background thread; had that
        #: thread dropped the last reference, the client would be destroyed there, and librdkafka
        #: aborts the process ("calling rd_kafka_destroy() from librdkafka owned thread is
        #: prohibited": the chaos suite's recruitment service died so on a broker restart).
        self._retired: list[tuple[AdminClient, list[Future[Any]], float]] = []

    # ------------------------------------------------------------------ fed by the reader

    def contact(self) -> None:
        with self._lock:
            self.freshness.contact(self.clock())

    def forget(self) -> None:
        with self._lock:
            self.freshness.forget()
            self._generation += 1

    def record(self, error: str, *, quiet: bool = False) -> None:
        """Remember ``error`` (no patient data in it: callers pass types, topics and offsets)."""
        now = self.clock()
        with self._lock:
            self.error = error
            self.errors += 1
            # an outage repeats itself many times a second: a line every few seconds is enough
            due = now - self._logged_at >= 5.0
            if due and not quiet:
                self._logged_at = now
        if due and not quiet:
            log.warning("%s: %s (%d errors so far)", self.name, error, self.errors)

    def on_error(self, error: KafkaError) -> None:
        """librdkafka's ``error_cb``: every broker down means disconnected now."""
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            with self._lock:
                self.freshness.down(self.clock())
        self.record(f"KafkaError {error.name()}: {error.str()}")

    # ------------------------------------------------------------------ measuring

    def start(self) -> ReaderHealth:
        with self._lock:
            self.freshness.start(self.clock())
            if self._thread is not None:
                return self
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"{self.name}-watermarks", daemon=True
            )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _admin(self) -> AdminClient:
        settings: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "error_cb": self.on_error,
            **_RECONNECT,
            **_shared(self.config),
        }
        return AdminClient(settings)

    def _run(self) -> None:
        admin, made = self._admin(), self.clock()
        timeout = max(1.0, min(self.stale_after, 10.0))
        while not self._stop.is_set():
            started = self.clock()
            try:
                admin.poll(0)
                wanted = sorted(self.partitions())
                if wanted:
                    self.measure(admin, wanted, timeout)
            except Exception as exc:  # the next round tries again; status says what happened
                self.record(f"watermarks: {type(exc).__name__}: {exc}")
                # after a broker restart the admin client may keep asking with the leader epochs
                # it cached before (FENCED_LEADER_EPOCH for ever): a failing one is replaced, at
                # most every stale_after seconds
                if started - made >= self.stale_after:
                    self._retire(admin)
                    admin, made = self._admin(), self.clock()
            self._release_retired()
            self._stop.wait(max(0.0, self.refresh_seconds - (self.clock() - started)))
        self._retire(admin)  # kept (never destroyed on a librdkafka thread) until the process ends

    #: seconds a replaced admin client is kept after its last future is done
    RETIRED_GRACE_SECONDS = 30.0

    def _retire(self, admin: AdminClient) -> None:
        pending, self._pending = self._pending, []
        self._retired.append((admin, pending, self.clock()))

    def _release_retired(self) -> None:
        """Drop (here, in the measuring thread) the replaced clients whose futures have all
        been done for the grace period: by then librdkafka has let go of them."""
        now = self.clock()
        kept: list[tuple[AdminClient, list[Future[Any]], float]] = []
        for admin, futures, since in self._retired:
            if not all(f.done() for f in futures):
                kept.append((admin, futures, now))  # the grace period starts once all are done
            elif now - since < self.RETIRED_GRACE_SECONDS:
                kept.append((admin, futures, since))
        self._retired = kept

    def measure(self, admin: AdminClient, wanted: list[Key], timeout: float) -> None:
        with self._lock:
            generation = self._generation
        at = self.clock()
        specs = {"latest": OffsetSpec.latest(), "earliest": OffsetSpec.earliest()}
        futures = {
            name: admin.list_offsets(
                {TopicPartition(t, p): spec for t, p in wanted},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=timeout,
            )
            for name, spec in specs.items()
        }
        self._pending = [f for f in self._pending if not f.done()]
        self._pending += [f for by_partition in futures.values() for f in by_partition.values()]
        found: dict[str, dict[Key, int]] = {}
        for name, by_partition in futures.items():
            found[name] = {
                (tp.topic, tp.partition): int(future.result(timeout + 1).offset)
                for tp, future in by_partition.items()
            }
        with self._lock:
            self.freshness.contact(self.clock())
            if generation == self._generation:  # else it measured partitions no longer read
                self.freshness.measured(at, found["latest"], found["earliest"])

    # ------------------------------------------------------------------ the answer

    def status(self, positions: Mapping[Key, int], waiting: str | None = None) -> ReaderStatus:
        """The truth for a reader at ``positions``; ``waiting`` is a reason of the reader's own
        (e.g. the topic does not exist yet), which keeps it not ready."""
        now = self.clock()
        with self._lock:
            verdict = self.freshness.verdict(now, positions)
            error = self.error
        reason = waiting_text(verdict, now, self.max_staleness)
        if waiting is not None and verdict.connected:
            reason = waiting
        topics: dict[str, dict[int, int]] = {}
        for (topic, partition), offset in sorted(verdict.positions.items()):
            topics.setdefault(topic, {})[partition] = offset
        lags: dict[str, dict[int, int]] = {}
        for (topic, partition), behind in sorted(verdict.lags.items()):
            lags.setdefault(topic, {})[partition] = behind
        return ReaderStatus(
            name=self.name,
            ready=verdict.connected and verdict.caught_up and waiting is None,
            connected=verdict.connected,
            caught_up=verdict.caught_up,
            lag=verdict.lag,
            staleness_seconds=verdict.staleness,
            positions=next(iter(topics.values())) if len(topics) == 1 else {},
            waiting_for=reason,
            error=error,
            topics=topics,
            lags=lags,
        )


def wait_until(test: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


class _Unusable(RuntimeError):
    """The consumer cannot go on: close it and assign a new one at the saved positions."""


class TopicMirror:
    """Reads ``topic`` (all partitions, from the beginning, no consumer group commits) on a daemon
    thread and hands each batch of messages to ``absorb``; survives broker restarts and leader
    changes; reports the truth about lag."""

    #: behind, connected, and not a message further for this long: the consumer is rebuilt
    STALL_SECONDS = 30.0
    #: how often the partition count is checked (new partitions are read from the beginning)
    METADATA_SECONDS = 10.0

    def __init__(
        self,
        name: str,
        bootstrap: str,
        topic: str,
        absorb: Callable[[list[Message]], None],
        *,
        config: dict[str, Any] | None = None,
        poll_batch: int = 2000,
        poll_timeout: float = 0.2,
        refresh_seconds: float = 0.5,
        stale_after: float = 5.0,
        max_staleness: float = 5.0,
    ) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.topic = topic
        self.absorb = absorb
        self.config = dict(config or {})
        self.poll_batch = poll_batch
        self.poll_timeout = poll_timeout
        self.metadata_timeout = max(1.0, min(stale_after, 10.0))
        self.health = ReaderHealth(
            name,
            bootstrap,
            self._wanted,
            config=self.config,
            refresh_seconds=refresh_seconds,
            stale_after=stale_after,
            max_staleness=max_staleness,
        )
        #: messages absorbed, and those skipped because ``absorb`` raised on them alone
        self.messages = 0
        self.unabsorbable = 0
        #: consumers made (1 once started; more after each rebuild)
        self.consumers = 0
        self._lock = threading.Lock()
        self._positions: dict[int, int] = {}
        self._partitions: list[int] = []
        self._waiting: str | None = "not started"
        self._progress_at = time.monotonic()
        self._metadata_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> TopicMirror:
        if self._thread is None:
            self._waiting = "connecting"
            self.health.start()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.health.stop(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> ReaderStatus:
        with self._lock:
            positions = {(self.topic, p): o for p, o in self._positions.items()}
            waiting = self._waiting
        return self.health.status(positions, waiting)

    def wait_ready(self, timeout: float) -> bool:
        return wait_until(lambda: self.status().ready, timeout)

    def wait_positions(self, positions: Mapping[int, int], timeout: float) -> bool:
        """Consumed (and absorbed) at least up to these next offsets."""

        def reached() -> bool:
            mine = self.status().positions
            return all(mine.get(p, 0) >= o for p, o in positions.items())

        return wait_until(reached, timeout)

    # ------------------------------------------------------------------ the loop

    def _wanted(self) -> list[Key]:
        with self._lock:
            return [(self.topic, p) for p in self._partitions]

    def _run(self) -> None:
        consumer: Consumer | None = None
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    if consumer is None:
                        consumer = self._consumer()
                    if not self._partitions and not self._assign(consumer):
                        self._stop.wait(self.health.refresh_seconds)
                        continue
                    self._step(consumer)
                    failures = 0
                except Exception as exc:  # recorded, backed off, carried on from
                    failures += 1
                    self.health.record(f"{type(exc).__name__}: {exc}")
                    if consumer is not None and _unusable(exc):
                        log.warning("%s: replacing the consumer at the saved positions", self.name)
                        self._close(consumer)
                        consumer = None
                    self._stop.wait(min(5.0, 0.5 * 2 ** min(failures - 1, 4)))
        finally:
            if consumer is not None:
                self._close(consumer)

    def _consumer(self) -> Consumer:
        settings: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "group.id": f"concierge-{self.name}-unused",  # required by the client; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 100,
            "error_cb": self.health.on_error,
            **_RECONNECT,
        }
        settings.update(self.config)
        consumer = Consumer(routed(settings))
        self.consumers += 1
        with self._lock:
            self._partitions = []  # assigned afresh, at the saved positions
        return consumer

    def _close(self, consumer: Consumer) -> None:
        try:
            consumer.close()
        except Exception as exc:  # closing a broken consumer may fail too; it is gone anyway
            log.debug("%s: close: %s", self.name, exc)

    def _metadata(self, consumer: Consumer) -> list[int] | None:
        """The topic's partitions (None when it does not exist yet); a broker round trip."""
        topic = consumer.list_topics(self.topic, timeout=self.metadata_timeout).topics.get(
            self.topic
        )
        self.health.contact()
        self._metadata_at = time.monotonic()
        if topic is None or topic.error is not None or not topic.partitions:
            return None
        return sorted(topic.partitions)

    def _assign(self, consumer: Consumer) -> bool:
        partitions = self._metadata(consumer)
        if partitions is None:
            with self._lock:
                self._waiting = f"topic {self.topic} does not exist yet"
            return False
        with self._lock:
            saved = dict(self._positions)
        consumer.assign(
            [TopicPartition(self.topic, p, saved.get(p, OFFSET_BEGINNING)) for p in partitions]
        )
        with self._lock:
            self._partitions = partitions
            self._waiting = None
        self._progress_at = time.monotonic()
        log.info("%s: reading %s partition(s) of %s", self.name, len(partitions), self.topic)
        return True

    def _step(self, consumer: Consumer) -> None:
        messages = consumer.consume(self.poll_batch, self.poll_timeout)
        batch: list[Message] = []
        for message in messages:
            error = message.error()
            if error is None:
                batch.append(message)
            elif error.fatal():
                raise _Unusable(f"fatal: {error}")
            elif error.code() != KafkaError._PARTITION_EOF:
                self.health.record(f"partition {message.partition()}: {error}")
        if batch:
            self._deliver(batch)
        self._advance(consumer)
        now = time.monotonic()
        if now - self._metadata_at >= self.METADATA_SECONDS:
            self._grow(consumer)
        if now - self._progress_at >= self.STALL_SECONDS:
            status = self.status()
            if status.connected and (status.lag or 0) > 0:
                raise _Unusable(f"no progress in {self.STALL_SECONDS:g} s, {status.lag} behind")
            self._progress_at = now

    def _deliver(self, batch: list[Message]) -> None:
        try:
            self.absorb(batch)
        except Exception:  # one bad message: find it, skip it, say so; the rest go in
            for message in batch:
                try:
                    self.absorb([message])
                except Exception as exc:
                    self.unabsorbable += 1
                    where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
                    # the exception's text may quote the message: its type only
                    log.error("%s: message %s not absorbed (%s); skipped",
                              self.name, where, type(exc).__name__)  # fmt: skip
                    self.health.record(
                        f"message {where} not absorbed ({type(exc).__name__}); "
                        f"{self.unabsorbable} skipped so far",
                        quiet=True,
                    )
        ends: dict[int, int] = {}
        for message in batch:
            partition, offset = message.partition(), message.offset()
            if partition is not None and offset is not None:
                ends[partition] = max(ends.get(partition, 0), offset + 1)
        with self._lock:
            for partition, end in ends.items():
                if end > self._positions.get(partition, 0):
                    self._positions[partition] = end
            self.messages += len(batch)
        self._progress_at = time.monotonic()

    def _advance(self, consumer: Consumer) -> None:
        """Positions past what no message shows (transaction markers, aborted records)."""
        with self._lock:
            partitions = list(self._partitions)
        moved = False
        for tp in consumer.position([TopicPartition(self.topic, p) for p in partitions]):
            with self._lock:
                if tp.offset >= 0 and tp.offset > self._positions.get(tp.partition, 0):
                    self._positions[tp.partition] = tp.offset
                    moved = True
        if moved:
            self._progress_at = time.monotonic()

    def _grow(self, consumer: Consumer) -> None:
        partitions = self._metadata(consumer)
        with self._lock:
            new = sorted(set(partitions or ()) - set(self._partitions))
        if new:
            consumer.incremental_assign(
                [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in new]
            )
            with self._lock:
                self._partitions = sorted({*self._partitions, *new})
            log.info("%s: %s new partition(s) of %s", self.name, len(new), self.topic)


def _unusable(exc: BaseException) -> bool:
    if isinstance(exc, _Unusable):
        return True
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return bool(exc.args[0].fatal())
    return isinstance(exc, RuntimeError)  # e.g. "Consumer closed"


__all__ = [
    "Freshness",
    "Key",
    "Mark",
    "ReaderHealth",
    "ReaderStatus",
    "TopicMirror",
    "Verdict",
    "wait_until",
    "waiting_text",
]
