"""The signal monitor: population device counters, live statistics and the signal lifecycle.

The stream worker publishes each patient's contribution to the compacted device-contribution
topic (:mod:`.device_stream`). The monitor reads that topic from the start, keeps
:class:`~.devices.Counters` by applying ``diff(previous, new)`` per patient key (idempotent: the
same record twice is a zero diff, so a re-read after a restart rebuilds the same counters), and
re-assesses the device classes a batch touched with :func:`~.signals.assess` at most every
``min_interval`` seconds. Each (node, outcome) has a :class:`~.signals.Signal`; the statistics
move it (``detect``/``lapse``), regulators move it further (:meth:`SignalMonitor.act`). Every move
is an event on the signals topic (keyed by signal id, kept forever: the lifecycle's history, read
back on start) and an audit record.

Exactly one monitor should run per deployment (it is the signals topic's single writer); the API
runs it when ``CONCIERGE_SURVEILLANCE_MONITOR`` is true (the default).

Levels: live signals are kept for ``CONCIERGE_SIGNAL_LEVELS`` (default ``manufacturer,model,lot``);
any node of any level, and any site, can still be assessed on request (breakdowns).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from surveillance_stream.devices import (
    EXPOSED,
    LEVELS,
    UNKNOWN,
    Contribution,
    Counters,
    parse_node,
)
from surveillance_stream.signals import (
    Assessment,
    Signal,
    SignalConfig,
    State,
    act,
    assess,
    observe,
    signal_id,
)

log = logging.getLogger(__name__)

__all__ = [
    "MonitorError",
    "SignalMonitor",
    "UnknownSignal",
    "levels_from_env",
    "reproduce",
    "summary_of",
]

DEFAULT_LEVELS = ("manufacturer", "model", "lot")
BREAKDOWNS = ("manufacturer", "model", "lot", "site")


def levels_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    env = os.environ if environ is None else environ
    text = env.get("CONCIERGE_SIGNAL_LEVELS", "")
    levels = tuple(x.strip() for x in text.split(",") if x.strip()) or DEFAULT_LEVELS
    unknown = [x for x in levels if x not in LEVELS]
    if unknown:
        raise ValueError(f"CONCIERGE_SIGNAL_LEVELS: unknown levels {unknown}; one of {LEVELS}")
    return levels


class MonitorError(RuntimeError):
    """The monitor cannot answer (not started, failed, or still catching up)."""


class UnknownSignal(KeyError):
    def __init__(self, signal: str) -> None:
        super().__init__(signal)
        self.signal = signal

    def __str__(self) -> str:
        return f"no signal {self.signal!r}: list them at /v1/surveillance/signals"


def _decode(value: bytes | None) -> Contribution | None:
    if value is None:
        return None
    data = orjson.loads(value)
    if not data:
        return None
    return Contribution.from_dict(data)


def _class_of(node: str) -> str:
    return parse_node(node)[1][0]


def summary_of(signal: Signal, assessment: Assessment | None) -> dict[str, Any]:
    """The signal list's row: lifecycle state and the headline statistics."""
    row: dict[str, Any] = {
        "id": signal.id,
        "node": signal.node,
        "outcome": signal.outcome,
        "state": signal.state.value,
        "version": signal.version,
        "allowed_actions": signal.allowed_actions(),
        "updated_at": signal.updated_at,
    }
    if assessment is None:
        return {**row, "level": parse_node(signal.node)[0], "signal": False, "strength": 0.0}
    stats = assessment.to_dict()
    table = stats["disproportionality"]
    maxsprt = stats["maxsprt"]
    ebgm = stats["ebgm"] or {}
    llr, cv = maxsprt.get("llr"), maxsprt.get("cv")
    strength = (llr / cv) if llr is not None and cv else 0.0
    row.update(
        level=assessment.level,
        device_class=assessment.device_class,
        signal=assessment.signal,
        fired=list(assessment.fired),
        strength=round(float(strength), 6),
        table=stats["table"],
        prr=table.get("prr"),
        prr_ci=table.get("prr_ci"),
        ror=table.get("ror"),
        ror_ci=table.get("ror_ci"),
        ic=table.get("ic"),
        ic025=table.get("ic025"),
        ebgm=ebgm.get("ebgm"),
        eb05=ebgm.get("eb05"),
        observed=maxsprt.get("observed"),
        expected=maxsprt.get("expected"),
        llr=llr,
        cv=cv,
        at=stats["at"],
    )
    return row


