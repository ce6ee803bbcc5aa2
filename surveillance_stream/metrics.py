"""The stream worker's ``/metrics`` (families: :mod:`infra.metrics`), served beside ``/health``
and ``/readyz`` on its web port, with no token, like them.

Read at scrape time from what the worker keeps anyway: its readiness (lag per partition of the
facts topic against the same watermark measurements ``/readyz`` uses), Faust's monitor (messages
received and sent per topic), the partitions it holds, the saved questions its partitions keep
live, and messages it could not decode. No pseudonym, no count of patients, no cohort size
(those stay behind the admin token of ``/state/*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from infra import metrics as m
from infra.metrics import FunctionCollector, ReaderCollector, ReaderSample

if TYPE_CHECKING:
    from .app import StreamApp

SERVICE = "worker"
#: Per facts partition this worker keeps a standby checkpoint of (CONCIERGE_STREAM_STANDBY):
#: how many messages the checkpoint is behind the topic's end (:mod:`.standby`).
STANDBY_LAG = "concierge_standby_lag_messages"
#: Facts partitions held and stalled (:mod:`.stall`).
STALLED = "concierge_stream_stalled_partitions"


def registry_for(stream: StreamApp) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)

    def readers() -> Iterator[ReaderSample]:
        monitor = stream.app.monitor
        received = dict(monitor.messages_received_by_topic or {})
        yield ReaderSample("worker", stream.readiness(), received)
        saved = stream.saved
        if saved is not None:
            yield ReaderSample(
                "trials", saved.readiness(), {saved.mirror.topic: saved.mirror.messages}
            )

    def worker(service: str) -> Iterable[Metric]:
        monitor = stream.app.monitor
        sent = dict(monitor.messages_sent_by_topic or {})
        active = sum(
            1
            for spec in list(stream.trials_table.values())
            if spec and spec.get("status") == "active"
        )
        standby = GaugeMetricFamily(
            STANDBY_LAG,
            "Messages a standby checkpoint of a partition this worker does not own is behind "
            "the facts topic's end, by partition",
            labels=["service", "partition"],
        )
        if stream.standby is not None:
            for partition, status in stream.standby.status()["partitions"].items():
                standby.add_metric([service, partition], float(status["behind_end"]))
        return [
            standby,
            m.counter(m.PRODUCED, "Messages produced, by topic", service, sent, "topic"),
            m.counter(
                m.SKIPPED,
                "Messages a consumer could not use (logged with topic and offset, and skipped)",
                service,
                {"worker": stream.rejected},
                "reader",
            ),
            m.gauge(
                STALLED,
                "Facts partitions this worker holds that are behind the topic's end and have not "
                "moved for CONCIERGE_STREAM_STALL_SECONDS (the log says where the stream waits)",
                service,
                len(stream.stalled),
            ),
            m.gauge(
                m.PARTITIONS_HELD,
                "Facts partitions this worker holds",
                service,
                len(stream.assigned(stream.facts_name)),
            ),
            m.gauge(
                m.SAVED_QUESTIONS,
                "Saved questions (live cohorts), by status",
                service,
                active,
                status="active",
            ),
        ]

    registry.register(ReaderCollector(SERVICE, readers))
    registry.register(FunctionCollector(SERVICE, worker))
    return registry


__all__ = ["SERVICE", "registry_for"]
