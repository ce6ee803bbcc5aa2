"""The worker's stall watch: a partition with messages waiting whose position has not moved.

CI saw a worker stop part-way through 400 facts messages and answer for two minutes with the
state it had, its log silent (faust-streaming has open reports of partitions that stop being
fetched, e.g. issues #166 and #629). ``/readyz`` already said "catching up", but nothing said
that the worker had stopped rather than being slow, and nothing recovered.

:class:`StallWatch` is the rule, kept apart from Faust so that it can be tested on its own: a
facts partition is *stalled* when, with the broker answering, the worker has been behind its
end (lag above 0) and its position has not moved for ``after`` seconds. The worker checks it on
a timer (:meth:`surveillance_stream.app.StreamApp.check_stalls`): a stalled partition keeps
``/readyz`` at 503 with the reason, is counted in ``/metrics``, and is logged once with what
Faust's consumer holds for it and where the agent waits (stack frames: code, never values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Stall", "StallWatch"]


@dataclass(frozen=True)
class Stall:
    partition: int
    #: the next offset the worker would handle
    position: int
    #: messages waiting past it (at the last watermark measurement)
    lag: int
    #: seconds since the position last moved (or since the partition was first seen behind)
    seconds: float


class StallWatch:
    """Per partition, the position and since when it has stood still while behind."""

    def __init__(self, after: float) -> None:
        if after <= 0:
            raise ValueError("after must be positive")
        self.after = after
        #: partition -> (position, since when it has been at that position while behind)
        self._still: dict[int, tuple[int, float]] = {}
        #: partitions reported stalled and not yet moving again (each is logged once)
        self.reported: set[int] = set()

    def observe(
        self,
        now: float,
        positions: Mapping[int, int],
        lags: Mapping[int, int],
        connected: bool,
    ) -> list[Stall]:
        """The stalled partitions at ``now``, given each held partition's position and lag.

        A partition not behind, not held any more, or whose position moved starts afresh; with
        the broker not answering nothing counts as stalled (nothing could be fetched) and the
        clocks restart, so an outage is never mistaken for a stall once it ends."""
        for partition in list(self._still):
            if partition not in positions:
                del self._still[partition]
                self.reported.discard(partition)
        stalls: list[Stall] = []
        for partition, position in positions.items():
            lag = lags.get(partition, 0)
            if not connected or lag <= 0:
                # nothing to fetch, or nothing could be: no clock runs
                self._still.pop(partition, None)
                self.reported.discard(partition)
                continue
            seen = self._still.get(partition)
            if seen is None or seen[0] != position:
                self._still[partition] = (position, now)
                self.reported.discard(partition)
                continue
            waited = now - seen[1]
            if waited >= self.after:
                stalls.append(Stall(partition, position, lag, waited))
        return stalls

    def newly(self, stalls: list[Stall]) -> list[Stall]:
        """Those of ``stalls`` not reported before (marks them reported)."""
        fresh = [s for s in stalls if s.partition not in self.reported]
        self.reported.update(s.partition for s in fresh)
        return fresh
