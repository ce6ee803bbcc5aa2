"""Dead letters: read them back from the dead-letter topic and replay them through the ingest
pipeline once their cause is fixed.

A dead letter (written by :meth:`.pipeline.Ingestor.dead_letter`) holds the original payload,
the source system and origin it came from, and an OperationOutcome saying why it was refused.
:func:`read_letters` reads the topic from its start to the high watermarks measured when it
began (the topic is kept, not compacted: every letter is there); :func:`replay` gives each
payload to an :class:`~.pipeline.Ingestor` again, as the source system that sent it.

Replay is idempotent because ingestion is: the resource index in the vault knows each
resource's content, so a payload already published (by an earlier replay, or sent again by its
source meanwhile) comes back ``unchanged`` and publishes nothing. A payload that still fails is
*not* dead-lettered a second time (the letter it came from is still on the topic): the replay
reports it with the reason. A letter that kept only an excerpt of an oversized payload cannot
be replayed; the source must send it again.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from infra.kafka_log import routed

from .pipeline import Ingestor, Outcome
from .sinks import DeadLetter, FactSink

#: What a replay did with one letter.
Result = Literal["re-ingested", "already present", "skipped", "still failing", "not replayable"]
RESULTS: tuple[Result, ...] = (
    "re-ingested",
    "already present",
    "skipped",
    "still failing",
    "not replayable",
)
_BY_STATUS: dict[str, Result] = {
    "accepted": "re-ingested",
    "unchanged": "already present",
    "skipped": "skipped",
    "dead_lettered": "still failing",
}


@dataclass(frozen=True)
class Letter:
    """One record of the dead-letter topic, where it is (``partition``, ``offset``) and what
    it holds."""

    partition: int
    offset: int
    received_at: str
    source: str
    origin: str
    resource_type: str
    resource_id: str | None
    issues: tuple[dict[str, Any], ...]
    payload: str
    payload_truncated: bool
    payload_bytes: int
    payload_sha256: str

    @property
    def id(self) -> str:
        """``partition:offset``, what ``show`` takes."""
        return f"{self.partition}:{self.offset}"

    @property
    def reason(self) -> str:
        """The first issue's diagnostics (what the refusal said first)."""
        return str(self.issues[0].get("diagnostics", "")) if self.issues else ""

    def matches(self, reason: str | None, since: datetime | None) -> bool:
        """Whether any issue's code or diagnostics contains ``reason`` (case-insensitive) and
        the letter was received at or after ``since``."""
        if since is not None and _parse_time(self.received_at) < since:
            return False
        if reason is None:
            return True
        wanted = reason.casefold()
        return any(
            wanted in str(issue.get("diagnostics", "")).casefold()
            or wanted in str(issue.get("code", "")).casefold()
            for issue in self.issues
        )

    def summary(self) -> dict[str, Any]:
        """The letter without its payload (patient data): what ``list`` shows."""
        return {
            "id": self.id,
            "received_at": self.received_at,
            "source": self.source,
            "origin": self.origin,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "reason": self.reason,
            "codes": [issue.get("code") for issue in self.issues],
            "payload_bytes": self.payload_bytes,
            "payload_truncated": self.payload_truncated,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "issues": list(self.issues),
            "payload": self.payload,
            "payload_sha256": self.payload_sha256,
        }

    @classmethod
    def parse(cls, partition: int, offset: int, value: bytes) -> Letter:
        data = orjson.loads(value)
        outcome = data.get("operation_outcome") or {}
        return cls(
            partition=partition,
            offset=offset,
            received_at=str(data.get("received_at", "")),
            source=str(data.get("source", "")),
            origin=str(data.get("origin", "")),
            resource_type=str(data.get("resource_type", "(unparsed)")),
            resource_id=data.get("resource_id"),
            issues=tuple(outcome.get("issue") or ()),
            payload=str(data.get("payload", "")),
            payload_truncated=bool(data.get("payload_truncated")),
            payload_bytes=int(data.get("payload_bytes") or 0),
            payload_sha256=str(data.get("payload_sha256", "")),
        )