def reproduce(assessment: Assessment) -> dict[str, str]:
    """The ``concierge stats`` commands that recompute the assessment's numbers."""
    config = assessment.config
    commands = {
        "disproportionality": (
            f"concierge stats disproportionality --a {assessment.a} --b {assessment.b} "
            f"--c {assessment.c} --d {assessment.d} --confidence {config.confidence}"
        ),
        "maxsprt_cv": (
            f"concierge stats maxsprt-cv --model poisson --T {config.horizon} "
            f"--M {config.min_events} --alpha {config.alpha}"
        ),
    }
    expected = assessment.maxsprt.expected
    if expected is not None and expected > 0:
        commands["maxsprt"] = (
            f"concierge stats maxsprt --model poisson --observed {assessment.a} "
            f"--expected {expected!r} --T {config.horizon} --M {config.min_events} "
            f"--alpha {config.alpha}"
        )
    table_expected = assessment.disproportionality.expected
    if assessment.ebgm is not None and table_expected:
        prior = config.prior
        commands["ebgm"] = (
            f"concierge stats ebgm --n {assessment.a} --e {table_expected!r} --prior "
            f"{prior.alpha1},{prior.beta1},{prior.alpha2},{prior.beta2},{prior.p}"
        )
    return commands


@dataclass
class _Catchup:
    targets: dict[int, int]  # partition -> high watermark at start

    def reached(self, positions: Mapping[int, int]) -> bool:
        return all(positions.get(p, 0) >= high for p, high in self.targets.items())


