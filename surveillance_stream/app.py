"""The Faust application: patient state, live cohorts of saved questions, stream time.

One agent reads the facts topic and the control topic together; the two are co-partitioned
(six partitions each, assigned together by Faust's assignor), so partition *p* of both lands on
the same worker and every table write made while handling them goes to partition *p* of its
changelog.

* **Patient state** (:mod:`.store`) is backed by the facts topic itself: a worker assigned a
  partition loads its local checkpoint (:mod:`.checkpoint`) and folds the facts after it, or
  rebuilds it by reading the partition from offset 0, then folds new envelopes as they come.
* **Live cohorts** (:mod:`.cohorts`) live in a Faust table whose changelog is the public cohort
  topic: writing a membership record publishes the cohort event.
* **Stream time** comes from ticks the worker sends to the control topic of each partition it
  owns (every ``CONCIERGE_STREAM_TICK_SECONDS``), so time is in the log: replaying a partition
  replays the same times, and tests can send their own ticks.
* **Saved questions** reach every partition as ``trial`` control messages, sent by the worker
  whenever the trials topic (the registry of record) holds a version a partition has not seen.

Processing guarantee is at-least-once (Faust flushes changelogs and sent messages before it
commits offsets); the effect is exactly-once because every step is idempotent: the state fold
keeps the highest ``seq``, and cohort records are recomputed and compared, never incremented.
We deliberately do not rely on Faust's ``exactly_once`` mode (faust-streaming issues #517 and
#323 report duplicates under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import faust
import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from core.contracts.facts import envelopes_of
from core.settings import Settings
from infra.kafka_log import routed
from infra.mirror import ReaderHealth, ReaderStatus
from infra.topics import COHORT, CONTROL, FACTS, TRIALS, TopicSpec
from infra.topics_admin import ensure_topics

from . import patient_state
from .checkpoint import CheckpointRefused, Checkpoints, Identity, key_fingerprint
from .cohorts import LiveCohorts
from .stall import Stall, StallWatch
from .standby import Standby
from .status_pages import PROBLEM, AuditUnavailable, PageAccess, Refusal
from .store import (
    Backing,
    Entries,
    PatientStore,
    canonical,
    fold_tail,
    read_messages,
    read_partition,
    read_table_partition,
    watermarks,
)

if TYPE_CHECKING:
    from .device_stream import DeviceContributions

log = logging.getLogger(__name__)

PARTITIONS = 6
#: A state page's handler: ``(request, **path parameters) -> (body, audit detail)``.
PageHandler = Callable[..., tuple[Any, dict[str, Any]]]
#: Messages between two ``gc.freeze()`` calls (see handle_facts).
FREEZE_EVERY = 500


class FlushTimes:
    """How long the commit flush takes, measured on its own: every drain of the producer
    buffer that Faust awaits before it commits offsets (wall time, since the flush waits for
    the broker), with the messages each one drained. Shown on ``/health`` as
    ``commit_flush`` so the stream benchmark can report it beside the throughput."""

    def __init__(self) -> None:
        self.flushes = 0
        self.messages = 0
        self.seconds = 0.0
        self.longest = 0.0

    def add(self, seconds: float, messages: int) -> None:
        self.flushes += 1
        self.messages += messages
        self.seconds += seconds
        self.longest = max(self.longest, seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "flushes": self.flushes,
            "messages": self.messages,
            "seconds": round(self.seconds, 6),
            "mean_ms": round(1000 * self.seconds / self.flushes, 3) if self.flushes else None,
            "longest_ms": round(1000 * self.longest, 3),
        }


def _flush_completely(buffer: Any, times: FlushTimes | None = None) -> None:
    """Make the producer buffer's ``flush`` drain it completely.

    Before committing source offsets Faust flushes its producer, whose buffer (table changelog
    writes are queued there) gives up as soon as 0.1 s passes without a message leaving it, e.g.
    while the agent holds the event loop. It can then return with changelog writes still
    queued, commit offsets past the events that made them, and a crash loses them: a cohort
    record or a device contribution that is never written again. Found by the device
    integration test's SIGKILL (the contribution topic missed a dozen patients). Here the flush
    loops until the buffer is empty, so a commit never overtakes the writes it covers; with
    ``times``, each flush's duration and size are recorded (the loop is unchanged).
    """
    flush_atmost = buffer.flush_atmost

    async def flush() -> None:
        started = time.perf_counter()
        drained = buffer.size
        while buffer.size:
            await flush_atmost(None)
        if times is not None:
            times.add(time.perf_counter() - started, drained)

    buffer.flush = flush


class RecoveryError(RuntimeError):
    """The facts topic cannot give the state the stream's position needs."""


