"""Where normalised output goes: Kafka in the product, a list in unit tests.

The Kafka sink uses an idempotent producer (acks=all, enable.idempotence) so a retried send
cannot duplicate a message, and ``flush`` raises :class:`DeliveryFailed` if any message failed or
was not acknowledged in time: the adapter commits its resource index only after the broker has
acknowledged everything it published. After a failure, :meth:`KafkaSink.discard` drops what is
still queued (``Producer.purge``) so nothing of a failed request is delivered with the next one.

Facts are published per patient: the envelopes of one patient that arrive between two flushes
(a Bundle, a chunk of a Bulk export, one REST request) travel as one message, a
``concierge.factbatch/1`` batch (a single envelope travels alone). Per-message overhead is what
limits a Python stream processor, so a patient's Bundle costs the stream one message, not thirty;
order within the patient is kept, and consumers read either shape with
:func:`core.contracts.facts.envelopes_of`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from core.contracts.facts import BATCH_SCHEMA, ReferenceRecord, ResourceFacts
from infra.kafka_log import routed
from infra.topics import DEADLETTER, FACTS, REFERENCE

#: A patient's batch is published early once it holds this many envelopes or bytes.
BATCH_ENVELOPES = 500
BATCH_BYTES = 900_000
#: A dead letter larger than this holds an excerpt of its payload, not the payload: the
#: dead-letter topic keeps the broker's default message size (1 MiB).
DEADLETTER_MAX_BYTES = 900_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    key: str
    value: bytes


class FactSink(Protocol):
    def facts(self, envelope: ResourceFacts) -> None: ...
    def reference(self, record: ReferenceRecord) -> None: ...
    def dead_letter(self, letter: DeadLetter) -> None: ...
    def flush(self) -> None: ...


#: Why a publication failed: the broker could not be reached or did not answer in time
#: (``unavailable``: retry later), a message is larger than the broker or topic accepts
#: (``too_large``: retrying the same thing fails again), anything else (``failed``).
FailureKind = Literal["unavailable", "too_large", "failed"]

_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}
_UNAVAILABLE = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError._QUEUE_FULL,
}


def failure_kind(err: KafkaError) -> FailureKind:
    code = err.code()
    if code in _TOO_LARGE:
        return "too_large"
    if code in _UNAVAILABLE or err.retriable():
        return "unavailable"
    return "failed"


class DeliveryFailed(RuntimeError):
    """Something published since the last flush is not (known to be) on the broker."""

    def __init__(self, message: str, kind: FailureKind = "failed") -> None:
        super().__init__(message)
        self.kind: FailureKind = kind


class Discardable(Protocol):
    """A sink that can drop what it has not yet delivered (after a failed flush)."""

    def discard(self) -> None: ...


#: Delivery reports of messages purged by :meth:`KafkaSink.discard`.
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


class KafkaSink:
    """``timeout_seconds`` bounds every publication: a message not acknowledged within it fails
    (librdkafka ``message.timeout.ms``) and ``flush`` waits no longer (the API uses
    ``CONCIERGE_INGEST_TIMEOUT_SECONDS``; batch ingest keeps a minute)."""

    def __init__(
        self,
        bootstrap: str,
        prefix: str = "",
        extra: dict[str, Any] | None = None,
        timeout_seconds: float = 60.0,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "message.max.bytes": 10_000_000,
            "queue.buffering.max.messages": 500_000,
            "message.timeout.ms": max(1, int(timeout_seconds * 1000)),
        }
        config.update(extra or {})
        self._producer = Producer(routed(config))
        self.facts_topic = prefix + FACTS
        self.reference_topic = prefix + REFERENCE
        self.deadletter_topic = prefix + DEADLETTER
        self._errors: list[str] = []
        self.sent = 0
        #: messages handed to the producer, per topic (``/metrics``' produced messages)
        self.sent_by_topic: Counter[str] = Counter()
        self._batches: dict[str, list[bytes]] = {}
        self._batch_bytes: dict[str, int] = {}
        self._kinds: set[FailureKind] = set()

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None and err.code() in _PURGED:
            # Our own discard() purged it: the batch it belonged to is already aborted. The
            # report of a message purged in flight can come after discard() has returned (CI:
            # it failed the next flush, the API's shutdown commit, with nothing else pending).
            return
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err.str()}")
            self._kinds.add(failure_kind(err))

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key.encode(), on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as exc:
                # Refused before it was queued (larger than message.max.bytes, ...).
                err = exc.args[0]
                raise DeliveryFailed(f"{topic}: {err.str()}", failure_kind(err)) from None
        self.sent += 1
        self.sent_by_topic[topic] += 1
        if self.sent % 1000 == 0:
            self._producer.poll(0)

    def facts(self, envelope: ResourceFacts) -> None:
        patient = envelope.patient
        value = envelope.to_json()
        batch = self._batches.setdefault(patient, [])
        batch.append(value)
        size = self._batch_bytes.get(patient, 0) + len(value)
        self._batch_bytes[patient] = size
        if len(batch) >= BATCH_ENVELOPES or size >= BATCH_BYTES:
            self._publish_batch(patient)

    def _publish_batch(self, patient: str) -> None:
        batch = self._batches.pop(patient, [])
        self._batch_bytes.pop(patient, None)
        if not batch:
            return
        if len(batch) == 1:
            value = batch[0]
        else:
            head = (
                b'{"schema":"' + BATCH_SCHEMA.encode() + b'","patient":'
                + orjson.dumps(patient) + b',"envelopes":['
            )  # fmt: skip
            value = head + b",".join(batch) + b"]}"
        self._produce(self.facts_topic, patient, value)

    def _publish_batches(self) -> None:
        for patient in list(self._batches):
            self._publish_batch(patient)

    def reference(self, record: ReferenceRecord) -> None:
        self._produce(self.reference_topic, record.key, record.to_json())

    def dead_letter(self, letter: DeadLetter) -> None:
        self._produce(self.deadletter_topic, letter.key, letter.value)

    def flush(self) -> None:
        """Return once every message published since the last flush is acknowledged; raise
        :class:`DeliveryFailed` (having discarded the rest) if any failed or the time ran out."""
        self._publish_batches()
        remaining = self._producer.flush(self.timeout_seconds)
        if remaining:
            self.discard()
            raise DeliveryFailed(
                f"{remaining} messages not acknowledged within {self.timeout_seconds:g} s",
                "unavailable",
            )
        if self._errors:
            errors, kinds = self._errors, self._kinds
            self._errors, self._kinds = [], set()
            kind: FailureKind = next(
                (k for k in ("too_large", "unavailable") if k in kinds), "failed"
            )
            raise DeliveryFailed(f"{len(errors)} messages failed: " + "; ".join(errors[:5]), kind)

    def discard(self) -> None:
        """Drop everything not yet acknowledged: batches not yet produced, messages queued in
        librdkafka or in flight. A purged in-flight message may still have been written by the
        broker; the adapter never re-uses its seq for other content (see ``Ingestor.abort``)."""
        self._batches.clear()
        self._batch_bytes.clear()
        self._producer.purge(in_queue=True, in_flight=True, blocking=True)
        self._producer.flush(0)  # serve the purged messages' delivery reports
        self._errors, self._kinds = [], set()


@dataclass
class MemorySink:
    published_facts: list[ResourceFacts] = field(default_factory=list)
    published_references: list[ReferenceRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    flushes: int = 0
    #: Lengths of the three lists at the last successful flush (what ``discard`` goes back to).
    _delivered: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)

    def facts(self, envelope: ResourceFacts) -> None:
        self.published_facts.append(envelope)

    def reference(self, record: ReferenceRecord) -> None:
        self.published_references.append(record)

    def dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.append(letter)

    def flush(self) -> None:
        self.flushes += 1
        self._delivered = (
            len(self.published_facts),
            len(self.published_references),
            len(self.dead_letters),
        )

    def discard(self) -> None:
        """Forget what was published since the last flush, as a purge does on Kafka."""
        facts, references, letters = self._delivered
        del self.published_facts[facts:]
        del self.published_references[references:]
        del self.dead_letters[letters:]
