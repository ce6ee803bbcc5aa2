"""Every topic reader survives a broker restart and tells the truth about its lag.

The reported failure: the API's facts feed died for good on a broker restart (``_UNKNOWN_PARTITION``
raised by ``get_watermark_offsets`` ended its thread) while ``/v1/feasibility/status`` kept saying
``caught_up: true, lag_messages: 0``; ad hoc answers froze until the API was restarted.

One private broker for the module and one outage for all five readers (the facts feed, the cohort
view, the saved questions, the signal monitor, the recruitment consumer), each observed on its
own: with some messages it is ready with the right content; SIGKILL the broker and within
``stale_after`` + 2 s it says it is not ready (not connected); after the restart more messages
arrive, it becomes ready again, holds them too, and its positions equal the topics' high
watermarks (lag 0).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition

from feasibility.criteria import parse_question
from feasibility.feed import FactsFeed
from feasibility.live import CohortView
from feasibility.saved import SavedQuestions, SavedTrial
from feasibility.snapshot import ColumnarSnapshot
from infra.mirror import ReaderStatus
from infra.topics import COHORT, DEVICES, FACTS, REFERENCE, SIGNALS, TRIALS
from infra.topics_admin import ensure_topics
from recruitment.consumer import RecruitmentConsumer
from recruitment.models import CohortMembership
from recruitment.runtime import build_runtime
from recruitment.settings import RecruitmentSettings
from surveillance_stream.monitor import SignalMonitor
from surveillance_stream.signals import SignalConfig
from tests.faults import PrivateBroker
from tests.generative.test_device_counters import simulate
from tests.recruitment_helpers import (
    Clock,
    as_json,
    cohort,
    fresh_database,
    patient_facts,
    practitioner,
    practitioner_key,
    trial,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STALE = 2.0  # every reader's stale_after and max_staleness here
PHASES = ("before", "after")
Record = tuple[str, bytes | None, bytes | None]  # topic, key, value
CRITERIA = {
    "schema": "concierge.criteria/1",
    "title": "Type 2 diabetes",
    "inclusion": [{"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}],
}


def _patients(phase: str, count: int = 12) -> list[str]:
    return [f"p-{phase}-{i:02d}" for i in range(count)]


@dataclass
class Reader:
    """One reader under test: what to send it in each phase and what it then holds."""

    name: str
    topics: list[str]
    start: Callable[[], object]
    stop: Callable[[], object]
    readiness: Callable[[], ReaderStatus]
    content: Callable[[], int]
    records: Mapping[str, Sequence[Record]]
    expected: dict[str, int]


@dataclass
class Seen:
    before: ReaderStatus | None = None
    before_content: int = -1
    down: ReaderStatus | None = None
    down_after: float | None = None
    after: ReaderStatus | None = None
    after_content: int = -1
    ends: dict[str, dict[int, int]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateBroker]:
    private = PrivateBroker().start()
    try:
        yield private
    finally:
        private.stop()


def _produce(bootstrap: str, records: Sequence[Record]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for topic, key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(60) == 0


def _ends(bootstrap: str, topics: list[str]) -> dict[str, dict[int, int]]:
    """The high watermarks, asked of the broker by a client of the test's own."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-ends"})
    try:
        ends: dict[str, dict[int, int]] = {}
        for topic in topics:
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            ends[topic] = {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                for p in sorted(partitions)
            }
        return ends
    finally:
        consumer.close()


def _facts_feed(bootstrap: str, prefix: str) -> Reader:
    topic = prefix + FACTS
    snapshot, lock = ColumnarSnapshot(), threading.Lock()
    feed = FactsFeed(bootstrap, topic, snapshot, lock, stale_after=STALE, max_staleness=STALE)

    def content() -> int:
        with lock:
            return int(snapshot.patient_count)

    records = {
        phase: [(topic, p.encode(), patient_facts(p).to_json()) for p in _patients(phase)]
        for phase in PHASES
    }
    return Reader(
        "facts-feed",
        [topic],
        feed.start,
        feed.stop,
        feed.readiness,
        content,
        records,
        {"before": 12, "after": 24},
    )


