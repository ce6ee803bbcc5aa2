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
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

log = logging.getLogger(__name__)


def record_key_text(raw: bytes | None) -> str:
    """A cohort-topic key as text: the stream's table writes keys as JSON strings."""
    text = (raw or b"").decode()
    if text.startswith('"'):
        decoded: str = orjson.loads(text)
        return decoded
    return text


class CohortView:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, dict[str, Any]]] = {}  # trial -> patient -> record
        self.watermarks: dict[int, dict[str, Any]] = {}
        self.messages = 0
        self.last_change_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> CohortView:
        self._thread = threading.Thread(target=self._run, name="cohort-view", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        try:
            consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": "concierge-cohort-view-unused",
                    "enable.auto.commit": False,
                    "fetch.wait.max.ms": 50,
                }
            )
            metadata = consumer.list_topics(self.topic, timeout=30).topics.get(self.topic)
            if metadata is None or metadata.error is not None:
                raise RuntimeError(f"topic {self.topic} is not available")
            consumer.assign(
                [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
            )
            while not self._stop.is_set():
                messages = consumer.consume(2000, timeout=0.1)
                if messages:
                    self._absorb(messages)
            consumer.close()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("cohort view stopped: %s", self.error)

    def _absorb(self, messages: list[Any]) -> None:
        with self._lock:
            for message in messages:
                if message.error() is not None:
                    continue
                key = record_key_text(message.key())
                value = message.value()
                self.messages += 1
                if key.startswith("\x00watermark|"):
                    if value is not None:
                        mark = orjson.loads(value)
                        self.watermarks[int(mark["partition"])] = mark
                    continue
                if key.startswith("\x00"):
                    continue
                trial, _, patient = key.partition("|")
                if value is None:
                    self.records.get(trial, {}).pop(patient, None)
                    continue
                record = orjson.loads(value)
                trial_records = self.records.setdefault(trial, {})
                current = trial_records.get(patient)
                if current is None or int(current["change"]) < int(record["change"]):
                    trial_records[patient] = record
            self.last_change_at = time.time()

    def members(self, trial: str, version: int | None = None) -> list[Mapping[str, Any]]:
        """Current members of a trial's cohort (at ``version`` of its criteria, if given)."""
        with self._lock:
            return [
                r
                for r in self.records.get(trial, {}).values()
                if r.get("member") and (version is None or r.get("trial_version") == version)
            ]

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
        with self._lock:
            return {
                "cohort_messages": self.messages,
                "stream_time": stream_time.isoformat() if stream_time else None,
                "facts_offsets": {
                    p: int(m.get("facts_offset", 0)) for p, m in sorted(self.watermarks.items())
                },
                "error": self.error,
            }


__all__ = ["CohortView", "record_key_text"]
