"""The readiness rule of every topic reader (infra/mirror.py), on a fake clock.

A reader is caught up when its positions reached high watermarks measured at most
``max_staleness`` seconds ago, and connected when a broker round trip succeeded within
``stale_after`` seconds with no "all brokers down" after it.
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from infra.mirror import Freshness, ReaderHealth, TopicMirror, waiting_text

T = "topic"


def positions(*offsets: int) -> dict[tuple[str, int], int]:
    return {(T, p): o for p, o in enumerate(offsets)}


def marks(*highs: int) -> dict[tuple[str, int], int]:
    return positions(*highs)


@pytest.fixture
def fresh() -> Freshness:
    rule = Freshness(stale_after=5.0, max_staleness=5.0)
    rule.contact(0.0)
    return rule


def test_never_measured_is_neither_caught_up_nor_lag_zero(fresh: Freshness) -> None:
    verdict = fresh.verdict(1.0, positions(0, 0))
    assert verdict.connected
    assert not verdict.caught_up
    assert verdict.lag is None and verdict.staleness is None
    assert waiting_text(verdict, 1.0, 5.0) == "waiting for the first high-watermark measurement"


def test_caught_up_only_against_a_recent_measurement(fresh: Freshness) -> None:
    fresh.measured(0.0, marks(10, 5))
    behind = fresh.verdict(0.5, positions(4, 5))
    assert (behind.caught_up, behind.lag) == (False, 6)
    assert waiting_text(behind, 0.5, 5.0) == "catching up: 6 messages behind"

    there = fresh.verdict(1.0, positions(10, 5))
    assert there.caught_up and there.lag == 0 and there.staleness == pytest.approx(1.0)
    # the same positions, but that measurement is now too old to vouch for them
    fresh.contact(5.9)
    old = fresh.verdict(6.0, positions(10, 5))
    assert old.connected and not old.caught_up and old.lag == 0
    assert old.staleness == pytest.approx(6.0)
    assert "no high watermarks measured" in (waiting_text(old, 6.0, 5.0) or "")


def test_under_continuous_load_lag_is_never_zero_but_the_reader_is_fresh(
    fresh: Freshness,
) -> None:
    # every half second the log has grown by 100; the reader is one refresh behind
    for step in range(1, 20):
        now = step * 0.5
        fresh.contact(now)
        fresh.measured(now, marks(100 * step))
        verdict = fresh.verdict(now + 0.01, positions(100 * (step - 1)))
        if step > 1:
            assert verdict.lag == 100
            assert verdict.caught_up
            assert verdict.staleness == pytest.approx(0.51)


def test_a_reader_that_falls_behind_for_good_is_stale(fresh: Freshness) -> None:
    for step in range(1, 40):
        now = step * 0.5
        fresh.contact(now)
        fresh.measured(now, marks(100 * step))
    verdict = fresh.verdict(20.0, positions(1000))  # reached the mark of t=5.0 only
    assert not verdict.caught_up
    assert verdict.staleness == pytest.approx(15.0)
    assert verdict.lag == 2900


def test_the_same_watermarks_measured_again_renew_freshness(fresh: Freshness) -> None:
    for step in range(100):
        fresh.contact(step)
        fresh.measured(float(step), marks(7))
    verdict = fresh.verdict(99.2, positions(7))
    assert verdict.caught_up and verdict.staleness == pytest.approx(0.2)
    assert len(fresh._marks) == 1  # nothing written: one mark, renewed


def test_marks_stay_bounded_while_far_behind() -> None:
    rule = Freshness(stale_after=5.0, max_staleness=5.0, capacity=16)
    for step in range(1000):
        rule.contact(step)
        rule.measured(float(step), marks(step + 1))
    assert len(rule._marks) <= 17
    # thinned, never wrong: credited with an older mark, the reader is only said to be staler
    staler = rule.verdict(999.5, positions(500))
    assert not staler.caught_up and staler.lag == 500
    assert staler.staleness is not None and staler.staleness >= 999.5 - 500
    verdict = rule.verdict(999.5, positions(1000))
    assert verdict.caught_up and verdict.lag == 0  # the newest mark is always kept


def test_an_emptied_partition_is_reached_without_a_message(fresh: Freshness) -> None:
    # retention removed everything: low == high == 30, nothing to read there
    fresh.measured(0.0, marks(30, 4), lows=marks(30, 0))
    verdict = fresh.verdict(0.5, positions(0, 4))
    assert verdict.caught_up and verdict.lag == 0
    assert verdict.positions == positions(30, 4)


def test_an_outage_disconnects_within_stale_after_even_with_no_data() -> None:
    rule = Freshness(stale_after=5.0, max_staleness=5.0)
    for step in range(10):
        rule.contact(step * 0.5)
        rule.measured(step * 0.5, marks(3))
    # the broker dies at 4.5: no more round trips, no data either
    assert rule.verdict(9.4, positions(3)).connected
    gone = rule.verdict(9.6, positions(3))
    assert not gone.connected and not gone.caught_up
    assert gone.down_since == pytest.approx(4.5)
    assert (waiting_text(gone, 9.6, 5.0) or "").startswith("broker unreachable since ")


def test_all_brokers_down_disconnects_at_once_until_the_next_round_trip(
    fresh: Freshness,
) -> None:
    fresh.measured(0.0, marks(3))
    fresh.down(1.0)
    verdict = fresh.verdict(1.1, positions(3))
    assert not verdict.connected and verdict.down_since == 1.0
    fresh.contact(2.0)
    assert fresh.verdict(2.1, positions(3)).connected


def test_never_connected_says_so() -> None:
    rule = Freshness(stale_after=5.0, max_staleness=5.0)
    verdict = rule.verdict(0.1, {})
    assert not verdict.connected and verdict.down_since is None
    assert waiting_text(verdict, 0.1, 5.0) == "connecting to the broker (no answer yet)"


def test_forget_drops_marks_of_other_partitions(fresh: Freshness) -> None:
    fresh.measured(0.0, marks(3))
    assert fresh.verdict(0.1, positions(3)).caught_up
    fresh.forget()  # a rebalance: the old measurement says nothing about the new assignment
    assert not fresh.verdict(0.2, positions(3)).caught_up


def test_an_answer_overtaken_by_a_newer_one_is_ignored(fresh: Freshness) -> None:
    fresh.measured(2.0, marks(20))
    fresh.measured(1.0, marks(10))
    assert fresh.verdict(2.5, positions(10)).lag == 10


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _health(clock: FakeClock) -> ReaderHealth:
    return ReaderHealth("test-reader", "unused:0", lambda: [], clock=clock)


def test_health_status_reports_every_field() -> None:
    clock = FakeClock()
    health = _health(clock)
    health.contact()
    with health._lock:
        health.freshness.measured(clock.now, {(T, 0): 9, (T, 1): 4})
    clock.now += 0.25
    status = health.status({(T, 0): 9, (T, 1): 1})
    assert not status.ready and status.connected and not status.caught_up
    assert status.lag == 3 and status.positions == {0: 9, 1: 1}
    assert status.waiting_for == "catching up: 3 messages behind"
    status = health.status({(T, 0): 9, (T, 1): 4})
    assert status.ready and status.waiting_for is None and status.topics == {T: {0: 9, 1: 4}}
    body = status.to_dict()
    assert body["positions"] == {"0": 9, "1": 4} and body["staleness_seconds"] == 0.25
    # a reason of the reader's own keeps it not ready
    assert not health.status({(T, 0): 9, (T, 1): 4}, waiting="topic x does not exist yet").ready


def test_health_error_cb_all_brokers_down() -> None:
    clock = FakeClock()
    health = _health(clock)
    health.contact()
    health.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    status = health.status({})
    assert not status.connected and not status.ready
    assert status.error is not None and "_ALL_BROKERS_DOWN" in status.error
    assert (status.waiting_for or "").startswith("broker unreachable since ")
    health.on_error(KafkaError(KafkaError._TRANSPORT, "disconnected"))  # alone: just recorded
    clock.now += 1
    health.contact()
    assert health.status({}).connected


def test_a_mirror_of_several_topics_reports_positions_per_topic() -> None:
    clock = FakeClock()
    health = _health(clock)
    health.contact()
    status = health.status({("a", 0): 3, ("b", 0): 5})
    assert status.positions == {} and status.topics == {"a": {0: 3}, "b": {0: 5}}


class FakeMessage:
    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self._partition, self._offset, self._value = partition, offset, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return T

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value


def test_a_poison_message_is_skipped_counted_and_shown_not_fatal() -> None:
    absorbed: list[bytes] = []

    def absorb(batch: list[Any]) -> None:
        for message in batch:
            if message.value() == b"poison":
                raise ValueError("patient data could be quoted here")
        absorbed.extend(m.value() for m in batch)

    mirror = TopicMirror("test", "unused:0", T, absorb)
    batch = [FakeMessage(0, 0, b"a"), FakeMessage(0, 1, b"poison"), FakeMessage(1, 0, b"b")]
    mirror._deliver(batch)  # type: ignore[arg-type]
    assert absorbed == [b"a", b"b"]
    assert mirror.unabsorbable == 1
    assert mirror._positions == {0: 2, 1: 1}  # read past it
    error = mirror.status().error or ""
    assert "topic[0]@1" in error and "ValueError" in error and "patient" not in error


def test_a_replaced_admin_client_is_released_only_when_librdkafka_is_done_with_it() -> None:
    """Reproduced in the chaos suite: on a broker restart the recruitment service aborted with
    librdkafka's "calling rd_kafka_destroy() from librdkafka owned thread is prohibited". The
    watermark thread replaced its admin client while the old one's futures were outstanding;
    librdkafka completes those on its own thread, which then held the last reference. A replaced
    client is now kept until its futures are done and a grace period has passed, and released
    from the measuring thread."""
    from concurrent.futures import Future

    from confluent_kafka.admin import AdminClient

    clock = FakeClock()
    health = _health(clock)
    admin = AdminClient({"bootstrap.servers": "127.0.0.1:9", "socket.timeout.ms": 100})
    outstanding: Future[object] = Future()
    health._pending = [outstanding]
    health._retire(admin)
    assert health._pending == []
    clock.now += 3600
    health._release_retired()  # the future is not done: kept however long it takes
    assert [a for a, _, _ in health._retired] == [admin]
    outstanding.set_result(None)
    health._release_retired()  # done now: the grace period starts
    assert [a for a, _, _ in health._retired] == [admin]
    clock.now += health.RETIRED_GRACE_SECONDS + 1
    health._release_retired()
    assert health._retired == []