def _cohort_view(bootstrap: str, prefix: str) -> Reader:
    topic = prefix + COHORT
    view = CohortView(bootstrap, topic, stale_after=STALE, max_staleness=STALE)
    records = {
        phase: [(topic, f"t1|{p}".encode(), as_json(cohort("t1", p, 1))) for p in _patients(phase)]
        for phase in PHASES
    }
    return Reader(
        "cohort-view",
        [topic],
        view.start,
        view.stop,
        view.readiness,
        lambda: len(view.members("t1")),
        records,
        {"before": 12, "after": 24},
    )


def _trial(trial_id: str) -> bytes:
    return SavedTrial(
        id=trial_id,
        title="A saved question",
        criteria=parse_question(CRITERIA),
        version=1,
        sponsor="Acme",
        registered_at=datetime.now(UTC),
    ).to_json()


def _saved_questions(bootstrap: str, prefix: str) -> Reader:
    topic = prefix + TRIALS
    saved = SavedQuestions(bootstrap, topic, stale_after=STALE, max_staleness=STALE)
    records = {
        phase: [
            (topic, f"trial-{phase}-{i}".encode(), _trial(f"trial-{phase}-{i}")) for i in range(3)
        ]
        for phase in PHASES
    }
    return Reader(
        "trials",
        [topic],
        saved.start,
        saved.stop,
        saved.readiness,
        lambda: len(saved.trials),
        records,
        {"before": 3, "after": 6},
    )


def _signal_monitor(bootstrap: str, prefix: str) -> Reader:
    topic = prefix + DEVICES
    monitor = SignalMonitor(
        bootstrap,
        topic,
        prefix + SIGNALS,
        config=SignalConfig(),
        levels=("manufacturer",),
        stale_after=STALE,
        max_staleness=STALE,
    )
    sim, _ = simulate(1)
    items = list(sim.last.items())
    half = len(items) // 2

    def record(patient: str, item: Any) -> Record:
        return (topic, orjson.dumps(patient), orjson.dumps(item.to_dict()))

    def content() -> int:
        with monitor.lock:
            return len(monitor.contributions)

    records = {
        "before": [record(p, c) for p, c in items[:half]],
        "after": [record(p, c) for p, c in items[half:]],
    }
    return Reader(
        "signal-monitor",
        [topic],
        monitor.start,
        monitor.stop,
        monitor.readiness,
        content,
        records,
        {"before": half, "after": len(items)},
    )


def _recruitment_consumer(bootstrap: str, prefix: str, url: str) -> Reader:
    runtime = build_runtime(RecruitmentSettings(url=url), url=url, channels={}, clock=Clock())
    consumer = RecruitmentConsumer(
        runtime.service,
        bootstrap,
        prefix=prefix,
        group=f"recruitment-{uuid.uuid4().hex[:8]}",
        batch_size=50,
        poll_timeout=0.1,
        config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        stale_after=STALE,
        max_staleness=STALE,
    )
    runtime.consumer = consumer
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    gp = practitioner_key("gp1")

    def start() -> None:
        thread.start()

    def halt() -> None:
        stop.set()
        thread.join(30)
        consumer.close()
        runtime.close()

    def content() -> int:
        with runtime.sessions() as session:
            query = sa.select(sa.func.count()).select_from(CohortMembership)
            return int(session.scalar(query.where(CohortMembership.member.is_(True))) or 0)

    def records(phase: str) -> list[Record]:
        out: list[Record] = []
        if phase == "before":
            out += [
                (prefix + TRIALS, b"t1", as_json(trial())),
                (prefix + REFERENCE, gp.encode(), as_json(practitioner("gp1"))),
            ]
        for p in _patients(phase, 10):
            out.append((prefix + FACTS, p.encode(), patient_facts(p, gps=[gp]).to_json()))
            out.append((prefix + COHORT, f"t1|{p}".encode(), as_json(cohort("t1", p, 1))))
        return out

    def readiness() -> ReaderStatus:
        (status,) = runtime.readiness()
        return status

    topics = [prefix + t for t in (TRIALS, COHORT, FACTS, REFERENCE)]
    return Reader(
        "recruitment-consumer",
        topics,
        start,
        halt,
        readiness,
        content,
        {phase: records(phase) for phase in PHASES},
        {"before": 10, "after": 20},
    )


