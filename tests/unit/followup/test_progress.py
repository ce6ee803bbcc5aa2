"""The standing of the follow-up tables (``followup.progress.judge``): the consumer's record in
the database and the readiness rule applied to its committed offsets, decided without a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from followup.progress import Recorded, judge
from infra.mirror import Freshness, ReaderHealth

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
TOPIC = "concierge.facts.v1"


class Clock:
    def __init__(self) -> None:
        self.at = 100.0

    def __call__(self) -> float:
        return self.at


def health(clock: Clock) -> ReaderHealth:
    """A ReaderHealth fed by hand (its thread is never started)."""
    found = ReaderHealth("followup-consumer", "unused:0", list, max_staleness=2.0, clock=clock)
    found.freshness = Freshness(stale_after=5.0, max_staleness=2.0)
    return found


def record(offsets: dict[int, int], beat: datetime | None = NOW) -> Recorded:
    return Recorded(offsets=offsets, committed_at=NOW - timedelta(seconds=3), beat_at=beat)


def test_caught_up_partial_and_down() -> None:
    clock = Clock()
    reader = health(clock)
    reader.freshness.contact(clock.at)
    reader.freshness.measured(clock.at, {(TOPIC, 0): 5, (TOPIC, 1): 7})
    positions = {(TOPIC, 0): 5, (TOPIC, 1): 7}

    done = judge(record({0: 5, 1: 7}), reader.status(positions), NOW, 15.0)
    assert done.available and not done.partial and done.lag == 0
    assert done.as_of == NOW and done.high_watermarks == {0: 5, 1: 7}

    # facts arrive, the consumer does not move: partial once the reached mark is older than 2 s
    clock.at += 1.0
    reader.freshness.contact(clock.at)
    reader.freshness.measured(clock.at, {(TOPIC, 0): 9, (TOPIC, 1): 7})
    soon = judge(record({0: 5, 1: 7}), reader.status(positions), NOW, 15.0)
    assert soon.available and not soon.partial and soon.lag == 4  # within the bound
    clock.at += 2.5
    reader.freshness.contact(clock.at)
    behind = judge(record({0: 5, 1: 7}), reader.status(positions), NOW, 15.0)
    assert behind.available and behind.partial
    assert behind.lag == 4 and behind.lags == {0: 4, 1: 0}
    assert behind.as_of == NOW - timedelta(seconds=3.5)
    assert behind.body()["partial"] is True and behind.headers()["X-Followup-Lag"] == "4"

    # the heartbeat is too old: down; no heartbeat at all: never ran
    old = NOW - timedelta(seconds=16)
    gone = judge(record({0: 5, 1: 7}, beat=old), reader.status(positions), NOW, 15.0)
    assert not gone.available and "down" in (gone.waiting_for or "")
    never = judge(record({}, beat=None), reader.status({}), NOW, 15.0)
    assert not never.available and "never run" in (never.waiting_for or "")

    # caught up again, as of a measurement within the bound (the old one says it is stale)
    moved = {(TOPIC, 0): 9, (TOPIC, 1): 7}
    assert judge(record({0: 9, 1: 7}), reader.status(moved), NOW, 15.0).partial
    reader.freshness.measured(clock.at, {(TOPIC, 0): 9, (TOPIC, 1): 7})
    again = judge(record({0: 9, 1: 7}), reader.status(moved), NOW, 15.0)
    assert again.available and not again.partial and again.lag == 0


def test_watermarks_not_measurable_is_not_available() -> None:
    clock = Clock()
    reader = health(clock)  # no round trip, no measurement
    found = judge(record({0: 5}), reader.status({(TOPIC, 0): 5}), NOW, 15.0)
    assert not found.available and "high watermarks" in (found.waiting_for or "")
