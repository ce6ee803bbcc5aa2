"""The commit flush drains the producer buffer completely, and is measured on its own."""

from __future__ import annotations

import asyncio

from surveillance_stream.app import FlushTimes, _flush_completely


class SlowBuffer:
    """Faust's producer buffer as the flush sees it: ``flush_atmost`` sends at most a few
    queued messages per call (it gives up early, as Faust's does when the loop is busy)."""

    def __init__(self, queued: int, per_call: int) -> None:
        self.queued = queued
        self.per_call = per_call
        self.calls = 0

    @property
    def size(self) -> int:
        return self.queued

    async def flush_atmost(self, n: int | None) -> int:
        self.calls += 1
        sent = min(self.per_call, self.queued)
        self.queued -= sent
        await asyncio.sleep(0.001)
        return sent

    async def flush(self) -> None:  # replaced by _flush_completely
        raise AssertionError("the original flush must not be called")


def test_flush_drains_everything_and_records_each_flush() -> None:
    buffer = SlowBuffer(queued=10, per_call=3)
    times = FlushTimes()
    _flush_completely(buffer, times)
    asyncio.run(buffer.flush())
    assert buffer.size == 0
    assert buffer.calls == 4  # 3 + 3 + 3 + 1: no commit can overtake a queued write
    asyncio.run(buffer.flush())  # nothing queued: measured too, drains nothing
    summary = times.summary()
    assert summary["flushes"] == 2
    assert summary["messages"] == 10
    assert summary["seconds"] >= 0.004
    assert summary["longest_ms"] >= 4.0
    assert summary["mean_ms"] == round(1000 * times.seconds / 2, 3)


def test_an_unmeasured_flush_still_drains() -> None:
    buffer = SlowBuffer(queued=5, per_call=2)
    _flush_completely(buffer)
    asyncio.run(buffer.flush())
    assert buffer.size == 0
    assert FlushTimes().summary()["mean_ms"] is None