class StreamApp:
    """A Faust app, its tables and agents, built from settings (one per worker process)."""

    def __init__(
        self,
        settings: Settings,
        store: str | None = None,
        extensions: list[Callable[[StreamApp], None]] | None = None,
    ) -> None:
        self.settings = settings
        # Fewer young-generation collections: the worker allocates many short-lived dicts per
        # message (decoded envelopes), almost none of them cyclic.
        gc.set_threshold(50_000, 20, 20)
        app_id = f"{settings.topic_prefix}{settings.worker_id}"
        datadir = settings.home / "worker" / app_id
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            app_id,
            broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")],
            store=store or "memory://",
            datadir=str(datadir),
            topic_partitions=PARTITIONS,
            topic_replication_factor=settings.topic_replication_factor,
            consumer_auto_offset_reset="earliest",
            processing_guarantee="at_least_once",
            web_port=settings.worker_web_port,
            # Faust binds to web_bind (0.0.0.0 unless set); web_host only names the worker in
            # URLs it advertises. The status pages listen on loopback unless configured.
            web_bind=settings.worker_web_bind,
            web_host=urlsplit(settings.worker_address()).hostname,
            # Faust's own pages are off: /table/{name}/{key} serves table values (cohort
            # records name patients), /router the cluster's addresses, the statistics pages
            # internal state. Only this module's pages are served, behind status_pages.
            web_tables_enabled=False,
            web_router_enabled=False,
            web_stats_enabled=False,
            web_graph_enabled=False,
            web_metrics_enabled=False,
            # A killed worker's partitions wait for its session to time out before a restarted
            # one gets them: Faust's 60 s default was a minute of stale live answers per crash.
            broker_session_timeout=settings.stream_session_timeout_seconds,
            broker_heartbeat_interval=min(3.0, settings.stream_session_timeout_seconds / 3),
            broker_commit_every=1000,
            broker_commit_interval=1.0,
            producer_linger=0.005,
            table_cleanup_interval=3600.0,
            stream_wait_empty=True,
            stream_buffer_maxsize=16384,
            # No Faust table standbys. With Faust's default of one, its assignor caps each
            # member at ceil(partitions / members) and keeps assignments sticky within that cap,
            # so a member joining after the others reached the cap got nothing (CI: four workers,
            # six partitions, held as [4, 5], [], [1, 2], [0, 3]). With none it trims each member
            # to floor(partitions / members) first, and every member holds at least one. The
            # tables a new owner needs are restored from their changelogs and checked against
            # their topics at the rebuild; patient state has its own standbys
            # (CONCIERGE_STREAM_STANDBY).
            table_standby_replicas=0,
        )
        #: the commit flush, measured on its own (see FlushTimes)
        self.flush_times = FlushTimes()
        _flush_completely(self.app.producer.buffer, self.flush_times)
        self.facts_name = settings.topic(FACTS)
        self.control_name = settings.topic(CONTROL)
        raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
               "value_serializer": "raw", "partitions": PARTITIONS}  # fmt: skip
        self.inputs = self.app.topic(self.facts_name, self.control_name, **raw)
        self.control_topic = self.app.topic(self.control_name, **raw)
        #: The tables whose changelog is a public topic: (name, table, topic).
        self.published: list[tuple[str, Any, str]] = []
        self.cohort_table = self.published_table("cohort", settings.topic(COHORT))
        self.trials_table = self.app.Table(
            "trials", default=None, key_type=str, partitions=PARTITIONS
        )
        self.store = PatientStore(settings.stream_state_cache_patients)
        self.cohorts = LiveCohorts(self.store, self.cohort_table, self.trials_table)
        self._rebuilding: dict[int, asyncio.Future[None]] = {}
        #: Partitions whose state was checked against the stream's position since the last
        #: rebalance; facts offset each partition's state reflects (everything before it).
        self._verified: set[int] = set()
        self.folded_to: dict[int, int] = {}
        #: (partition, trial) -> the version sent to that partition since the last assignment
        self._trials_sent: dict[tuple[int, str], int] = {}
        #: What each rebuild read, and each gap handled from the log (for /readyz).
        self.rebuilds: list[dict[str, Any]] = []
        #: Local checkpoints of patient state (None when CONCIERGE_STREAM_CHECKPOINT_SECONDS is
        #: 0); per partition, when the next one is due (loop time) and the last one written.
        self.checkpoints: Checkpoints | None = None
        self.checkpoint_dir = datadir / "patient-state"
        self._checkpoint_due: dict[int, float] = {}
        self.checkpoint_log: list[dict[str, Any]] = []
        self.gaps: list[dict[str, int]] = []
        #: Facts partitions behind their end whose position has not moved for
        #: CONCIERGE_STREAM_STALL_SECONDS (:mod:`.stall`), as of the last check.
        self.stall_watch = StallWatch(settings.stream_stall_seconds)
        self.stalled: list[Stall] = []
        self._offsets_client: Consumer | None = None
        self._checkpoints_lock = threading.Lock()
        #: Standby checkpoints of the facts partitions this worker does not own
        #: (CONCIERGE_STREAM_STANDBY; :mod:`.standby`), started at the first assignment.
        self.standby: Standby | None = None
        if settings.stream_standby and settings.stream_checkpoint_seconds > 0:
            self.standby = Standby(
                settings.kafka_bootstrap_servers,
                self.facts_name,
                app_id,
                self._checkpoints_or_new,
                settings.stream_checkpoint_seconds,
                settings.stream_state_cache_patients,
            )
        #: Readiness: the facts topic's end, measured on a thread of its own, against the
        #: state's positions (the same rule as every topic reader's, infra/mirror.py).
        self.health = ReaderHealth(
            "worker",
            settings.kafka_bootstrap_servers,
            lambda: [(self.facts_name, p) for p in self.assigned(self.facts_name)],
        )
        self.applied = 0
        self.ignored = 0
        self.rejected = 0
        self.messages = 0
        self.ticks = 0
        self.saved: Any = None
        #: Called after a patient's facts were folded, inside the same stream iteration (so
        #: tables they update stay co-partitioned): (partition, patient, changes).
        self.on_change: list[Callable[[int, str, list[Any]], None]] = []
        #: Called after a partition's patient state was rebuilt: (partition).
        self.on_recover: list[Callable[[int], None]] = []
        #: Called when a partition's state is dropped (revoked and not assigned back).
        self.on_forget: list[Callable[[int], None]] = []
        #: The per-patient device contributions (:class:`~.device_stream.DeviceContributions`),
        #: when the device extension is installed.
        self.devices: DeviceContributions | None = None
        #: Admin tokens and audit records for the state pages (:mod:`.status_pages`).
        self.access = PageAccess(settings)
        #: ``/metrics``' registry, made at the first scrape (:mod:`.metrics`)
        self._metrics: Any = None
        self._register()
        for extension in extensions or ():
            extension(self)

    def published_table(self, name: str, topic: str) -> Any:
        """A Faust table whose changelog is a topic other services read (the cohort topic, the
        device contributions): JSON values, raw string keys, compacted. Checked against its
        topic whenever a partition is rebuilt (:meth:`_verify_published`)."""
        table = self.app.Table(
            name,
            default=None,
            key_type=str,
            partitions=PARTITIONS,
            changelog_topic=self.app.topic(
                topic,
                key_type=str,
                key_serializer="raw",
                value_serializer="json",
                partitions=PARTITIONS,
                compacting=True,
                # a changelog, never a stream: with acks on, Faust's stuck-stream detector logged
                # an ERROR per partition every few seconds after 5 min (60-minute soak: 15,552)
                acks=False,
            ),
        )
        self.published.append((name, table, topic))
        return table

    async def _verify_published(self, partition: int) -> None:
        """Make each published table hold, for the keys of ``partition``, exactly what its topic
        holds (the latest value of each key), before anything is evaluated on that partition.

        Every decision the worker takes on a published table compares with what the table
        holds: the next cohort record's ``change`` (readers ignore a record whose ``change`` is
        not above the one they have), whether a patient who no longer qualifies needs a record
        saying so, whether a contribution needs a tombstone. A table that lacks what the topic
        holds therefore makes silent wrong answers: the chaos suite saw a restarted worker
        write a cohort record with ``change`` 1 over one with ``change`` 2, which every reader
        ignored, while Faust reported its table recovery complete. So the worker does not rely
        on that recovery alone: it reads the partition of each table's topic itself (as it
        reads the facts) and puts back what is missing or different, without sending anything
        (the topic already holds it)."""
        for name, table, topic in self.published:
            latest = read_table_partition(self.settings.kafka_bootstrap_servers, topic, partition)
            store = table.data
            restored = removed = 0
            for key, value in latest.items():
                if value is None:
                    if key in store:
                        del store[key]
                        removed += 1
                elif store.get(key) != value:
                    store[key] = value
                    restored += 1
            if restored or removed:
                log.warning(
                    "partition %s: the %s table lacked %s of the %s keys its topic holds and had "
                    "%s it deleted; restored from the topic",
                    partition,
                    name,
                    restored,
                    len(latest),
                    removed,
                )

    # ------------------------------------------------------------------ partitions

    def faust_topics(self) -> list[TopicSpec]:
        """The topics Faust would create itself for this app: the trials table's changelog
        (compacted, co-partitioned with the facts and control topics). The published tables'
        changelogs are the product's own topics (``infra.topics``)."""
        name = self.trials_table.changelog_topic.get_topic_name()
        return [TopicSpec(name, PARTITIONS, {"cleanup.policy": "compact"})]

    def declare_topics(self, timeout: float = 15.0) -> list[str]:
        """Create :meth:`faust_topics` before Faust starts, and wait until the broker lists
        them; the names created. Left to Faust, the changelog was created only after its
        consumer subscribed (three workers starting at once on fresh prefixes: "Ignoring
        missing topic"), the consumer's metadata then gave it 0 partitions for minutes and the
        first saved question crashed the agent with PartitionsMismatch at every control
        message, so that node's cohorts never became current. A broker that does not answer
        here is left to Faust, as before (logged)."""
        try:
            return ensure_topics(
                self.settings.kafka_bootstrap_servers,
                "",
                self.faust_topics(),
                replication_factor=self.app.conf.topic_replication_factor,
                timeout=timeout,
            )
        except (KafkaException, TimeoutError) as exc:
            log.warning(
                "could not create the trials changelog before start (%s); Faust will",
                type(exc).__name__,
            )
            return []

    def assigned(self, topic: str) -> list[int]:
        try:
            assignment = self.app.consumer.assignment()
        except Exception:  # not started yet
            return []
        return sorted(tp.partition for tp in assignment if tp.topic == topic)

    async def ensure_partition(self, partition: int, facts_offset: int | None = None) -> None:
        """Make a partition's patient state reflect every facts message before the stream's
        position on it, before the stream's next message of that partition is handled.

        The position is taken from the stream itself: the offset of the first facts message
        delivered after an assignment (``facts_offset``) is exactly where this group resumed, so
        the state must fold everything before it. When a control message comes first, the
        position is the group's committed facts offset, read from the coordinator through the
        client's public API (never from Faust's internals: its private map is emptied on every
        revocation, and reading it at the wrong moment rebuilt an empty state while the stream
        resumed from the committed offsets). A partition held before a rebalance keeps its
        state and only folds the gap another worker may have processed meanwhile.
        """
        if partition in self._verified and (
            facts_offset is None or facts_offset <= self.folded_to.get(partition, 0)
        ):
            return
        pending = self._rebuilding.get(partition)
        if pending is None:
            pending = asyncio.ensure_future(self._recover(partition, facts_offset))
            self._rebuilding[partition] = pending
        try:
            await pending
        finally:
            self._rebuilding.pop(partition, None)

    def on_assigned(self, facts_partitions: set[int]) -> None:
        """After every rebalance each partition is checked again at its first message; the
        state of a partition this worker no longer holds is dropped (it would go stale)."""
        self._verified.clear()
        self._trials_sent.clear()
        for partition in sorted(set(self.store.partitions) - facts_partitions):
            self.cohorts.forget(partition)
            for hook in self.on_forget:
                hook(partition)
            self.store.drop(partition)
            self._checkpoint_due.pop(partition, None)
            if self.checkpoints is not None:
                # the checkpoint stays on disk: if the partition comes back, only the facts
                # after it are read (another member's effects of them are durable)
                self.checkpoints.close(partition)
            self.folded_to.pop(partition, None)
            self.cohorts.facts_offset.pop(partition, None)
            log.info("partition %s revoked: its patient state was dropped", partition)
        if self.standby is not None:
            # follow every partition this worker does not own; an assigned one is handed over
            # by _recover (Standby.release), which waits for a fold or write under way
            self.standby.follow(set(range(PARTITIONS)) - facts_partitions)
            self.standby.start()

    async def _committed(self, partition: int) -> int:
        """The facts offset this group resumes from on ``partition``, from the group
        coordinator (0 when the group never committed there: then the stream reads the whole
        partition itself). Retried until the broker answers: a guess would be a silent wrong
        state."""
        loop = asyncio.get_running_loop()
        delay = 0.5
        while True:
            try:
                return await loop.run_in_executor(None, self._committed_sync, partition)
            except KafkaException as exc:
                log.warning(
                    "committed offset of partition %s not readable yet (%s); retrying in %.1f s",
                    partition,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def readiness(self) -> ReaderStatus:
        """Ready when the worker holds partitions, each was rebuilt (or checked) since the last
        rebalance, the registry of saved questions is loaded, and the state has reached the
        facts topic's end as it stood moments ago with the broker answering."""
        assigned = self.assigned(self.facts_name)
        waiting: list[str] = []
        if not assigned:
            waiting.append("no partitions assigned yet (joining the consumer group)")
        unverified = [p for p in assigned if p not in self._verified]
        if unverified:
            waiting.append(f"partitions {unverified} not yet rebuilt or checked")
        if self.saved is None or not self.saved.readiness().ready:
            waiting.append("the saved questions are not loaded yet")
        stalled = [s for s in self.stalled if s.partition in assigned]
        if stalled:
            waiting.append(
                "stalled: "
                + ", ".join(
                    f"partition {s.partition} at offset {s.position} has not moved for "
                    f"{s.seconds:.0f} s with {s.lag} messages waiting"
                    for s in stalled
                )
            )
        positions = {(self.facts_name, p): self.folded_to.get(p, 0) for p in assigned}
        return self.health.status(positions, "; ".join(waiting) or None)

    def check_stalls(self) -> list[Stall]:
        """Update :attr:`stalled` (:mod:`.stall`); log each newly stalled partition once, with
        what Faust's consumer holds for it and where the stream's tasks wait. A rebuild under
        way holds every partition's position still by design (the agent awaits it): no stall
        is counted then, and the clocks restart when it ends. Faust restoring its tables after a
        rebalance is counted (a restore that never ends is a reported kind of stall); the log
        line says whether one is under way."""
        assigned = self.assigned(self.facts_name)
        positions = {p: self.folded_to.get(p, 0) for p in assigned}
        status = self.health.status({(self.facts_name, p): o for p, o in positions.items()})
        lags = status.lags.get(self.facts_name, {})
        watching = status.connected and not self._rebuilding
        self.stalled = self.stall_watch.observe(time.monotonic(), positions, lags, watching)
        for stall in self.stall_watch.newly(self.stalled):
            log.warning(
                "partition %s stalled: at offset %s with %s messages waiting, no progress for "
                "%.0f s; %s",
                stall.partition,
                stall.position,
                stall.lag,
                stall.seconds,
                self.stall_diagnosis(stall.partition),
            )
        for stall in self.stalled:
            if stall.seconds >= 2 * self.stall_watch.after:
                self.unstick(stall.partition)
        return self.stalled

    def unstick(self, partition: int) -> bool:
        """Resume the facts ``partition`` when Faust's consumer holds it paused with no
        rebalance or table recovery under way (then nothing of Faust's will resume it: the
        fetcher skips paused partitions for good). Called once a stall has lasted twice
        CONCIERGE_STREAM_STALL_SECONDS; a stall of another cause is left as it is, reported
        by /readyz and the log. Resuming is safe for the state: the stream delivers from the
        consumer's position, and a gap is folded from the log first (:meth:`ensure_partition`)."""
        consumer = self.app.consumer
        recovery = self._table_recovery()
        if getattr(self.app, "rebalancing", False) or getattr(recovery, "in_recovery", False):
            return False
        paused = getattr(consumer, "_paused_partitions", None) or set()
        held = [tp for tp in paused if tp.topic == self.facts_name and tp.partition == partition]
        if not held:
            return False
        consumer.resume_partitions(held)
        log.warning(
            "partition %s was left paused by the consumer with no rebalance under way: resumed",
            partition,
        )
        return True

    def stall_diagnosis(self, partition: int) -> str:
        """What Faust's consumer holds for the facts ``partition`` and the stacks of the
        stream's tasks (code locations only: no values, so no patient data)."""
        consumer = self.app.consumer
        tp = next(
            (
                tp
                for tp in self._safe(consumer.assignment, set())
                if tp.topic == self.facts_name and tp.partition == partition
            ),
            None,
        )
        paused = getattr(consumer, "_paused_partitions", None) or set()
        active = getattr(consumer, "_active_partitions", None) or set()
        flow = getattr(consumer, "can_resume_flow", None)
        recovery = self._table_recovery()
        remaining = getattr(recovery, "active_remaining_total", None)
        facts = {
            "assigned": tp is not None,
            "paused": tp in paused,
            "active": tp in active,
            "consumer flow": None if flow is None else flow.is_set(),
            "app flow": self._safe(self.app.flow_control.is_active, None),
            "rebalancing": getattr(self.app, "rebalancing", None),
            "highwater": self._safe(lambda: consumer.highwater(tp), None) if tp else None,
            "table recovery": None
            if recovery is None
            else {
                "in_recovery": getattr(recovery, "in_recovery", None),
                "active_remaining": None if remaining is None else self._safe(remaining, None),
            },
        }
        lines = [", ".join(f"{k}: {v}" for k, v in facts.items())]
        for task in asyncio.all_tasks():
            where = _awaiting(task)
            ours = ("app.py", "agent.py", "streams.py", "consumer.py")
            if any(w.startswith(ours) for w in where):
                lines.append(f"task {task.get_name()} awaits: " + " -> ".join(where))
        # an agent's task awaits a wrapper that hides its coroutine: each actor's, directly
        for agent in list(self._safe(lambda: self.app.agents.values(), [])):
            for actor in list(getattr(agent, "_actors", ())):
                it = getattr(actor, "it", None)
                if it is not None:
                    where = _awaiting(it)
                    lines.append(f"agent {agent.name} awaits: " + " -> ".join(where))
        return "\n  ".join(lines)

    def _table_recovery(self) -> Any:
        """Faust's table recovery service (None before the app is set up)."""
        return getattr(getattr(self.app, "tables", None), "recovery", None)

    @staticmethod
    def _safe(call: Callable[[], Any], default: Any) -> Any:
        try:
            return call()
        except Exception:
            return default

    def _offsets_client_or_new(self) -> None:
        if self._offsets_client is None:
            # A plain client with the worker's group id: committed() is an OffsetFetch request
            # to the coordinator; the client never subscribes, so it never joins the group.
            self._offsets_client = Consumer(
                routed(
                    {
                        "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                        "group.id": self.app.conf.id,
                        "enable.auto.commit": False,
                    }
                )
            )

    def _committed_sync(self, partition: int) -> int:
        self._offsets_client_or_new()
        assert self._offsets_client is not None
        (found,) = self._offsets_client.committed(
            [TopicPartition(self.facts_name, partition)], timeout=10
        )
        if found.error is not None:
            raise KafkaException(found.error)
        return max(0, int(found.offset))  # OFFSET_INVALID (-1001): never committed

    async def _recover(self, partition: int, facts_offset: int | None) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Faust may have restored the trials table from its changelog since the last
        # assignment (another worker's trial messages): read it afresh
        self.cohorts.invalidate(partition)
        if not self.store.ready(partition):
            # The state is folded up to the group's committed offset, the point up to which
            # every effect (cohort records, device contributions) is durable; everything after
            # it is handled with its effects below or by the stream. Not up to the first
            # message's offset: Faust can deliver a first message past the committed offset
            # (the chaos suite saw 53 delivered first with effects only durable to 40), and the
            # messages between would then be folded without ever producing their effects.
            committed = await self._committed(partition)
            standby: int | None = None
            if self.standby is not None:
                # the standby stops following the partition before its checkpoint is opened
                standby = await loop.run_in_executor(None, self.standby.release, partition)
            patients, read, end, changed, record, backing = await loop.run_in_executor(
                None, self._load_partition, partition, committed
            )
            await self._verify_published(partition)
            self.store.install(partition, patients, changed, backing)
            self._checkpoint_due[partition] = loop.time() + self.settings.stream_checkpoint_seconds
            self.folded_to[partition] = end
            self.cohorts.facts_offset[partition] = end
            gc.freeze()
            self.cohorts.recover(partition)
            for hook in self.on_recover:
                hook(partition)
            if self.standby is not None:
                # the offset of the standby checkpoint this worker kept of the partition (None:
                # it followed none; "from" says whether the recovery started from it)
                record["standby"] = standby
            record |= {
                "partition": partition,
                "patients": len(patients),
                "envelopes": read,
                "to": end,
                "seconds": round(loop.time() - started, 3),
            }
            self.rebuilds.append(record)
            log.info(
                "partition %s rebuilt: %s patients, %s envelopes read from offset %s (%s) to "
                "offset %s in %.1f s",
                partition,
                len(patients),
                read,
                record["from"],
                record["checkpoint"],
                end,
                loop.time() - started,
            )
        held = self.folded_to.get(partition, 0)
        target = facts_offset if facts_offset is not None else held
        if target > held:
            # Messages the stream will not deliver: skipped by the client, or processed by
            # another member while this one did not hold the partition. Handled here, effects
            # included, in order, before the message at ``target``.
            messages = await loop.run_in_executor(
                None,
                read_messages,
                self.settings.kafka_bootstrap_servers,
                self.facts_name,
                partition,
                held,
                target,
            )
            for offset, value in messages:
                self.handle_facts(partition, offset, value)
            self.gaps.append({"partition": partition, "from": held, "to": target})
            log.warning(
                "partition %s: %s messages from offset %s to %s were not delivered by the "
                "stream; handled from the log",
                partition,
                len(messages),
                held,
                target,
            )
        self._verified.add(partition)

    def _identity(self) -> Identity:
        """What a checkpoint of this worker's facts must have been made from: the topic's name
        and id (asked of the broker: a topic deleted and created again has a new id), the
        partition count and the pseudonym key's fingerprint."""
        from confluent_kafka import TopicCollection
        from confluent_kafka.admin import AdminClient

        topic_id: str | None = None
        try:
            admin = AdminClient(
                routed({"bootstrap.servers": self.settings.kafka_bootstrap_servers})
            )
            futures = admin.describe_topics(TopicCollection([self.facts_name]), request_timeout=10)
            description = futures[self.facts_name].result(timeout=15)
            topic_id = str(description.topic_id)
        except Exception as exc:  # the offset checks below still catch a recreated topic
            log.warning("the facts topic's id could not be read (%s)", exc)
        key = self.settings.pseudonym_key.get_secret_value().encode()
        return Identity(self.facts_name, PARTITIONS, key_fingerprint(key), topic_id)

    def _checkpoints_or_new(self) -> Checkpoints:
        """The worker's checkpoints, made at first use (on a thread: the topic's id is asked of
        the broker); one object for the worker's own partitions and the standby's."""
        with self._checkpoints_lock:
            if self.checkpoints is None:
                self.checkpoints = Checkpoints(self.checkpoint_dir, self._identity())
            return self.checkpoints

    def _load_partition(
        self, partition: int, committed: int
    ) -> tuple[dict[str, Entries], int, int, set[str] | None, dict[str, Any], Backing | None]:
        """The partition's patient state up to the group's committed offset (on a thread):
        from the local checkpoint and the facts after it, or, when there is none or it cannot
        be used (said loudly), from offset 0. ``(patients in memory, envelopes read, end,
        patients changed since the checkpoint (None: all), what /readyz shows of it, the
        checkpoint the other patients are read from (None: all are in memory))``.

        From a checkpoint only its metadata is read here, and the patients the facts after it
        touch: the rest stay on disk until something needs them, so the restart's cost
        follows the tail, not the history."""
        bootstrap = self.settings.kafka_bootstrap_servers
        refused: str | None = "checkpoints off"
        if self.settings.stream_checkpoint_seconds > 0:
            self.checkpoints = self._checkpoints_or_new()
            try:
                loaded = self.checkpoints.open(partition)
                low, high = watermarks(bootstrap, self.facts_name, partition)
                if loaded.offset > high:
                    raise CheckpointRefused(
                        f"offset {loaded.offset} is past the topic's end {high} (topic created "
                        "again?)"
                    )
                if loaded.offset > committed:
                    raise CheckpointRefused(
                        f"offset {loaded.offset} is past the group's committed offset {committed}"
                    )
                if loaded.offset < low:
                    raise CheckpointRefused(
                        f"offset {loaded.offset} is before the topic's first offset {low}"
                    )
            except CheckpointRefused as exc:
                refused = str(exc)
                if refused != "no checkpoint":
                    log.warning(
                        "partition %s: local checkpoint refused (%s); rebuilding from offset 0",
                        partition,
                        refused,
                    )
                self.checkpoints.discard(partition)
            else:
                patients, read, changed = fold_tail(
                    bootstrap, self.facts_name, partition, loaded.reader, loaded.offset, committed
                )
                return (
                    patients,
                    read,
                    committed,
                    changed,
                    {
                        "from": loaded.offset,
                        "checkpoint": "loaded",
                        "checkpoint_age_seconds": round(time.time() - loaded.written_at, 1),
                    },
                    loaded.reader,
                )
        patients, read, end = {}, 0, 0
        if committed > 0:
            patients, read, end = read_partition(bootstrap, self.facts_name, partition, committed)
            if end < committed:
                raise RecoveryError(
                    f"partition {partition}: the facts topic ends at {end}, before the "
                    f"group's committed offset {committed}"
                )
        # the next checkpoint writes every patient to the (discarded, so empty) database; once
        # it is on disk the store may drop patients from memory
        backing: Backing | None = None
        if self.checkpoints is not None and refused != "checkpoints off":
            backing = self.checkpoints.reader(partition)
        return patients, read, end, None, {"from": 0, "checkpoint": refused}, backing

    async def maybe_checkpoint(self, partition: int, offset: int, tp: Any) -> None:
        """Write the partition's checkpoint at ``offset`` (the facts message about to be
        handled) when one is due: first commit the group's offsets (Faust flushes every table
        and sent message before it commits), then check with the coordinator that the committed
        offset is exactly ``offset``, so the checkpoint never reflects a message whose effects
        are not durable. One write batch: the patients changed since the last checkpoint and
        the offset (:mod:`.checkpoint`)."""
        if self.checkpoints is None or partition not in self._verified:
            return
        loop = asyncio.get_running_loop()
        due = self._checkpoint_due.get(partition)
        if due is None or loop.time() < due or self.folded_to.get(partition, 0) > offset:
            return
        changed = self.store.changed.get(partition)
        if not changed:
            self._checkpoint_due[partition] = loop.time() + self.settings.stream_checkpoint_seconds
            return
        started = loop.time()
        await self.app.consumer.commit({tp})
        committed = await self._committed(partition)
        if committed != offset:
            # another commit was under way, or this one did not cover the offset: later
            self._checkpoint_due[partition] = loop.time() + 1.0
            return
        count = len(changed)
        # the changed patients stay in memory until the batch is on disk (write-behind)
        changed = self.store.begin_checkpoint(partition)
        batch = self.checkpoints.encode(partition, offset, self.store.patients(partition), changed)
        try:
            await loop.run_in_executor(None, self.checkpoints.write, partition, batch)
        except Exception:
            # the checkpoint on disk is still the previous one (a batch is all or nothing)
            self.store.end_checkpoint(partition, written=False)
            log.exception("partition %s: writing the local checkpoint failed", partition)
            self._checkpoint_due[partition] = loop.time() + self.settings.stream_checkpoint_seconds
            return
        self.store.end_checkpoint(partition, written=True)
        self._checkpoint_due[partition] = loop.time() + self.settings.stream_checkpoint_seconds
        self.checkpoint_log.append(
            {
                "partition": partition,
                "offset": offset,
                "patients": count,
                "seconds": round(loop.time() - started, 3),
            }
        )
        del self.checkpoint_log[:-24]

    # ------------------------------------------------------------------ handling

    def handle_facts(self, partition: int, offset: int, value: bytes) -> None:
        try:
            envelopes = envelopes_of(value)
        except orjson.JSONDecodeError as exc:
            # Only the adapters write this topic; a bad message is a bug, not input. Log, go on.
            self.rejected += 1
            log.error("undecodable facts message at %s:%s skipped: %s", partition, offset, exc)
            return
        self.messages += 1
        if self.messages % FREEZE_EVERY == 0:
            # Patient state is millions of small, acyclic, long-lived dicts: reference counting
            # frees them, so move them out of the cyclic collector's sight, or every collection
            # walks the whole state (it was most of the worker's time before).
            gc.freeze()
        by_patient: dict[str, list[Any]] = {}
        for envelope in envelopes:
            if not isinstance(envelope, dict) or "patient" not in envelope or "seq" not in envelope:
                self.rejected += 1
                continue
            change = self.store.apply(partition, envelope)
            if change.applied:
                self.applied += 1
            else:
                self.ignored += 1
            by_patient.setdefault(change.patient, []).append(change)
        self.cohorts.facts_offset[partition] = offset + 1
        self.folded_to[partition] = offset + 1
        for patient, changes in by_patient.items():
            self.cohorts.on_changes(partition, patient, changes)
            for hook in self.on_change:
                hook(partition, patient, changes)

    def handle_control(self, partition: int, value: bytes) -> None:
        try:
            message = orjson.loads(value)
        except orjson.JSONDecodeError:
            self.rejected += 1
            log.error("undecodable control message on partition %s skipped", partition)
            return
        kind = message.get("type")
        if kind == "tick":
            self.ticks += 1
            at = datetime.fromisoformat(message["time"])
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            self.cohorts.on_tick(partition, at.timestamp())
        elif kind == "trial":
            self.cohorts.on_trial(partition, message["trial"])
        else:
            log.warning("unknown control message %r on partition %s", kind, partition)

    def _register(self) -> None:
        app = self.app

        @app.on_partitions_assigned.connect
        async def on_partitions_assigned(
            sender: Any, /, *args: Any, signal: Any, **kw: Any
        ) -> None:
            assigned = args[0] if args else kw.get("assigned", ())
            facts = {tp.partition for tp in assigned if tp.topic == self.facts_name}
            # one line a rebalance: a stall's log says whether one came before it
            log.info("facts partitions assigned: %s", sorted(facts))
            self.on_assigned(facts)

        @app.agent(self.inputs, name="patient-state")
        async def patient_state_agent(stream: Any) -> None:
            async for event in stream.events():
                message = event.message
                is_facts = message.topic == self.facts_name
                await self.ensure_partition(message.partition, message.offset if is_facts else None)
                if is_facts:
                    await self.maybe_checkpoint(message.partition, message.offset, message.tp)
                    self.handle_facts(message.partition, message.offset, event.value)
                else:
                    self.handle_control(message.partition, event.value)

        tick = self.settings.stream_tick_seconds
        if tick > 0:

            @app.timer(interval=tick)
            async def ticker() -> None:
                now = datetime.now(UTC).isoformat()
                body = orjson.dumps({"type": "tick", "time": now})
                for partition in self.assigned(self.control_name):
                    await self.control_topic.send(key=b"tick", value=body, partition=partition)

        @app.timer(interval=max(1.0, self.settings.stream_stall_seconds / 6))
        async def stall_watch() -> None:
            self.check_stalls()

        @app.timer(interval=max(0.5, self.settings.stream_trial_sync_seconds))
        async def trial_sync() -> None:
            await self.sync_trials()

        @app.page("/health", name="health")
        async def health(web: Any, request: Any) -> Any:
            # liveness and processing counters only: no pseudonym, no count of patients
            return web.json(self.health_summary())

        @app.page("/healthz", name="healthz")
        async def healthz(web: Any, request: Any) -> Any:
            # the liveness probe every service answers under this name (/health has counters)
            return web.json({"ok": True})

        @app.task
        async def start_health() -> None:
            self.health.start()

        @app.page("/readyz", name="readyz")
        async def readyz(web: Any, request: Any) -> Any:
            status = self.readiness()
            body = {
                **status.to_dict(),
                # what each rebuild read, in messages (its patient count stays in the log)
                "rebuilds": [
                    {k: v for k, v in r.items() if k != "patients"} for r in self.rebuilds[-12:]
                ],
                "gaps": self.gaps[-12:],
                # the local checkpoints written lately: partition, offset, patients, seconds
                "checkpoints": self.checkpoint_log[-12:],
                # the standby checkpoints of unowned partitions and how far behind they are
                "standby": None if self.standby is None else self.standby.status(),
            }
            if status.ready:
                return web.json(body)
            return web.json(body, status=503, headers={"Retry-After": "2"})

        @app.page("/metrics", name="metrics")
        async def metrics(web: Any, request: Any) -> Any:
            # lag, throughput, partitions held: no pseudonym, no count of patients (.metrics)
            from infra.metrics import CONTENT_TYPE, scrape

            from .metrics import registry_for

            if self._metrics is None:
                self._metrics = registry_for(self)
            body = scrape(self._metrics)
            return web.bytes(body, headers={"Content-Type": CONTENT_TYPE})

        @self.admin_page("/state/digest")
        def state_digest(request: Any) -> tuple[Any, dict[str, Any]]:
            return self.digest(), {}

        @self.admin_page("/state/patients/{patient}")
        def patient_page(request: Any, patient: str) -> tuple[Any, dict[str, Any]]:
            for partition in list(self.store.partitions):
                entries = self.store.patient(partition, patient)
                if entries:
                    resources = {key: canonical(entry) for key, entry in entries.items()}
                    body = {"patient": patient, "resources": resources}
                    return body, {"pseudonyms_read": [patient]}
            return {"patient": patient, "resources": {}}, {"pseudonyms_read": []}

        @self.admin_page("/state/cohorts")
        def cohorts(request: Any) -> tuple[Any, dict[str, Any]]:
            # exact member counts per saved question: site admins only, never sponsors
            return self.cohorts.summary(), {}

    def health_summary(self) -> dict[str, Any]:
        """What ``/health`` shows: that the worker runs, and counts of messages handled."""
        return {
            "ok": True,
            "applied": self.applied,
            "ignored": self.ignored,
            "rejected": self.rejected,
            "messages": self.messages,
            "ticks": self.ticks,
            "trials": sum(
                1
                for spec in list(self.trials_table.values())
                if spec and spec.get("status") == "active"
            ),
            "partitions": sorted(self.store.partitions),
            "devices": None if self.devices is None else self.devices.progress(),
            "commit_flush": self.flush_times.summary(),
            "standby": None if self.standby is None else self.standby.status(),
            "cohorts": {
                "evaluations": self.cohorts.evaluations,
                "skipped_by_first_step": self.cohorts.skipped,
                "writes": self.cohorts.writes,
            },
        }

    def admin_page(self, path: str) -> Callable[[PageHandler], PageHandler]:
        """Register a state page that needs an admin token. ``handler(request, **match)``
        returns the body and the audit record's detail (``pseudonyms_read`` for patient-level
        reads); every request, answered or refused, is audited before it is answered."""

        def register(handler: PageHandler) -> PageHandler:
            async def page(web: Any, request: Any, **params: str) -> Any:
                action = f"{request.method} {request.path}"
                query = {"query": request.query_string}
                # the revocation list is a database read: off the event loop
                principal, refusal = await asyncio.get_running_loop().run_in_executor(
                    None, self.access.authorise, request.headers.get("Authorization")
                )
                if refusal is None:
                    body, detail = handler(request, **params)
                    try:
                        await self.access.record_async(principal, action, 200, query | detail)
                    except AuditUnavailable:
                        refusal = Refusal(
                            503, "the audit log cannot be written", {"Retry-After": "2"}
                        )
                    else:
                        return web.json(body)
                else:
                    # refused anyway: a failed audit write is logged by record()
                    with contextlib.suppress(AuditUnavailable):
                        await self.access.record_async(principal, action, refusal.status, query)
                return web.json(
                    refusal.body(),
                    status=refusal.status,
                    content_type=PROBLEM,
                    headers=dict(refusal.headers),
                )

            page.__name__ = page.__qualname__ = handler.__name__
            self.app.page(path, name=handler.__name__)(page)
            return handler

        return register

    async def sync_trials(self) -> None:
        """Send each assigned partition every trial version it was not sent since the last
        assignment (re-evaluating a version it has seen writes only what was lost)."""
        if self.saved is None:
            from feasibility.saved import SavedQuestions

            self.saved = SavedQuestions(
                self.settings.kafka_bootstrap_servers, self.settings.topic(TRIALS)
            ).start()
        for trial in list(self.saved.trials.values()):
            body: bytes | None = None
            for partition in self.assigned(self.control_name):
                # Once per version per partition per assignment, whatever the trials table
                # says: after a restart or rebalance each partition evaluates every active
                # trial again, which heals records lost in flight when a worker died.
                if self._trials_sent.get((partition, trial.id), 0) >= trial.version:
                    continue
                if body is None:
                    record = orjson.loads(trial.to_json())
                    body = orjson.dumps({"type": "trial", "trial": record})
                await self.control_topic.send(
                    key=trial.id.encode(), value=body, partition=partition
                )
                self._trials_sent[(partition, trial.id)] = trial.version

    def digest(self) -> dict[str, Any]:
        return patient_state.digest(self.store.items())


def _awaiting(task: Any, limit: int = 16) -> list[str]:
    """Where a task (or coroutine) waits: its await chain, outermost first, as ``file:line
    function`` (a suspended task's ``get_stack`` gives one frame only), ending with what it
    awaits when that is not a coroutine (a future)."""
    where: list[str] = []
    awaited: Any = task.get_coro() if isinstance(task, asyncio.Task) else task
    while awaited is not None and len(where) < limit:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(awaited, a, None))),
            None,
        )
        if frame is None:
            where.append(type(awaited).__name__)
            break
        code = frame.f_code
        where.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}")
        awaited = next(
            (
                n
                for a in ("cr_await", "gi_yieldfrom", "ag_await")
                if (n := getattr(awaited, a, None)) is not None
            ),
            None,
        )
    return where


#: Dotted paths of extension functions ``f(stream_app)`` that add agents, tables, pages and
#: on_change hooks (device counters). Each must be importable on its own.
DEVICE_EXTENSION = "surveillance_stream.device_stream:"
EXTENSIONS: list[str] = [f"{DEVICE_EXTENSION}install"]


def _load(path: str) -> Callable[[StreamApp], None]:
    import importlib

    module, _, attr = path.partition(":")
    function: Callable[[StreamApp], None] = getattr(importlib.import_module(module), attr)
    return function


def create_app(settings: Settings, store: str | None = None) -> StreamApp:
    paths = [
        path
        for path in EXTENSIONS
        if settings.stream_device_counters or not path.startswith(DEVICE_EXTENSION)
    ]
    paths += [p.strip() for p in settings.stream_extensions.split(",") if p.strip()]
    return StreamApp(settings, store, [_load(path) for path in paths])
