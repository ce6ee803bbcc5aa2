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

Exactly one monitor should run per deployment (it is the signals topic's single writer):
``concierge monitor`` runs it as a service of its own, which API processes forward
``/v1/surveillance`` to; a single API process runs it itself when
``CONCIERGE_SURVEILLANCE_MONITOR`` is true (the demo).

Levels: live signals are kept for ``CONCIERGE_SIGNAL_LEVELS`` (default ``manufacturer,model,lot``);
any node of any level, and any site, can still be assessed on request (breakdowns).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import orjson
from confluent_kafka import Message, Producer

from core.contracts.signals import SignalEvent
from infra.kafka_log import routed
from infra.mirror import ReaderStatus, TopicMirror
from surveillance_stream.devices import (
    EXPOSED,
    LEVELS,
    UNKNOWN,
    Contribution,
    Counters,
    parse_node,
)
from surveillance_stream.report import ReportData
from surveillance_stream.scan import SCAN_LOOK_SCHEMA, ScanPlan, build_trees, run_look
from surveillance_stream.settings import SurveillanceSettings
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
from surveillance_stream.statistics import poisson_llr

log = logging.getLogger(__name__)

__all__ = [
    "MonitorError",
    "SignalMonitor",
    "UnknownSignal",
    "reproduce",
    "summary_of",
]

BREAKDOWNS = ("manufacturer", "model", "lot", "site")


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
    strength = assessment.strength
    adjustment = stats.get("adjustment") or {}
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
        expected_crude=maxsprt.get("expected_crude"),
        adjusted_by=adjustment.get("by", []),
        llr=llr,
        cv=cv,
        method=assessment.method,
        controls=[c.get("control") for c in stats.get("controls", [])],
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
    if assessment.binomial is not None:
        found = assessment.binomial
        commands["binomial_cv"] = (
            f"concierge stats maxsprt-cv --model binomial --N {found.max_events} "
            f"--z {found.z!r} --M {found.min_events} --alpha {config.alpha}"
        )
    adjustment = assessment.adjustment
    table_expected = (
        adjustment.table_expected
        if adjustment is not None and adjustment.table_expected is not None
        else assessment.disproportionality.expected
    )
    if assessment.ebgm is not None and table_expected:
        prior = config.prior
        commands["ebgm"] = (
            f"concierge stats ebgm --n {assessment.a} --e {table_expected!r} --prior "
            f"{prior.alpha1},{prior.beta1},{prior.alpha2},{prior.beta2},{prior.p}"
        )
    return commands


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
        stale_after: float = 5.0,
        max_staleness: float = 5.0,
        plan: ScanPlan | None = None,
        scan: bool | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.devices_topic = devices_topic
        self.signals_topic = signals_topic
        if config is None or levels is None or plan is None or scan is None:
            section = SurveillanceSettings()  # what the environment says
            config = config or section.signal_config()
            levels = section.levels if levels is None else levels
            plan = plan or section.scan_plan()
            scan = section.scan if scan is None else scan
        self.config = config
        #: the tree-based scan's looks (scheduled when ``scan`` is on; on demand always)
        self.plan = plan
        self.scheduled_scans = scan
        self.looks: list[dict[str, Any]] = []
        #: per signal id, what the tree scan said at the look where the pair signalled
        self.tree_flags: dict[str, dict[str, Any]] = {}
        #: the latest scan (scheduled or on demand), for the API and the dashboard
        self.last_scan: dict[str, Any] | None = None
        self.scan_seconds = 0.0
        self._scan_lock = threading.Lock()
        #: called with every signal event once it is on the signals topic (notifications)
        self.listeners: list[Callable[[Mapping[str, Any]], None]] = []
        self.notify_failures = 0
        self.notify_error: str | None = None
        self._scan_thread: threading.Thread | None = None
        self._last_look_started = -float("inf")
        self.levels = tuple(levels)
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
        #: the monitor's own last failure (its readers' are in :meth:`readiness`)
        self.error: str | None = None
        self.restored = False
        self._ready_by_hand: bool | None = None
        self._prepared = False
        self._dirty: set[str] = set()  # device classes changed since the last sweep
        self._touched: set[str] = set()  # nodes whose own counts changed since the last pass
        self._all_dirty = True
        self._day: date | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: Producer | None = None
        #: the contribution topic (counters) and the signals topic (restored on start)
        self.devices = TopicMirror(
            "signal-monitor",
            bootstrap,
            devices_topic,
            self.absorb,
            poll_batch=5000,
            poll_timeout=0.05,
            config={"fetch.wait.max.ms": 20},
            stale_after=stale_after,
            max_staleness=max_staleness,
        )
        self.history_reader = TopicMirror(
            "signal-history",
            bootstrap,
            signals_topic,
            self._restore,
            poll_batch=1000,
            stale_after=stale_after,
            max_staleness=max_staleness,
        )

    # ------------------------------------------------------------------ running

    @property
    def ready(self) -> bool:
        """The signals' history restored and the counters connected and fresh; a monitor fed by
        hand (never started, as in unit tests) is ready when it is said to be."""
        if self._ready_by_hand is not None:
            return self._ready_by_hand
        return self.restored and self.devices.status().ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready_by_hand = value

    def readiness(self) -> ReaderStatus:
        """The counters' reader; while the history is being restored, not ready and says so."""
        status = self.devices.status()
        if self.restored:
            return status
        history = self.history_reader.status()
        return replace(
            status,
            ready=False,
            waiting_for=f"restoring the signals' history: {history.waiting_for or 'reading'}",
            error=history.error or status.error,
        )

    def start(self) -> SignalMonitor:
        self._thread = threading.Thread(target=self._run, name="signal-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._scan_thread is not None:
            self._scan_thread.join(60)
        self.history_reader.stop()
        self.devices.stop()
        if self._producer is not None:
            self._producer.flush(10)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                return True
            time.sleep(0.05)
        return self.ready

    def _run(self) -> None:
        """Prepare (create missing topics), restore the signals' history, then keep the counters
        (the mirror's thread) and assess them here, publishing only while connected and fresh.
        Anything that fails is recorded and tried again."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._step()
                failures = 0
            except Exception as exc:  # recorded (status, error), backed off, carried on from
                failures += 1
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("signal monitor: %s; trying again", type(exc).__name__)
                self._stop.wait(min(5.0, 0.5 * 2 ** min(failures - 1, 4)))

    def _step(self) -> None:
        if self.prepare is not None and not self._prepared:
            self.prepare()
            self._prepared = True
        if self._producer is None:
            self._producer = Producer(
                routed(
                    {
                        "bootstrap.servers": self.bootstrap,
                        "enable.idempotence": True,
                        "linger.ms": 1,
                    }
                )
            )
        if not self.restored:
            # the monitor is the signals topic's single writer: it reads the history to its end
            # once (the lifecycle's state), then remembers what it writes itself
            self.history_reader.start()
            if not self.history_reader.wait_ready(0.5):
                return
            self.history_reader.stop()
            self.restored = True
            log.info("signal monitor restored %s signals", len(self.signals))
            self.devices.start()
        last = swept = 0.0
        caught_up = False
        while not self._stop.is_set():
            if not self.ready:  # lost the broker, or behind: no assessment, no event
                caught_up = False
                self._stop.wait(0.05)
                continue
            if not caught_up:
                caught_up = True
                log.info("signal monitor caught up: %s contributions", len(self.contributions))
            now = time.monotonic()
            if (self._dirty or self._all_dirty) and now - swept >= self.sweep_seconds:
                last = swept = now
                self.reassess(sweep=True)
            elif self._touched and now - last >= self.min_interval:
                last = now
                self.reassess(sweep=False)
            elif self.scheduled_scans and not self._scanning() and self._look_due():
                # a look takes seconds (Monte Carlo): on a thread of its own, so the
                # statistics stay fresh per event meanwhile
                self._scan_thread = threading.Thread(
                    target=self._scheduled_look, name="signal-monitor-scan", daemon=True
                )
                self._scan_thread.start()
            else:
                self._stop.wait(min(0.05, self.min_interval))

    def _restore(self, messages: list[Message]) -> None:
        """Each signal's state and its events, from the signals topic."""
        with self.lock:
            for message in messages:
                body = message.value()
                if not body:
                    continue
                event = orjson.loads(body)
                if event.get("schema") == SCAN_LOOK_SCHEMA:
                    self._remember_look(event)
                else:
                    self._remember(event)

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
        moved: list[SignalEvent] = []
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
                return node in touched or (sweep and _class_of(node) in dirty)

            now = self.clock()
            fresh: dict[str, Assessment] = {}
            for level in self.levels:
                for _, node in self.counters.nodes(level):
                    if not everything and not wanted(node):
                        continue
                    for outcome in self.counters.outcome_names(level, node):
                        identifier = signal_id(node, outcome)
                        fresh[identifier] = assess(
                            self.counters, node, outcome, at=day, config=self.config,
                            tree=self.tree_flags.get(identifier),
                        )  # fmt: skip
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
                    self.counters, old.node, old.outcome, at=day, config=self.config,
                    tree=self.tree_flags.get(identifier),
                )  # fmt: skip
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

    # ------------------------------------------------------------------ the tree scan

    def _scanning(self) -> bool:
        return self._scan_thread is not None and self._scan_thread.is_alive()

    def _scheduled_look(self) -> None:
        self._last_look_started = time.monotonic()
        try:
            self.scan(spend=True)
        except Exception as exc:  # recorded and tried again at the next due check
            self.error = f"scan: {type(exc).__name__}: {exc}"
            log.exception("signal monitor: the scheduled look failed")
            self._stop.wait(5.0)

    def _look_due(self) -> bool:
        if time.monotonic() - self._last_look_started < self.plan.min_seconds:
            return False
        latest = self.counters.latest_day
        last = date.fromisoformat(self.looks[-1]["data_day"]) if self.looks else None
        return bool(self.contributions) and self.plan.due(last, latest)

    def _remember_look(self, event: Mapping[str, Any]) -> None:
        self.looks.append(dict(event))
        self.looks.sort(key=lambda look: int(look["look"]))
        for cut in event.get("signals", ()):
            identifier = signal_id(str(cut["node"]), str(cut["outcome"]))
            self.tree_flags.setdefault(identifier, self._flag(event, cut))
        self.last_scan = dict(event)

    def _flag(self, look: Mapping[str, Any], cut: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "description": "the tree-based scan (conditional Poisson, Monte Carlo p-value) over "
            "every node and outcome, at a look of the alpha-spending plan",
            "look": look["look"],
            "data_day": look["data_day"],
            "p_value": cut["p_value"],
            "llr": cut["llr"],
            "observed": cut["observed"],
            "expected": cut["expected"],
            "alpha_at_look": look["alpha"],
            "alpha_spent": look["alpha_spent"],
            "alpha": self.plan.spending.alpha,
            "replications": look["replications"],
        }

    def scan(self, *, spend: bool = False, seed: int | None = None) -> dict[str, Any]:
        """Run the tree-based scan now. With ``spend`` it is the plan's next look (published on
        the signals topic; its signals pass family-wise control and move the signals); without,
        an exploratory scan compared with the next look's alpha that signals nothing."""
        self._require_ready()
        with self._scan_lock:
            started = time.perf_counter()
            with self.lock:
                day = self.counters.latest_day
                trees = build_trees(self.counters, at=day, by=self.config.strata)
                look = len(self.looks) + 1
            result, alpha = run_look(trees, self.plan, look, seed=seed, spend=spend)
            outcome_of = {tree.label: tree.label.split(" · ", 1)[1] for tree in trees}
            cuts = [
                {**cut.to_dict(), "outcome": outcome_of[cut.tree],
                 "level": parse_node(cut.node)[0]}
                for cut in result.cuts
            ]  # fmt: skip
            event: dict[str, Any] = {
                "schema": SCAN_LOOK_SCHEMA,
                "look": look if spend else None,
                "spends_alpha": spend,
                "at": self.clock().isoformat(),
                "data_day": None if day is None else day.isoformat(),
                "variant": "conditional Poisson tree-based scan",
                "strata": list(self.config.strata),
                "alpha": alpha,
                "alpha_spent": self.plan.spending.spent(look) if spend else
                self.plan.spending.spent(look - 1),
                "plan": self.plan.to_dict(),
                "statistic": result.statistic,
                "replications": result.replications,
                "planned_replications": result.planned,
                "complete": result.complete,
                "seed": seed,
                "trees": len(trees),
                "cuts": len(cuts),
                "signals": [c for c in cuts if c["signal"]],
                "top": cuts[:200],
            }  # fmt: skip
            self.scan_seconds = time.perf_counter() - started
            if spend:
                key = f"scan-look-{look}"
                if self._producer is not None:
                    self._producer.produce(
                        self.signals_topic, key=key.encode(), value=orjson.dumps(event)
                    )
                    if self._producer.flush(10) > 0:
                        raise MonitorError("the signals topic did not acknowledge the look")
                with self.lock:
                    self._remember_look(event)
                    for cut in event["signals"]:
                        if cut["level"] in self.levels:
                            self._touched.add(str(cut["node"]))
                if self.audit is not None:
                    self.audit.append(
                        "system", "system", "surveillance", "scan.look",
                        {"look": look, "alpha": alpha, "signals": len(event["signals"])},
                    )  # fmt: skip
            else:
                self.last_scan = event
            return event

    def scan_view(self) -> dict[str, Any]:
        """The latest scan, the looks so far and the plan."""
        self._require_ready()
        with self.lock:
            return {
                "plan": self.plan.to_dict(),
                "scheduled": self.scheduled_scans,
                "looks": [
                    {
                        k: look.get(k)
                        for k in (
                            "look",
                            "at",
                            "data_day",
                            "alpha",
                            "alpha_spent",
                            "statistic",
                            "replications",
                            "complete",
                        )
                    }
                    | {"signals": len(look.get("signals", ()))}
                    for look in self.looks
                ],
                "latest": self.last_scan,
                "scan_seconds": round(self.scan_seconds, 3),
            }

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

    def _notify(self, event: Mapping[str, Any]) -> None:
        """Hand an event (already on the signals topic) to the listeners (notifications); a
        failure is counted and shown in :meth:`status`, and the event stays on the topic."""
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as exc:  # recorded: status() says notifications are failing
                self.notify_failures += 1
                self.notify_error = f"{type(exc).__name__}: {exc}"
                log.exception("signal monitor: a notification listener failed")

    def _audit(self, event: Mapping[str, Any]) -> None:
        self._notify(event)
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
        if self.ready:
            return
        reason = self.readiness().waiting_for if self._thread is not None else "not started"
        raise MonitorError(f"the signal monitor is not ready: {reason}")

    def status(self) -> dict[str, Any]:
        with self.lock:
            latest = self.counters.latest_day
            return {
                "ready": self.ready,
                "error": self.error,
                "reader": self.readiness().to_dict(),
                "patients": len(self.contributions),
                "contributions_applied": self.applied,
                "latest_day": None if latest is None else latest.isoformat(),
                "updated_at": None if self.assessed_at is None else self.assessed_at.isoformat(),
                "assessment_seconds": round(self.assessment_seconds, 4),
                "levels": list(self.levels),
                "signals": len(self.assessments),
                "signalling": sum(1 for a in self.assessments.values() if a.signal),
                "notify_failures": self.notify_failures,
                "notify_error": self.notify_error,
                "looks": len(self.looks),
                "alpha_spent": self.looks[-1]["alpha_spent"] if self.looks else 0.0,
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
        """Observed vs expected, cumulative by implant quarter, with the boundary.

        Each quarter's implant cohort is assessed on its own (its adjusted expectation from the
        comparator's same-quarter cohort) and the points are running sums, so neither line can
        fall: an earlier cumulative assessment against ``..quarter`` used the comparator's rate
        over all cohorts so far, which moved as later cohorts joined, and the expected line
        dipped. The LLR is the Poisson MaxSPRT's at each point's sums; ``expected_crude`` is
        the same sum of crude expectations.
        """
        self._require_ready()
        with self.lock:
            signal, _ = self._signal(identifier)
            level = parse_node(signal.node)[0]
            periods = [p for p in self.counters.periods(level, signal.node) if p != UNKNOWN]
            day = self.counters.latest_day
            cv = self.config.critical_value()
            points = []
            observed, expected, crude = 0, 0.0, 0.0
            for period in periods:
                result = assess(
                    self.counters, signal.node, signal.outcome, period, at=day,
                    config=self.config,
                )  # fmt: skip
                observed += result.a
                expected += result.maxsprt.expected or 0.0
                crude += result.maxsprt.expected_crude or 0.0
                llr = poisson_llr(observed, expected) if expected > 0 else None
                fires = (
                    llr is not None and cv is not None and observed >= self.config.min_events
                    and llr >= cv.cv
                )  # fmt: skip
                points.append(
                    {
                        "period": period,
                        "observed": observed,
                        "expected": expected,
                        "expected_crude": crude,
                        "llr": llr,
                        "cv": None if cv is None else cv.cv,
                        "signal": fires,
                    }
                )
        return {"signal": identifier, "node": signal.node, "outcome": signal.outcome,
                "points": points}  # fmt: skip

    def report_data(self, identifier: str, base_url: str = "") -> ReportData:
        """Everything a signal's report shows (:mod:`.report`), read at one moment."""
        self._require_ready()
        with self.lock:
            detail = self.detail(identifier)
            history = self.history(identifier)
            provenance = self.provenance(identifier, limit=100_000)
            scan = None if self.last_scan is None else dict(self.last_scan)
        return ReportData(
            detail=detail,
            history=history,
            provenance=provenance,
            scan=scan,
            generated_at=self.clock().isoformat(),
            base_url=base_url,
        )

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
