"""What the feasibility service needs of the views it reads, as Protocols.

The service answers from views that topic readers keep current (the facts snapshot's feed, the
cohort view, the trial registry, the site directory); it only asks them whether they are current
and for the few reads below, so it is typed against these rather than against the Kafka-backed
classes (:class:`~feasibility.feed.FactsFeed`, :class:`~feasibility.live.CohortView`), and
tests may hand it views filled by hand. Readiness itself is :mod:`infra.mirror`'s rule; see
docs/explanation/ for how the views are fed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from infra.mirror import ReaderStatus

    from .feed import FeedStatus


@runtime_checkable
class Reader(Protocol):
    """A view kept current by a reader that can say whether it is current (connected and
    caught up, :class:`infra.mirror.ReaderStatus`) and be stopped. A view without these (a
    site directory filled by a test) is trusted as complete."""

    def readiness(self) -> ReaderStatus: ...

    def stop(self) -> None: ...


class FactsReader(Reader, Protocol):
    """The reader that folds the facts topic into the snapshot."""

    def status(self) -> FeedStatus:
        """Messages read, lag and whether caught up (an answer's ``as_of``)."""
        ...

    def wait_positions(self, positions: dict[int, int], timeout: float) -> bool:
        """Wait until every message before these offsets (per partition) is in the snapshot;
        False on timeout."""
        ...


class CohortReader(Reader, Protocol):
    """Live cohort membership as the stream publishes it."""

    def members(self, trial: str, version: int | None = None) -> list[Mapping[str, Any]]:
        """Current member records of a trial's cohort (at ``version`` of its criteria)."""
        ...

    def pending_partitions(self, trial: str, version: int) -> list[int]:
        """Partitions that have not yet evaluated every patient at ``version``."""
        ...

    def evaluated_version(self, trial: str) -> int:
        """The lowest criteria version among the trial's records (0 when none)."""
        ...

    def stream_time(self) -> datetime | None:
        """The stream's watermark: the earliest stream time over its partitions."""
        ...

    def status(self) -> dict[str, Any]:
        """Messages read, lag and stream time, as an answer's ``as_of`` shows them."""
        ...


__all__ = ["CohortReader", "FactsReader", "Reader"]
