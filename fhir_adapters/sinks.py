"""Where normalised output goes: Kafka in the product, a list in unit tests.

The Kafka sink uses an idempotent producer (acks=all, enable.idempotence) so a retried send
cannot duplicate a message, and ``flush`` raises if any message failed: the adapter commits its
resource index only after the broker has acknowledged everything it published.

Facts are published per patient: the envelopes of one patient that arrive between two flushes
(a Bundle, a chunk of a Bulk export, one REST request) travel as one message, a
``concierge.factbatch/1`` batch (a single envelope travels alone). Per-message overhead is what
limits a Python stream processor, so a patient's Bundle costs the stream one message, not thirty;
order within the patient is kept, and consumers read either shape with
:func:`fhir_adapters.facts.envelopes_of`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaError, Message, Producer

from infra.topics import DEADLETTER, FACTS, REFERENCE

from .facts import BATCH_SCHEMA, ReferenceRecord, ResourceFacts

#: A patient's batch is published early once it holds this many envelopes or bytes.
BATCH_ENVELOPES = 500
BATCH_BYTES = 900_000

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


class DeliveryFailed(RuntimeError):
    pass


class KafkaSink:
    def __init__(
        self, bootstrap: str, prefix: str = "", extra: dict[str, Any] | None = None
    ) -> None:
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "compression.type": "lz4",
            "message.max.bytes": 10_000_000,
            "queue.buffering.max.messages": 500_000,
        }
        config.update(extra or {})
        self._producer = Producer(config)
        self.facts_topic = prefix + FACTS
        self.reference_topic = prefix + REFERENCE
        self.deadletter_topic = prefix + DEADLETTER
        self._errors: list[str] = []
        self.sent = 0
        self._batches: dict[str, list[bytes]] = {}
        self._batch_bytes: dict[str, int] = {}

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key.encode(), on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self.sent += 1
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
        self._publish_batches()
        remaining = self._producer.flush(60)
        if remaining:
            raise DeliveryFailed(f"{remaining} messages not delivered within 60 s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryFailed("; ".join(errors[:5]))


@dataclass
class MemorySink:
    published_facts: list[ResourceFacts] = field(default_factory=list)
    published_references: list[ReferenceRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    flushes: int = 0

    def facts(self, envelope: ResourceFacts) -> None:
        self.published_facts.append(envelope)

    def reference(self, record: ReferenceRecord) -> None:
        self.published_references.append(record)

    def dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.append(letter)

    def flush(self) -> None:
        self.flushes += 1