def _wait(readers: list[Reader], phase: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for reader in readers:
        while time.monotonic() < deadline:
            if reader.content() == reader.expected[phase] and reader.readiness().ready:
                break
            time.sleep(0.1)


@pytest.fixture(scope="module")
def outage(
    broker: PrivateBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Seen]]:
    bootstrap = broker.bootstrap
    prefix = f"restart-{uuid.uuid4().hex[:8]}."
    ensure_topics(bootstrap, prefix)
    ensure_topics(bootstrap, prefix + "r.")  # the recruitment consumer's own
    with ExitStack() as stack:
        url = stack.enter_context(fresh_database("sqlite", tmp_path_factory.mktemp("recruit")))
        readers = [
            _facts_feed(bootstrap, prefix),
            _cohort_view(bootstrap, prefix),
            _saved_questions(bootstrap, prefix),
            _signal_monitor(bootstrap, prefix),
            _recruitment_consumer(bootstrap, prefix + "r.", url),
        ]
        seen = {reader.name: Seen() for reader in readers}
        for reader in readers:
            stack.callback(reader.stop)
            _produce(bootstrap, reader.records["before"])
            reader.start()
        _wait(readers, "before", 90)
        for reader in readers:
            seen[reader.name].before = reader.readiness()
            seen[reader.name].before_content = reader.content()

        broker.kill()
        killed = time.monotonic()
        pending = list(readers)
        while pending and time.monotonic() - killed < STALE + 10:
            for reader in list(pending):
                status = reader.readiness()
                if not status.ready and not status.connected:
                    seen[reader.name].down = status
                    seen[reader.name].down_after = time.monotonic() - killed
                    pending.remove(reader)
            time.sleep(0.05)

        broker.restart()
        for reader in readers:
            _produce(bootstrap, reader.records["after"])
        _wait(readers, "after", 120)
        for reader in readers:
            seen[reader.name].after = reader.readiness()
            seen[reader.name].after_content = reader.content()
            seen[reader.name].ends = _ends(bootstrap, reader.topics)
        yield seen


READERS = ["facts-feed", "cohort-view", "trials", "signal-monitor", "recruitment-consumer"]


@pytest.mark.parametrize("name", READERS)
def test_a_reader_survives_a_broker_restart_and_tells_the_truth(
    outage: dict[str, Seen], name: str
) -> None:
    seen = outage[name]
    before, down, after = seen.before, seen.down, seen.after
    assert before is not None and before.ready, before
    assert before.name == name and before.connected and before.caught_up

    # the broker is gone: not ready, not connected, within stale_after + 2 s, and it says why
    assert down is not None, f"{name} still said connected {STALE + 10} s after the kill"
    assert seen.down_after is not None and seen.down_after <= STALE + 2, seen.down_after
    assert not down.ready and not down.connected
    assert (down.waiting_for or "").startswith("broker unreachable since "), down

    # back: ready again, holding what was sent during and after the restart
    assert after is not None and after.ready, after
    assert seen.after_content > seen.before_content
    assert after.lag == 0
    assert after.staleness_seconds is not None and after.staleness_seconds <= STALE
    assert {t: dict(p) for t, p in after.topics.items()} == seen.ends
    if len(seen.ends) == 1:
        assert after.positions == next(iter(seen.ends.values()))


@pytest.mark.parametrize("name", READERS)
def test_a_reader_holds_every_message_before_and_after_the_restart(
    outage: dict[str, Seen], name: str
) -> None:
    seen = outage[name]
    expected = {
        "facts-feed": (12, 24),
        "cohort-view": (12, 24),
        "trials": (3, 6),
        "recruitment-consumer": (10, 20),
    }
    if name == "signal-monitor":
        total = len(simulate(1)[0].last)
        expected[name] = (total // 2, total)
    assert (seen.before_content, seen.after_content) == expected[name]
