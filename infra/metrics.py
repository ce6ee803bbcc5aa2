"""Prometheus metrics every service shows on ``/metrics``: the families and their collectors.

Each process keeps one :class:`prometheus_client.CollectorRegistry` of its own (not the
library's global one: a test builds several apps in one process). Most figures are not counted
a second time: the collectors read, at scrape time, what the process already keeps for
``/readyz`` and ``/health`` (a reader's :class:`~infra.mirror.ReaderStatus`, its message count,
Faust's monitor), so ``/metrics`` and ``/readyz`` cannot disagree about lag.

Labels are the service, a reader's name, a topic, a partition, an HTTP route's *template*
(``/v1/feasibility/saved-questions/{trial_id}/answer``, never the path asked), a method, a
status. No label value ever comes from a request's content or a message: no pseudonym, no
identifier, no code, no count of patients (see "Metrics" in ``docs/how-to/deploy-cluster.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infra.kafka_log import routed
from infra.mirror import ReaderStatus

log = logging.getLogger(__name__)

#: The ``Content-Type`` of a scrape (Prometheus' text format, as prometheus-client writes it).
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Buckets of the latency histograms, in seconds: 5 ms to 30 s (answers over a large snapshot
#: and ingest of a large Bundle take seconds; probes take milliseconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The family names, one place (the Grafana dashboard and the tests use them).
LAG = "concierge_consumer_lag_messages"
READY = "concierge_reader_ready"
STALENESS = "concierge_reader_staleness_seconds"
CONSUMED = "concierge_messages_consumed"
PRODUCED = "concierge_messages_produced"
DEADLETTERS = "concierge_deadletters"
SKIPPED = "concierge_messages_skipped"
INGESTED = "concierge_ingested_resources"
REQUEST_SECONDS = "concierge_http_request_duration_seconds"
ANSWER_SECONDS = "concierge_answer_duration_seconds"
SNAPSHOT_ROWS = "concierge_snapshot_rows"
SNAPSHOT_BYTES = "concierge_snapshot_bytes"
SAVED_QUESTIONS = "concierge_saved_questions"
SIGNALS = "concierge_signals"
PARTITIONS_HELD = "concierge_worker_partitions"
TOPIC_MESSAGES = "concierge_topic_messages"


@dataclass(frozen=True)
class ReaderSample:
    """One topic reader at scrape time: its status and the messages it has consumed (per topic;
    ``"all"`` for a reader that counts its topics together)."""

    name: str
    status: ReaderStatus
    consumed: Mapping[str, int]


class ReaderCollector(Collector):
    """Lag per partition, readiness, staleness and messages consumed of the readers that
    ``readers()`` lists at scrape time (the same :class:`ReaderStatus` ``/readyz`` shows)."""

    def __init__(self, service: str, readers: Callable[[], Iterable[ReaderSample]]) -> None:
        self.service = service
        self.readers = readers

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            LAG,
            "Messages behind the latest measured high watermark, per partition "
            "(the readiness rule's measurement, infra/mirror.py)",
            labels=["service", "reader", "topic", "partition"],
        )
        ready = GaugeMetricFamily(
            READY,
            "1 when the reader is connected and caught up (/readyz)",
            labels=["service", "reader"],
        )
        stale = GaugeMetricFamily(
            STALENESS,
            "Age of the newest high-watermark measurement the reader has reached",
            labels=["service", "reader"],
        )
        consumed = CounterMetricFamily(
            CONSUMED, "Messages consumed", labels=["service", "reader", "topic"]
        )
        try:
            samples = list(self.readers())
        except Exception as exc:  # a scrape never fails on one part; the log says why
            log.warning("%s metrics: readers not listed: %s", self.service, type(exc).__name__)
            samples = []
        for sample in samples:
            status = sample.status
            for topic, partitions in sorted(status.lags.items()):
                for partition, behind in sorted(partitions.items()):
                    lag.add_metric([self.service, sample.name, topic, str(partition)], behind)
            ready.add_metric([self.service, sample.name], 1.0 if status.ready else 0.0)
            if status.staleness_seconds is not None:
                stale.add_metric([self.service, sample.name], status.staleness_seconds)
            for topic, count in sorted(sample.consumed.items()):
                consumed.add_metric([self.service, sample.name, topic], count)
        yield from (lag, ready, stale, consumed)


class FunctionCollector(Collector):
    """Families built at scrape time by ``build(service)``; a failing one is left out of that
    scrape (and logged), never an error for the whole scrape."""

    def __init__(self, service: str, build: Callable[[str], Iterable[Metric]]) -> None:
        self.service = service
        self.build = build

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self.build(self.service))
        except Exception as exc:
            log.warning("%s metrics: %s failed: %s", self.service, self.build, type(exc).__name__)
            return
        yield from families


class TopicSize:
    """Messages a topic holds (high minus low watermark, summed over partitions), asked of the
    broker every ``every`` seconds by a thread of its own, so that a scrape never waits on the
    broker. A process's own counters only see what that process did; this is the deployment's
    figure (for the dead-letter topic: every process's letters not yet expired). ``None`` until
    the first answer and whenever the last one is older than three periods (the broker cannot
    be asked): the family is then left out of the scrape rather than shown stale."""

    def __init__(
        self, bootstrap: str, topic: str, every: float = 15.0, timeout: float = 5.0
    ) -> None:
        import threading

        self.bootstrap = bootstrap
        self.topic = topic
        self.every = every
        self.timeout = timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._value: tuple[float, int] | None = None  # (monotonic time, size)

    def __call__(self) -> int | None:
        import threading
        import time

        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"size-{self.topic}", daemon=True
                )
                self._thread.start()
            value = self._value
        if value is None or time.monotonic() - value[0] > 3 * self.every:
            return None
        return value[1]

    def _run(self) -> None:
        import time

        from confluent_kafka import Consumer

        consumer = Consumer(
            routed(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": "concierge-topic-size-unused",  # never joined
                    "enable.auto.commit": False,
                    "allow.auto.create.topics": False,  # asking the size never makes the topic
                }
            )
        )
        try:
            while not self._stop.is_set():
                try:
                    size = self._ask(consumer)
                except Exception as exc:
                    log.warning("size of %s unknown: %s", self.topic, type(exc).__name__)
                else:
                    with self._lock:
                        self._value = (time.monotonic(), size)
                self._stop.wait(self.every)
        finally:
            consumer.close()

    def _ask(self, consumer: Any) -> int:
        from confluent_kafka import KafkaException, TopicPartition

        metadata = consumer.list_topics(self.topic, timeout=self.timeout)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise KafkaException(f"topic {self.topic} is not available")
        total = 0
        for partition in topic.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=self.timeout, cached=False
            )
            total += max(0, int(high) - int(low))
        return total

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * 2)


def topic_size(name: str, documentation: str, service: str, sizes: Iterable[TopicSize]) -> Metric:
    """A gauge family with one sample per topic whose size is known now."""
    family = GaugeMetricFamily(name, documentation, labels=["service", "topic"])
    for size in sizes:
        value = size()
        if value is not None:
            family.add_metric([service, size.topic], float(value))
    return family


def counter(
    name: str, documentation: str, service: str, by: Mapping[str, Any], label: str
) -> Metric:
    """A counter family with one sample per ``by`` item, labelled ``service`` and ``label``."""
    family = CounterMetricFamily(name, documentation, labels=["service", label])
    for value, count in sorted(by.items()):
        family.add_metric([service, str(value)], float(count))
    return family


def gauge(name: str, documentation: str, service: str, value: float, **labels: str) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=["service", *labels])
    family.add_metric([service, *labels.values()], float(value))
    return family


def scrape(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


__all__ = [
    "ANSWER_SECONDS",
    "CONSUMED",
    "CONTENT_TYPE",
    "DEADLETTERS",
    "INGESTED",
    "LAG",
    "LATENCY_BUCKETS",
    "PARTITIONS_HELD",
    "PRODUCED",
    "READY",
    "REQUEST_SECONDS",
    "SAVED_QUESTIONS",
    "SIGNALS",
    "SKIPPED",
    "SNAPSHOT_BYTES",
    "SNAPSHOT_ROWS",
    "STALENESS",
    "TOPIC_MESSAGES",
    "FunctionCollector",
    "ReaderCollector",
    "ReaderSample",
    "TopicSize",
    "counter",
    "gauge",
    "scrape",
    "topic_size",
]
