"""``/metrics`` of the API and of the recruitment service (the families: :mod:`infra.metrics`).

The API's registry reads, at scrape time, each view's reader (lag per partition, readiness,
messages consumed: the same :class:`~infra.mirror.ReaderStatus` ``/readyz`` shows), the
ingestor's outcome counts (resources by outcome, dead letters) and its producer's messages per
topic, the snapshot's size, the saved questions kept live and the monitor's signals; a
middleware times every request by its route *template* (never the path asked: paths name
resources and pseudonyms) and, for the routes that answer a sponsor's question, by outcome too.

Who may read it: anyone who reaches the port, like ``/healthz`` and ``/readyz``; nothing in it
names a patient or a resource, and exact cohort member counts stay behind the worker's admin
pages (``docs/how-to/deploy-cluster.md``, "Metrics").
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra import metrics as m
from infra.metrics import FunctionCollector, ReaderCollector, ReaderSample

if TYPE_CHECKING:
    from fastapi import FastAPI

    from recruitment.consumer import RecruitmentConsumer

#: The routes whose latency is also an *answer* latency (a sponsor's question answered, or
#: refused because a view is behind): the route template's tail, by outcome.
ANSWER_ROUTES = frozenset(
    {
        "/v1/feasibility/ask",
        "/v1/feasibility/ask-group",
        "/v1/feasibility/saved-questions/{trial_id}/answer",
    }
)
#: The label of a request no route matched (a 404, a static file under a mount).
UNMATCHED = "<unmatched>"


def consumed_of(reader: Any) -> dict[str, int]:
    """Messages a view's reader has consumed, per topic: its :class:`~infra.mirror.TopicMirror`
    (``mirror``; the signal monitor's ``devices``) keeps the count."""
    for attribute in ("mirror", "devices"):
        mirror = getattr(reader, attribute, None)
        if mirror is not None and hasattr(mirror, "messages") and hasattr(mirror, "topic"):
            return {str(mirror.topic): int(mirror.messages)}
    return {}


class ApiMetrics:
    """The API's registry, its request and answer histograms, and the ASGI middleware that
    fills them."""

    def __init__(self, app: FastAPI, service: str = "api") -> None:
        self.app = app
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Histogram(
            m.REQUEST_SECONDS,
            "Time to answer an HTTP request, by route template, method and status",
            ["service", "method", "route", "status"],
            buckets=m.LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.answers = Histogram(
            m.ANSWER_SECONDS,
            "Time to answer a sponsor's question (ad hoc, group, saved), by outcome: "
            "answered (2xx), not_current (503: a view is behind), refused (other 4xx/5xx)",
            ["service", "route", "outcome"],
            buckets=m.LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._deadletters: m.TopicSize | None = None
        self.registry.register(ReaderCollector(service, self._readers))
        self.registry.register(FunctionCollector(service, self._ingest))
        self.registry.register(FunctionCollector(service, self._views))

    def _deadletter_size(self) -> m.TopicSize | None:
        """The dead-letter topic's size, asked of the broker this API ingests to (made on the
        first scrape that needs it; none when the ingest does not go to Kafka)."""
        if self._deadletters is None:
            settings = getattr(self.app.state, "settings", None)
            ingest = getattr(self.app.state, "ingest", None)
            sink = getattr(getattr(ingest, "ingestor", None), "sink", None)
            if settings is None or type(sink).__name__ != "KafkaSink":
                return None
            from infra.topics import DEADLETTER

            self._deadletters = m.TopicSize(
                settings.kafka_bootstrap_servers, settings.topic(DEADLETTER)
            )
        return self._deadletters

    # -- at scrape time --

    def _readers(self) -> Iterator[ReaderSample]:
        from concierge.readiness import readers

        for name, reader in readers(self.app):
            yield ReaderSample(name, reader.readiness(), consumed_of(reader))

    def _ingest(self, service: str) -> Iterable[Metric]:
        ingest = getattr(self.app.state, "ingest", None)
        if ingest is None:
            return []
        counts = dict(ingest.ingestor.stats.counts)
        from fhir_adapters.pipeline import STATUSES

        families = [
            m.counter(
                m.INGESTED,
                "FHIR resources ingested, by outcome (accepted, unchanged, skipped, dead_lettered)",
                service,
                {status: counts.get(status, 0) for status in STATUSES},
                "outcome",
            ),
            m.counter(
                m.DEADLETTERS,
                "Inputs sent to the dead-letter topic (with an OperationOutcome)",
                service,
                {"ingest": counts.get("dead_lettered", 0)},
                "path",
            ),
        ]
        size = self._deadletter_size()
        if size is not None:
            families.append(
                m.topic_size(
                    m.TOPIC_MESSAGES,
                    "Messages a topic holds now (high minus low watermark): for the dead-letter "
                    "topic, every process's letters not yet expired, where "
                    "concierge_deadletters_total counts this process's only",
                    service,
                    [size],
                )
            )
        sent = getattr(ingest.ingestor.sink, "sent_by_topic", None)
        if sent is not None:
            families.append(
                m.counter(m.PRODUCED, "Messages produced, by topic", service, dict(sent), "topic")
            )
        return families

    def _views(self, service: str) -> Iterable[Metric]:
        families: list[Metric] = []
        feasibility = getattr(self.app.state, "feasibility", None)
        if feasibility is not None:
            lock = getattr(feasibility, "lock", None)
            snapshot = getattr(feasibility, "snapshot", None)
            # the feed applies batches under this lock; a scrape waits a moment, never long
            if snapshot is not None and lock is not None and lock.acquire(timeout=1.0):
                try:
                    rows, size = snapshot.size()
                finally:
                    lock.release()
                family = GaugeMetricFamily(
                    m.SNAPSHOT_ROWS,
                    "Rows of the columnar snapshot, per fact table",
                    labels=["service", "table"],
                )
                for table, count in sorted(rows.items()):
                    family.add_metric([service, table], count)
                families.append(family)
                families.append(
                    m.gauge(m.SNAPSHOT_BYTES, "Estimated bytes of the snapshot", service, size)
                )
            saved = getattr(feasibility, "saved", None)
            if saved is not None:
                trials = list(saved.trials.values())
                active = sum(1 for t in trials if getattr(t, "status", "active") == "active")
                family = GaugeMetricFamily(
                    m.SAVED_QUESTIONS,
                    "Saved questions (live cohorts), by status",
                    labels=["service", "status"],
                )
                family.add_metric([service, "active"], active)
                family.add_metric([service, "retired"], len(trials) - active)
                families.append(family)
        monitor = getattr(self.app.state, "surveillance", None)
        if monitor is not None:
            families.append(signal_family(service, monitor))
        return families

    # -- the middleware --

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def timed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = [500]

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", None) or UNMATCHED
                code = status[0]
                self.requests.labels(self.service, scope["method"], route, str(code)).observe(
                    elapsed
                )
                if route in ANSWER_ROUTES:
                    outcome = (
                        "answered"
                        if 200 <= code < 300
                        else "not_current"
                        if code == 503
                        else "refused"
                    )
                    self.answers.labels(self.service, route, outcome).observe(elapsed)

        return timed


def signal_family(service: str, monitor: Any) -> Metric:
    """Signals the monitor assesses, and those signalling now (counts only)."""
    with monitor.lock:
        assessed = len(monitor.assessments)
        signalling = sum(1 for a in monitor.assessments.values() if a.signal)
    family = GaugeMetricFamily(
        m.SIGNALS, "Device signals assessed, and signalling now", labels=["service", "state"]
    )
    family.add_metric([service, "assessed"], assessed)
    family.add_metric([service, "signalling"], signalling)
    return family


def install(app: FastAPI, service: str = "api") -> ApiMetrics:
    """``GET /metrics`` and the timing middleware on the API (or the monitor service, whose
    samples carry ``service="monitor"``)."""
    metrics = ApiMetrics(app, service)
    app.state.metrics = metrics
    app.add_middleware(_Middleware, metrics=metrics)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics: lag, throughput, latency by route, dead letters",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics_page() -> Response:
        return Response(m.scrape(metrics.registry), media_type=m.CONTENT_TYPE)

    return metrics


class _Middleware:
    """:meth:`ApiMetrics.middleware` in the form ``app.add_middleware`` takes."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self._app = metrics.middleware(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def monitor_registry(monitor: Any, service: str = "monitor") -> CollectorRegistry:
    """A registry for a process that runs the signal monitor on its own (``concierge
    monitor``): its readers' lag per partition, readiness and messages consumed, and the signals
    assessed and signalling. Serve it with :class:`infra.status_http.StatusServer`'s
    ``metrics``."""
    registry = CollectorRegistry(auto_describe=True)

    def readers() -> Iterator[ReaderSample]:
        yield ReaderSample("signals", monitor.readiness(), consumed_of(monitor))

    registry.register(ReaderCollector(service, readers))
    registry.register(FunctionCollector(service, lambda name: [signal_family(name, monitor)]))
    return registry


def recruitment_registry(consumer: RecruitmentConsumer) -> CollectorRegistry:
    """The recruitment service's registry: its group consumer's lag per partition, readiness
    and messages consumed (all its topics together), and messages it could not apply."""
    registry = CollectorRegistry(auto_describe=True)
    service = "recruitment"

    def readers() -> Iterator[ReaderSample]:
        yield ReaderSample("recruitment", consumer.readiness(), {"all": consumer.total.messages})

    def skipped(service: str) -> Iterable[Metric]:
        return [
            m.counter(
                m.SKIPPED,
                "Messages a consumer could not use (recorded with the reason, and skipped)",
                service,
                {"recruitment": consumer.total.skipped},
                "reader",
            )
        ]

    registry.register(ReaderCollector(service, readers))
    registry.register(FunctionCollector(service, skipped))
    return registry


__all__ = [
    "ANSWER_ROUTES",
    "ApiMetrics",
    "install",
    "monitor_registry",
    "recruitment_registry",
    "signal_family",
]
