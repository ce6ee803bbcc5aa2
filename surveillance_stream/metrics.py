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
from prometheus_client.core import Metric

from infra import metrics as m
from infra.metrics import FunctionCollector, ReaderCollector, ReaderSample

if TYPE_CHECKING:
    from .app import StreamApp

SERVICE = "worker"


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
        return [
            m.counter(m.PRODUCED, "Messages produced, by topic", service, sent, "topic"),
            m.counter(
                m.SKIPPED,
                "Messages a consumer could not use (logged with topic and offset, and skipped)",
                service,
                {"worker": stream.rejected},
                "reader",
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