class SignalMonitor:
    """Counters from the contribution topic, assessments, and the signals' lifecycle."""

    def __init__(
        self,
        bootstrap: str,
        devices_topic: str,
        signals_topic: str,
        *,
        config: SignalConfig | None = None,
        levels: Iterable[str] | None = None,
        audit: Any = None,
        min_interval: float = 0.1,
        sweep_seconds: float = 5.0,
        clock: Any = None,
        prepare: Any = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.devices_topic = devices_topic
        self.signals_topic = signals_topic
        self.config = config or SignalConfig.from_env()
        self.levels = tuple(levels) if levels is not None else levels_from_env()
        self.audit = audit
        self.min_interval = min_interval
        self.sweep_seconds = sweep_seconds
        self.clock = clock or (lambda: datetime.now(UTC))
        #: called first in the monitor's thread (creating missing topics)
        self.prepare = prepare
        self.lock = threading.RLock()
        self.counters = Counters()
        self.contributions: dict[str, Contribution] = {}
        self.assessments: dict[str, Assessment] = {}
        self.signals: dict[str, Signal] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        #: processing-time history per signal: (iso time, observed, expected, llr, cv, signal)
        self.trace: dict[str, deque[dict[str, Any]]] = {}
        self.applied = 0
        self.assessed_at: datetime | None = None
        self.assessment_seconds = 0.0
        self.ready = False
        self.error: str | None = None
        self._dirty: set[str] = set()  # device classes changed since the last sweep
        self._touched: set[str] = set()  # nodes whose own counts changed since the last pass
        self._all_dirty = True
        self._day: date | None = None
        self._positions: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None

    # ------------------------------------------------------------------ running

    def start(self) -> SignalMonitor:
        self._thread = threading.Thread(target=self._run, name="signal-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._producer is not None:
            self._producer.flush(10)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready or self.error:
                return self.ready
            time.sleep(0.05)
        return self.ready

    def _run(self) -> None:
        try:
            if self.prepare is not None:
                self.prepare()
            self._producer = Producer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "enable.idempotence": True,
                    "linger.ms": 1,
                }
            )
            self._restore()
            consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": "concierge-signal-monitor-unused",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 20,
                }
            )
            partitions = self._partitions(consumer, self.devices_topic)
            catchup = _Catchup(
                {p: consumer.get_watermark_offsets(TopicPartition(self.devices_topic, p),
                                                   timeout=30)[1] for p in partitions}
            )  # fmt: skip
            consumer.assign(
                [TopicPartition(self.devices_topic, p, OFFSET_BEGINNING) for p in partitions]
            )
            last = swept = 0.0
            while not self._stop.is_set():
                messages = consumer.consume(5000, timeout=0.05)
                if messages:
                    self.absorb(messages)
                if not self.ready and catchup.reached(self._positions):
                    self.ready = True
                    log.info("signal monitor caught up: %s contributions", len(self.contributions))
                if not self.ready:
                    continue
                now = time.monotonic()
                if (self._dirty or self._all_dirty) and now - swept >= self.sweep_seconds:
                    last = swept = now
                    self.reassess(sweep=True)
                elif self._touched and now - last >= self.min_interval:
                    last = now
                    self.reassess(sweep=False)
            consumer.close()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("signal monitor stopped")

    @staticmethod
    def _partitions(consumer: Consumer, topic: str) -> list[int]:
        deadline = time.monotonic() + 30
        while True:
            metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is not None and metadata.error is None and metadata.partitions:
                return sorted(metadata.partitions)
            if time.monotonic() > deadline:
                raise MonitorError(f"topic {topic} is not available")
            time.sleep(0.5)

    def _restore(self) -> None:
        """Read the signals topic to its end: each signal's state and its events."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "concierge-signal-monitor-unused",
                "enable.auto.commit": False,
            }
        )
        partitions = self._partitions(consumer, self.signals_topic)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(self.signals_topic, p), timeout=30)[1]
            for p in partitions
        }
        consumer.assign(
            [TopicPartition(self.signals_topic, p, OFFSET_BEGINNING) for p in partitions]
        )
        seen = {p: 0 for p in partitions}
        while any(seen[p] < ends[p] for p in partitions):
            for message in consumer.consume(1000, timeout=0.5):
                if message.error() is not None:
                    continue
                seen[int(message.partition() or 0)] = int(message.offset() or 0) + 1
                body = message.value()
                if body:
                    self._remember(orjson.loads(body))
        consumer.close()
        log.info("signal monitor restored %s signals", len(self.signals))

    def _remember(self, event: Mapping[str, Any]) -> None:
        identifier = str(event["signal"])
        self.events.setdefault(identifier, []).append(dict(event))
        self.signals[identifier] = Signal(
            id=identifier,
            node=str(event["node"]),
            outcome=str(event["outcome"]),
            state=State(event["to"]),
            version=int(event["version"]),
            statistics=event.get("statistics"),
            updated_at=event.get("at"),
        )

    # ------------------------------------------------------------------ counters

    def absorb(self, messages: Iterable[Any]) -> None:
        """Apply a batch of contribution records (``diff(previous, new)`` per patient)."""
        with self.lock:
            for message in messages:
                if message.error() is not None:
                    continue
                self._positions[int(message.partition() or 0)] = int(message.offset() or 0) + 1
                raw = message.key() or b""
                patient = orjson.loads(raw) if raw.startswith(b'"') else raw.decode()
                new = _decode(message.value())
                old = self.contributions.get(patient)
                if old == new:
                    continue
                delta = self.counters.update(old, new)
                if new is None:
                    self.contributions.pop(patient, None)
                else:
                    self.contributions[patient] = new
                self.applied += 1
                for key in (*delta.counts, *delta.person_time):
                    self._dirty.add(_class_of(key[1]))
                    if key[0] in self.levels:
                        self._touched.add(key[1])

    # ------------------------------------------------------------------ assessment

    def reassess(self, sweep: bool = True) -> int:
        """Assess (node, outcome) pairs at the live levels and move the signals; returns the
        number of assessments made.

        A sweep assesses every node of the device classes changed since the last sweep (a
        change to one node moves the comparator of every other node of its class). Between
        sweeps (every ``sweep_seconds``), only the nodes whose own counts changed are assessed,
        every ``min_interval``: their statistics are fresh per event, while the small drift of
        the others' comparators waits for the next sweep. This keeps a pass proportional to what
        changed, not to the number of lots in a class.
        """
        started = time.perf_counter()
        moved: list[dict[str, Any]] = []
        with self.lock:
            day = self.counters.latest_day
            # the first pass, or a new evaluation day (person-time moves everywhere): all of it
            everything = self._all_dirty or day != self._day or not self.assessments
            sweep = sweep or everything
            touched, self._touched = self._touched, set()
            dirty: set[str] = set()
            if sweep:
                dirty, self._dirty, self._all_dirty = self._dirty, set(), False
            self._day = day

            def wanted(node: str) -> bool:
                return _class_of(node) in dirty if sweep else node in touched

            now = self.clock()
            fresh: dict[str, Assessment] = {}
            for level in self.levels:
                for _, node in self.counters.nodes(level):
                    if not everything and not wanted(node):
                        continue
                    for outcome in self.counters.outcome_names(level, node):
                        fresh[signal_id(node, outcome)] = assess(
                            self.counters, node, outcome, at=day, config=self.config
                        )
            # nodes or outcomes that vanished (retracted): assessed at zero, so signals lapse
            for identifier, old in list(self.assessments.items()):
                if identifier in fresh:
                    continue
                if not everything and not wanted(old.node):
                    continue
                if self.counters.count(old.level, old.node, EXPOSED) == 0 and (
                    self.signals.get(identifier) is None
                    or self.signals[identifier].state is State.NONE
                ):
                    del self.assessments[identifier]
                    continue
                fresh[identifier] = assess(
                    self.counters, old.node, old.outcome, at=day, config=self.config
                )
            for identifier, result in fresh.items():
                previous = self.assessments.get(identifier)
                self.assessments[identifier] = result
                if previous is None or (previous.a, previous.maxsprt.expected) != (
                    result.a,
                    result.maxsprt.expected,
                ):
                    self._trace(identifier, result, now)
                signal = self.signals.get(identifier) or Signal.new(result.node, result.outcome)
                signal, event = observe(signal, result, at=now)
                if event is not None:
                    self._publish(event)
                    moved.append(event)
                    self._remember(event)
            self.assessed_at = now
            self.assessment_seconds = time.perf_counter() - started
        for event in moved:
            self._audit(event)
        if moved and self._producer is not None:
            self._producer.flush(10)
        return len(fresh)

    def _trace(self, identifier: str, result: Assessment, now: datetime) -> None:
        points = self.trace.setdefault(identifier, deque(maxlen=500))
        points.append(
            {
                "at": now.isoformat(),
                "observed": result.a,
                "expected": result.maxsprt.expected,
                "llr": result.maxsprt.llr,
                "cv": result.maxsprt.cv,
                "signal": result.signal,
            }
        )

    def _publish(self, event: Mapping[str, Any]) -> None:
        if self._producer is None:
            return
        self._producer.produce(
            self.signals_topic, key=str(event["signal"]).encode(), value=orjson.dumps(event)
        )
        self._producer.poll(0)

    def _audit(self, event: Mapping[str, Any]) -> None:
        if self.audit is None:
            return
        actor = str(event.get("actor") or "system")
        self.audit.append(
            actor,
            "system" if actor == "system" else "regulator",
            "surveillance",
            f"signal.{event['action']}",
            {
                "signal": event["signal"],
                "node": event["node"],
                "outcome": event["outcome"],
                "from": event["from"],
                "to": event["to"],
                "version": event["version"],
                "reason": event.get("reason", ""),
            },
        )

    # ------------------------------------------------------------------ regulator actions

    def act(self, identifier: str, action: str, *, actor: str, reason: str = "") -> Signal:
        """A regulator's lifecycle action; published (and flushed) before it is acknowledged.
        Raises :class:`UnknownSignal` or :class:`~.signals.IllegalTransition`."""
        self._require_ready()
        with self.lock:
            assessment = self.assessments.get(identifier)
            signal = self.signals.get(identifier)
            if signal is None:
                if assessment is None:
                    raise UnknownSignal(identifier)
                signal = Signal.new(assessment.node, assessment.outcome)
            new, event = act(
                signal, action, actor=actor, at=self.clock(), reason=reason, assessment=assessment
            )
            self._publish(event)
            if self._producer is not None and self._producer.flush(10) > 0:
                raise MonitorError("the signals topic did not acknowledge the event in 10 s")
            self._remember(event)
        self._audit(event)
        return new

    # ------------------------------------------------------------------ queries

    def _require_ready(self) -> None:
        if self.error:
            raise MonitorError(f"the signal monitor failed: {self.error}")
        if not self.ready:
            raise MonitorError("the signal monitor is still reading the device counters")

    def status(self) -> dict[str, Any]:
        with self.lock:
            latest = self.counters.latest_day
            return {
                "ready": self.ready,
                "error": self.error,
                "patients": len(self.contributions),
                "contributions_applied": self.applied,
                "latest_day": None if latest is None else latest.isoformat(),
                "updated_at": None if self.assessed_at is None else self.assessed_at.isoformat(),
                "assessment_seconds": round(self.assessment_seconds, 4),
                "levels": list(self.levels),
                "signals": len(self.assessments),
                "signalling": sum(1 for a in self.assessments.values() if a.signal),
                "config": self.config.to_dict(),
            }

    def _signal(self, identifier: str) -> tuple[Signal, Assessment | None]:
        assessment = self.assessments.get(identifier)
        signal = self.signals.get(identifier)
        if signal is None:
            if assessment is None:
                raise UnknownSignal(identifier)
            signal = Signal.new(assessment.node, assessment.outcome)
        return signal, assessment

    def rows(self, level: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Every live (node, outcome), ranked by strength (the MaxSPRT's LLR over its critical
        value), signalling ones first."""
        self._require_ready()
        with self.lock:
            identifiers = set(self.assessments) | set(self.signals)
            rows = []
            for identifier in identifiers:
                signal, assessment = self._signal(identifier)
                row = summary_of(signal, assessment)
                if level is not None and row["level"] != level:
                    continue
                if state is not None and row["state"] != state:
                    continue
                rows.append(row)
        rows.sort(key=lambda r: (not r["signal"], -float(r["strength"]), r["node"], r["outcome"]))
        return rows

    def detail(self, identifier: str) -> dict[str, Any]:
        self._require_ready()
        with self.lock:
            signal, assessment = self._signal(identifier)
            return {
                "signal": summary_of(signal, assessment),
                "assessment": None if assessment is None else assessment.to_dict(),
                "events": list(self.events.get(identifier, [])),
                "reproduce": {} if assessment is None else reproduce(assessment),
                "trace": list(self.trace.get(identifier, [])),
            }

    def history(self, identifier: str) -> dict[str, Any]:
        """Observed vs expected, cumulative by implant quarter, with the boundary."""
        self._require_ready()
        with self.lock:
            signal, _ = self._signal(identifier)
            level = parse_node(signal.node)[0]
            periods = [p for p in self.counters.periods(level, signal.node) if p != UNKNOWN]
            day = self.counters.latest_day
            points = []
            for period in periods:
                result = assess(
                    self.counters,
                    signal.node,
                    signal.outcome,
                    f"..{period}",
                    at=day,
                    config=self.config,
                )
                points.append(
                    {
                        "period": period,
                        "observed": result.a,
                        "expected": result.maxsprt.expected,
                        "llr": result.maxsprt.llr,
                        "cv": result.maxsprt.cv,
                        "signal": result.maxsprt.signal,
                    }
                )
        return {"signal": identifier, "node": signal.node, "outcome": signal.outcome,
                "points": points}  # fmt: skip

    def breakdown(self, identifier: str, by: str, protect: Any) -> dict[str, Any]:
        """The signal's outcome by manufacturer, model, lot (the nodes under or at the signal's
        node) or site; patient counts through ``protect`` (small-number rules)."""
        if by not in BREAKDOWNS:
            raise ValueError(f"breakdown by one of {', '.join(BREAKDOWNS)}, not {by!r}")
        self._require_ready()
        with self.lock:
            signal, _ = self._signal(identifier)
            level, parts = parse_node(signal.node)
            day = self.counters.latest_day
            rows = []
            if by == "site":
                for site in self.counters.sites(level, signal.node):
                    result = assess(
                        self.counters, signal.node, signal.outcome, site=site, at=day,
                        config=self.config,
                    )  # fmt: skip
                    rows.append(self._row(site, signal.node, result, protect))
            else:
                # deeper levels: the nodes under the signal's; its own level and above: the
                # nodes of the same class (the comparison the 2x2 makes)
                prefix = parts if LEVELS.index(by) >= len(parts) else parts[:1]
                for _, node in self.counters.nodes(by):
                    node_parts = parse_node(node)[1]
                    if node_parts[: len(prefix)] != prefix:
                        continue
                    result = assess(self.counters, node, signal.outcome, at=day, config=self.config)
                    rows.append(self._row(node_parts[-1], node, result, protect))
        return {"signal": identifier, "node": signal.node, "outcome": signal.outcome, "by": by,
                "rows": rows}  # fmt: skip

    @staticmethod
    def _row(key: str, node: str, result: Assessment, protect: Any) -> dict[str, Any]:
        table = result.disproportionality
        exposed, with_outcome = protect(result.a + result.b), protect(result.a)
        # a ratio over a withheld count would give the count away (PRR 0 means a = 0)
        withheld = isinstance(exposed, str) or isinstance(with_outcome, str)
        return {
            "key": key,
            "node": node,
            "exposed": exposed,
            "with_outcome": with_outcome,
            "prr": None if withheld else table.prr,
            "prr_ci": [None, None] if withheld else list(table.prr_ci),
            "withheld": withheld,
        }

    def provenance(self, identifier: str, limit: int = 100) -> dict[str, Any]:
        """The pseudonymised patients and source resource versions behind the signal's outcome
        count (``a``): each exposure's records (``role: exposure``; a revision procedure is one,
        since it names the device) and the outcome records that are not (``role: outcome``)."""
        self._require_ready()
        with self.lock:
            signal, _ = self._signal(identifier)
            level = parse_node(signal.node)[0]
            sources: list[dict[str, Any]] = []
            patients = self.counters.patients_of(level, signal.node, signal.outcome)
            exposure_keys: set[Any] = set()
            for patient in patients:
                mine = self.contributions.get(patient)
                if mine is None:
                    continue
                for key, found in mine.sources:
                    if key[0] != level or key[1] != signal.node:
                        continue
                    if key[2] == EXPOSED:
                        exposure_keys.update((patient, s.resource) for s in found)
                for key, found in mine.sources:
                    if key[:3] != (level, signal.node, signal.outcome):
                        continue
                    for source in found:
                        role = "exposure" if (patient, source.resource) in exposure_keys else (
                            "outcome")  # fmt: skip
                        sources.append({"patient": patient, "role": role, **source.to_dict()})
            unique = {(s["patient"], s["resource"], s["version"]): s for s in sources}
            ordered = sorted(unique.values(), key=lambda s: (s["patient"], s["resource"]))
        return {
            "signal": identifier,
            "node": signal.node,
            "outcome": signal.outcome,
            "patients": len(patients),
            "count": len(ordered),
            "sources": ordered[:limit],
            "truncated": len(ordered) > limit,
        }