_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 date or date-time (UTC unless it says), or a duration back from
    now (``30m``, ``6h``, ``2d``). ``ValueError`` names what is accepted."""
    found = _DURATION.match(text.strip())
    if found:
        amount, unit = int(found.group(1)), found.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        return _parse_time(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected an ISO 8601 date or date-time, or a duration such as "
            "30m, 6h, 2d"
        ) from None


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_letters(bootstrap: str, topic: str, timeout: float = 10.0) -> Iterator[Letter]:
    """Every letter on ``topic`` up to the high watermarks at the start, in partition and
    offset order; ``KafkaException`` when the broker or the topic cannot be reached."""
    consumer = Consumer(
        routed(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "concierge-deadletter-reader",  # assigned, never joined or committed
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise KafkaException(f"topic {topic} is not available")
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        for partition in sorted(found.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout, cached=False
            )
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(topic, partition, low))
        if not starts:
            return
        consumer.assign(starts)
        pending: dict[int, list[Letter]] = {p: [] for p in ends}
        remaining = set(ends)
        deadline = datetime.now(UTC) + timedelta(seconds=max(timeout, 1) * 6)
        while remaining:
            if datetime.now(UTC) > deadline:
                raise KafkaException(f"reading {topic} timed out before its end")
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is not None:
                    raise KafkaException(message.error())
                partition, offset = message.partition(), message.offset()
                if partition is None or offset is None:
                    continue
                if partition not in remaining or offset >= ends[partition]:
                    continue
                value = message.value()
                if value:
                    pending[partition].append(Letter.parse(partition, offset, value))
                if offset + 1 >= ends[partition]:
                    remaining.discard(partition)
        for partition in sorted(pending):
            yield from pending[partition]
    finally:
        consumer.close()


class _KeepLetters:
    """The sink a replay ingests through: facts and reference records go to the real sink, a
    payload that fails again is *not* dead-lettered a second time (its letter is on the topic
    already); the replay reports it instead."""

    def __init__(self, sink: FactSink) -> None:
        self.sink = sink

    def facts(self, envelope: Any) -> None:
        self.sink.facts(envelope)

    def reference(self, record: Any) -> None:
        self.sink.reference(record)

    def dead_letter(self, letter: DeadLetter) -> None:
        return None  # deliberately dropped: see the class docstring

    def flush(self) -> None:
        self.sink.flush()

    def discard(self) -> None:
        discard: Callable[[], None] | None = getattr(self.sink, "discard", None)
        if discard is not None:
            discard()


@dataclass(frozen=True)
class Replayed:
    """One resource of one letter after a replay."""

    letter: str
    resource_type: str
    resource_id: str | None
    result: Result
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "letter": self.letter,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "result": self.result,
            "reason": self.reason,
        }


@dataclass
class ReplayReport:
    """What moved: one row per resource replayed, and the counts per result."""

    rows: list[Replayed] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        found = Counter(row.result for row in self.rows)
        return {result: found.get(result, 0) for result in RESULTS}

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "rows": [row.to_dict() for row in self.rows]}


def replay(letters: Iterable[Letter], ingestor: Ingestor) -> ReplayReport:
    """Ingest each letter's payload again as its source system, then commit (publish and
    index). ``ingestor`` must sit on the adapters' vault and pseudonym key; its sink is wrapped
    so that nothing is dead-lettered twice. The caller closes it."""
    report = ReplayReport()
    real_sink = ingestor.sink
    ingestor.sink = _KeepLetters(real_sink)
    try:
        for letter in letters:
            if letter.payload_truncated:
                report.rows.append(
                    Replayed(
                        letter.id,
                        letter.resource_type,
                        letter.resource_id,
                        "not replayable",
                        "the letter kept only an excerpt of the payload (it was too large): "
                        "the source must send it again",
                    )
                )
                continue
            with ingestor.acting_as(letter.source or None):
                outcomes: list[Outcome] = ingestor.ingest_text(letter.payload, letter.origin)
            for outcome in outcomes:
                report.rows.append(
                    Replayed(
                        letter.id,
                        outcome.resource_type,
                        outcome.resource_id,
                        _BY_STATUS[outcome.status],
                        outcome.reason if outcome.status == "dead_lettered" else None,
                    )
                )
        ingestor.commit()
    finally:
        ingestor.sink = real_sink
    return report


__all__ = [
    "RESULTS",
    "Letter",
    "ReplayReport",
    "Replayed",
    "parse_since",
    "read_letters",
    "replay",
]
