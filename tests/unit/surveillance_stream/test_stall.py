"""The stall rule (surveillance_stream.stall), against a direct restatement of it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surveillance_stream.stall import Stall, StallWatch


def test_a_partition_behind_and_still_for_the_threshold_is_stalled_and_reported_once() -> None:
    watch = StallWatch(after=60)
    assert watch.observe(0, {2: 99}, {2: 301}, True) == []
    assert watch.observe(59.9, {2: 99}, {2: 301}, True) == []
    stalls = watch.observe(60, {2: 99}, {2: 301}, True)
    assert stalls == [Stall(2, 99, 301, 60)]
    assert watch.newly(stalls) == stalls
    assert watch.newly(watch.observe(90, {2: 99}, {2: 301}, True)) == []  # logged once


def test_moving_caught_up_or_a_broker_outage_restart_the_clock() -> None:
    watch = StallWatch(after=10)
    watch.observe(0, {0: 5, 1: 5, 2: 5}, {0: 3, 1: 3, 2: 3}, True)
    # partition 0 moves, 1 catches up, 2 stands still
    stalls = watch.observe(10, {0: 6, 1: 8, 2: 5}, {0: 2, 1: 0, 2: 3}, True)
    assert [s.partition for s in stalls] == [2]
    watch.newly(stalls)
    # the broker stops answering: nothing could be fetched, nothing is stalled
    assert watch.observe(30, {0: 6, 1: 8, 2: 5}, {0: 2, 1: 0, 2: 3}, False) == []
    assert watch.reported == set()
    # back: the clocks start at the first observation after the outage
    assert watch.observe(39, {0: 6, 2: 5}, {0: 2, 2: 3}, True) == []
    assert watch.observe(48.9, {0: 6, 2: 5}, {0: 2, 2: 3}, True) == []
    assert [s.partition for s in watch.observe(49, {0: 6, 2: 5}, {0: 2, 2: 3}, True)] == [0, 2]


def test_a_partition_no_longer_held_is_forgotten() -> None:
    watch = StallWatch(after=1)
    watch.observe(0, {4: 1}, {4: 9}, True)
    watch.newly(watch.observe(2, {4: 1}, {4: 9}, True))
    assert watch.reported == {4}
    assert watch.observe(3, {}, {}, True) == [] and watch.reported == set()
    assert watch.observe(3.5, {4: 1}, {4: 9}, True) == []  # held again: a new clock


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StallWatch(after=0)


# one partition's observations: (seconds since the previous, position step, lag, connected)
steps = st.lists(
    st.tuples(
        st.floats(0, 30, allow_nan=False),
        st.sampled_from([0, 0, 0, 1, 5]),
        st.sampled_from([0, 1, 50]),
        st.booleans(),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, after=st.sampled_from([5.0, 20.0, 60.0]))
def test_stalled_exactly_when_behind_and_unmoved_since_a_moment_at_least_after_ago(
    steps: list[tuple[float, int, int, bool]], after: float
) -> None:
    """Reference: stalled at an observation iff it and every observation back to one at least
    ``after`` earlier were connected and behind at the same position."""
    watch = StallWatch(after)
    now, position = 0.0, 0
    history: list[tuple[float, int, int, bool]] = []
    for gap, step, lag, connected in steps:
        now += gap
        position += step
        history.append((now, position, lag, connected))
        got = watch.observe(now, {7: position}, {7: lag}, connected)
        run_start = now
        for at, pos, behind, up in reversed(history):
            if not (up and behind > 0 and pos == position):
                break
            run_start = at
        want = connected and lag > 0 and now - run_start >= after
        assert bool(got) == want, (history, got)
        if got:
            assert got[0] == Stall(7, position, lag, now - run_start)
