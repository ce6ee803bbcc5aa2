"""The live view of saved questions: cohort membership as the stream publishes it.

:class:`CohortView` reads the compacted cohort topic from the beginning and follows it, keeping
each ``trial|patient`` key's latest record (by its ``change`` counter) and each partition's
watermark (stream time and facts offset). Live answers are counted from it; nothing here leaves
the API except through disclosure control.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Message

from core.contracts.cohorts import (
    BOOKKEEPING_PREFIX,
    EVALUATED_PREFIX,
    WATERMARK_PREFIX,
    key_text,
)
from infra.mirror import ReaderStatus, TopicMirror

log = logging.getLogger(__name__)


class CohortView:
    """Cohort membership and stream watermarks, folded from the cohort topic by a
    :class:`~infra.mirror.TopicMirror` (which survives broker restarts and reports lag)."""

    def __init__(
        self, bootstrap: str, topic: str, *, stale_after: float = 5.0, max_staleness: float = 5.0
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, dict[str, Any]]] = {}  # trial -> patient -> record
        self.watermarks: dict[int, dict[str, Any]] = {}
        #: trial -> partition -> the criteria version every patient there was evaluated at
        self.evaluated: dict[str, dict[int, int]] = {}
        self.messages = 0
        self.last_change_at: float | None = None
        #: Called after each batch (outside the lock) with the membership changes read (a
        #: tombstone as ``member: false`` at the stream's time) and the trials whose
        #: completion marks moved: the workspace keeps the cohort's history from it
        #: (:class:`feasibility.workspace.history.CohortHistory`), since the topic is compacted.
        self.on_batch: Callable[[list[dict[str, Any]], set[str]], None] | None = None
        self.mirror = TopicMirror(
            "cohort-view",
            bootstrap,
            topic,
            self._absorb,
            poll_timeout=0.1,
            config={"fetch.wait.max.ms": 50},
            stale_after=stale_after,
            max_staleness=max_staleness,
        )

    def start(self) -> CohortView:
        self.mirror.start()
        return self

    def stop(self) -> None:
        self.mirror.stop()

    @property
    def error(self) -> str | None:
        return self.mirror.status().error

    def readiness(self) -> ReaderStatus:
        return self.mirror.status()

    def _absorb(self, messages: list[Message]) -> None:
        changes: list[dict[str, Any]] = []
        marked: set[str] = set()
        with self._lock:
            for message in messages:
                key = key_text(message.key())
                value = message.value()
                self.messages += 1
                if key.startswith(WATERMARK_PREFIX):
                    if value is not None:
                        mark = orjson.loads(value)
                        self.watermarks[int(mark["partition"])] = mark
                    continue
                if key.startswith(EVALUATED_PREFIX):
                    if value is not None:
                        mark = orjson.loads(value)
                        done = self.evaluated.setdefault(str(mark["trial"]), {})
                        done[int(mark["partition"])] = int(mark["version"])
                        marked.add(str(mark["trial"]))
                    continue
                if key.startswith(BOOKKEEPING_PREFIX):
                    continue
                trial, _, patient = key.partition("|")
                if value is None:
                    gone = self.records.get(trial, {}).pop(patient, None)
                    if gone is not None and gone.get("member"):
                        times = [float(m["stream_time_epoch"]) for m in self.watermarks.values()]
                        changes.append(
                            {
                                "trial": trial,
                                "patient": patient,
                                "change": int(gone["change"]) + 1,
                                "member": False,
                                "at_epoch": min(times) if times else time.time(),
                            }
                        )
                    continue
                record = orjson.loads(value)
                trial_records = self.records.setdefault(trial, {})
                current = trial_records.get(patient)
                if current is None or int(current["change"]) < int(record["change"]):
                    trial_records[patient] = record
                    changes.append(record)
            self.last_change_at = time.time()
        if self.on_batch is not None and (changes or marked):
            self.on_batch(changes, marked)

    def members(self, trial: str, version: int | None = None) -> list[Mapping[str, Any]]:
        """Current members of a trial's cohort (at ``version`` of its criteria, if given)."""
        with self._lock:
            return [
                r
                for r in self.records.get(trial, {}).values()
                if r.get("member") and (version is None or r.get("trial_version") == version)
            ]

    def pending_partitions(self, trial: str, version: int) -> list[int]:
        """Partitions of the cohort topic that have not yet evaluated every patient at
        ``version`` of the trial (its members there are not complete)."""
        partitions = sorted(self.readiness().positions) or sorted(self.watermarks)
        with self._lock:
            done = self.evaluated.get(trial, {})
            return [p for p in partitions if done.get(p, 0) < version]

    def evaluated_version(self, trial: str) -> int:
        """The lowest criteria version among the trial's records (0 when none yet)."""
        with self._lock:
            versions = [int(r["trial_version"]) for r in self.records.get(trial, {}).values()]
        return min(versions) if versions else 0

    def stream_time(self) -> datetime | None:
        """The stream's watermark: the earliest stream time over all partitions."""
        with self._lock:
            times = [float(m["stream_time_epoch"]) for m in self.watermarks.values()]
        return datetime.fromtimestamp(min(times), UTC) if times else None

    def status(self) -> dict[str, Any]:
        stream_time = self.stream_time()
        reader = self.readiness()
        with self._lock:
            return {
                "cohort_messages": self.messages,
                "cohort_caught_up": reader.ready,
                "cohort_lag_messages": reader.lag,
                "stream_time": stream_time.isoformat() if stream_time else None,
                "facts_offsets": {
                    p: int(m.get("facts_offset", 0)) for p, m in sorted(self.watermarks.items())
                },
                "error": reader.error,
            }


__all__ = ["CohortView"]
