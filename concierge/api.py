"""The FastAPI application: the FHIR ingest endpoint and the product API under /v1.

:func:`create_app` mounts the routes (:mod:`concierge.routes`) and, at start-up, builds each
side's service that was not given (``build_feasibility``, ``build_recruitment``,
``build_surveillance``) when its setting turns it on; readiness is :mod:`concierge.readiness`.
See ``docs/explanation/architecture.md``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request

from core.audit import AuditKeys, AuditLog
from core.http import install_audit, install_problem_details
from core.settings import Settings, get_settings
from fhir_adapters.rest import IngestService, build_router
from fhir_adapters.sinks import DeliveryFailed
from infra.kafka_log import routed

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # Imported where they are built, at start-up: an app for one side loads only that side.
    from concierge.routes.recruitment import VaultIdentities
    from feasibility.service import FeasibilityService
    from federation.node import Node
    from followup.export import Exports
    from followup.progress import ConsumerProgress
    from followup.service import FollowupService
    from infra.audit_anchors import AnchorPublisher
    from recruitment.runtime import Runtime
    from recruitment.service import RecruitmentService
    from surveillance_stream.monitor import SignalMonitor
    from terminology.expand import Terminology


def build_feasibility(settings: Settings) -> FeasibilityService:
    """The sponsor service on the real broker: a snapshot fed from the facts topic, the
    registry of saved questions, and disclosure control persisted in SQL."""
    import threading

    from feasibility.disclosure.budget import QueryBudget
    from feasibility.disclosure.policy import DisclosurePolicy
    from feasibility.disclosure.registry import PublicationRegistry
    from feasibility.disclosure.settings import DisclosureSettings
    from feasibility.engines.polars_engine import PolarsEngine
    from feasibility.feed import FactsFeed
    from feasibility.live import CohortView
    from feasibility.refresh import ExpansionRefresher
    from feasibility.saved import SavedQuestions
    from feasibility.service import FeasibilityService
    from feasibility.sites import SiteView
    from feasibility.snapshot import ColumnarSnapshot
    from feasibility.workspace.history import AnswerHistory, CohortHistory
    from infra.topics import COHORT, FACTS, REFERENCE, TRIALS
    from terminology.settings import TerminologySettings

    lock = threading.Lock()
    snapshot = ColumnarSnapshot()
    feed = None
    if settings.feasibility_feed:
        feed = FactsFeed(settings.kafka_bootstrap_servers, settings.topic(FACTS), snapshot, lock)
        feed.start()
    saved = SavedQuestions(settings.kafka_bootstrap_servers, settings.topic(TRIALS)).start()
    cohorts = CohortView(settings.kafka_bootstrap_servers, settings.topic(COHORT))
    registry = PublicationRegistry(url := settings.resolved_feasibility_url())
    # the sponsor workspace keeps the cohorts' history (the cohort topic is compacted) from
    # the view's first batch on, in the disclosure registry's database
    cohort_history = CohortHistory(registry.engine).follow(cohorts)
    cohorts.start()
    # answers name sites from the organisations on the reference topic, as they are now
    sites = SiteView(settings.kafka_bootstrap_servers, settings.topic(REFERENCE)).start()
    # ECL and ValueSets in criteria expand against the site's terminology store
    terms = TerminologySettings()
    terminology = build_terminology(settings)
    disclosure = DisclosureSettings.load()
    service = FeasibilityService(
        stream_max_lag_seconds=settings.stream_max_lag_seconds,
        facts_high_watermarks=HighWatermarks(
            settings.kafka_bootstrap_servers, settings.topic(FACTS)
        ),
        snapshot=snapshot,
        lock=lock,
        engine=PolarsEngine(),
        policy=DisclosurePolicy.from_env(),
        registry=registry,
        budget=QueryBudget.from_env(url),
        feed=feed,
        saved=saved,
        cohorts=cohorts,
        sites=sites,
        terminology=terminology,
        cohort_history=cohort_history,
        rate_min_history_hours=disclosure.rate_min_history_hours,
        # every answer given, for each sponsor's history and exports
        answers=AnswerHistory(registry.engine),
    )
    if terms.refresh_seconds > 0:
        service.refresher = ExpansionRefresher(saved, terminology, terms.refresh_seconds).start()
    return service


def build_terminology(settings: Settings) -> Terminology:
    """The site's terminology store (``CONCIERGE_TERMINOLOGY_*``), for ECL and ValueSets in
    criteria and for concept search."""
    from terminology.expand import Terminology
    from terminology.settings import TerminologySettings
    from terminology.store import TerminologyStore

    terms = TerminologySettings()
    return Terminology(
        TerminologyStore(terms.resolved_store_url(settings.home), terms.language_refset_ids),
        terms.max_expansion,
    )


class HighWatermarks:
    """``() -> {partition: high watermark}`` of a topic, asked of the broker at each call (a
    saved answer uses it to know how far the snapshot must have read to cover the stream)."""

    def __init__(self, bootstrap: str, topic: str, timeout: float = 3.0) -> None:
        import threading

        from confluent_kafka import Consumer

        self.topic = topic
        self.timeout = timeout
        self._lock = threading.Lock()
        self._consumer = Consumer(
            routed(
                {
                    "bootstrap.servers": bootstrap,
                    "group.id": "concierge-watermarks-unused",  # never joined
                    "enable.auto.commit": False,
                }
            )
        )
        self._partitions: list[int] = []

    def __call__(self) -> dict[int, int]:
        from confluent_kafka import KafkaException, TopicPartition

        with self._lock:
            if not self._partitions:
                metadata = self._consumer.list_topics(self.topic, timeout=self.timeout)
                topic = metadata.topics.get(self.topic)
                if topic is None or topic.error is not None or not topic.partitions:
                    raise KafkaException(f"topic {self.topic} is not available")
                self._partitions = sorted(topic.partitions)
            return {
                p: int(
                    self._consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=self.timeout, cached=False
                    )[1]
                )
                for p in self._partitions
            }


def build_recruitment(settings: Settings) -> tuple[Runtime, VaultIdentities]:
    """The clinician side: the recruitment database (migrated on start) and a vault reader of
    the API's own for the identities only a patient's clinicians may see."""
    from concierge.routes.recruitment import VaultIdentities
    from fhir_adapters.vault import SqlVault
    from recruitment.db import upgrade
    from recruitment.runtime import build_runtime
    from recruitment.settings import get_recruitment_settings

    recruitment_settings = get_recruitment_settings()
    url = recruitment_settings.resolved_url(settings.home)
    upgrade(url)
    runtime = build_runtime(recruitment_settings, url=url)
    identities = VaultIdentities(SqlVault(settings.resolved_vault_url()))
    return runtime, identities


def build_followup(settings: Settings, runtime: Runtime) -> tuple[FollowupService, Exports]:
    """The trial team's follow-up reads: the follow-up tables in the recruitment database
    (migrated on start), and the feed's exports (jobs in that database, files under
    ``CONCIERGE_HOME``)."""
    from followup.db import ensure
    from followup.export import Exports
    from followup.service import FollowupService

    ensure(runtime.engine)
    service = FollowupService(runtime.sessions)
    exports = Exports(service, settings.home / "followup-exports")
    exports.resume()  # jobs whose process died (their lease ran out) run again here
    return service, exports


def build_followup_progress(settings: Settings, runtime: Runtime) -> ConsumerProgress:
    """How current the follow-up tables are: the consumer's committed offsets against the facts
    topic's high watermarks, measured by this process (``followup.progress``)."""
    from followup.progress import ConsumerProgress
    from followup.settings import get_followup_settings

    section = get_followup_settings()
    return ConsumerProgress(
        runtime.sessions,
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        max_lag_seconds=section.max_lag_seconds,
        down_after_seconds=section.down_after_seconds,
    ).start()


def build_surveillance(settings: Settings, audit: AuditLog) -> SignalMonitor:
    """The regulator side: the signal monitor over the device-contribution topic."""
    from infra.topics import DEVICES, SIGNALS, TOPICS
    from infra.topics_admin import ensure_topics
    from surveillance_stream.monitor import SignalMonitor

    def prepare() -> None:
        specs = [spec for spec in TOPICS if spec.name in (DEVICES, SIGNALS)]
        ensure_topics(settings.kafka_bootstrap_servers, settings.topic_prefix, specs)

    return SignalMonitor(
        settings.kafka_bootstrap_servers,
        settings.topic(DEVICES),
        settings.topic(SIGNALS),
        audit=audit,
        prepare=prepare,
    ).start()


def build_audit_anchors(settings: Settings, audit: AuditLog) -> AnchorPublisher:
    """The publisher of the audit chain's head to the anchors topic (on its own thread: a
    broker that is down is reported in ``/readyz``'s ``audit_anchors``, never a slow request)."""
    from infra.audit_anchors import AnchorPublisher

    development = settings.development_keys()
    if audit.keys.development and "CONCIERGE_AUDIT_KEY" not in development:
        development.append("CONCIERGE_AUDIT_KEY")
    if development:
        log.warning(
            "%s still at the public development default: set them in production "
            "(docs/explanation/security.md)",
            ", ".join(development),
        )
    return AnchorPublisher(
        audit,
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        settings.audit_anchor_seconds,
    ).start()


def attach_signal_notices(app: FastAPI) -> None:
    """Regulators' signal notifications: every move of a signal the monitor publishes is
    matched against the subscriptions in the recruitment database and queued in its outbox
    (delivered by ``concierge recruitment run``'s dispatcher). Needs both the monitor and the
    recruitment database; without either the subscription routes answer 503."""
    monitor = getattr(app.state, "surveillance", None)
    runtime = getattr(app.state, "recruitment", None)
    if monitor is None or runtime is None or getattr(app.state, "signal_notices", None):
        return
    from recruitment.signal_notices import SignalNotices

    notices = SignalNotices(runtime.sessions, runtime.writer.base_url)
    app.state.signal_notices = notices
    monitor.listeners.append(notices.notify)


def _lifespan(
    settings: Settings, monitor: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The start-up and shutdown both services share: each service left None on
    ``app.state`` is built when its setting turns it on and stopped at shutdown. ``monitor``:
    the monitor service's (``concierge monitor``): no ingest, no sponsor side, no terminology;
    the signal monitor in-process, and the recruitment database for signal notifications."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from concierge.readiness import ProgressLogger

        app.state.starting = True
        if getattr(app.state, "ingest", None) is None and not monitor:
            from fhir_adapters.service import build_ingestor
            from fhir_adapters.sinks import KafkaSink

            sink = KafkaSink(
                settings.kafka_bootstrap_servers,
                settings.topic_prefix,
                {"linger.ms": 1, "reconnect.backoff.max.ms": 1000},
                timeout_seconds=settings.ingest_timeout_seconds,
            )
            app.state.ingest = IngestService(
                build_ingestor(settings, sink=sink), settings.ingest_timeout_seconds
            )
        if getattr(app.state, "feasibility", None) is None and settings.feasibility_feed:
            app.state.feasibility = build_feasibility(settings)
        if getattr(app.state, "terminology", None) is None and not monitor:
            found = getattr(app.state.feasibility, "terminology", None)
            app.state.terminology = found or build_terminology(settings)
        if getattr(app.state, "recruitment", None) is None and settings.recruitment_api:
            app.state.recruitment, app.state.identities = build_recruitment(settings)
        if (
            getattr(app.state, "surveillance", None) is None
            and settings.surveillance_monitor
            and not settings.surveillance_monitor_url
        ):
            app.state.surveillance = build_surveillance(settings, app.state.audit)
        attach_signal_notices(app)
        if getattr(app.state, "followup", None) is None and app.state.recruitment is not None:
            app.state.followup, app.state.followup_exports = build_followup(
                settings, app.state.recruitment
            )
        if (
            getattr(app.state, "followup_progress", None) is None
            and getattr(app.state, "followup", None) is not None
            and app.state.recruitment is not None
        ):
            app.state.followup_progress = build_followup_progress(settings, app.state.recruitment)
        if getattr(app.state, "audit_anchors", None) is None and settings.audit_anchor_seconds:
            app.state.audit_anchors = build_audit_anchors(settings, app.state.audit)
        app.state.starting = False
        progress = ProgressLogger(app).start()
        yield
        progress.stop()
        if getattr(app.state, "surveillance", None) is not None:
            app.state.surveillance.stop()
        if getattr(app.state, "surveillance_proxy", None) is not None:
            await app.state.surveillance_proxy.aclose()
        if getattr(app.state, "ingest", None) is not None:
            try:
                app.state.ingest.ingestor.commit()
            except DeliveryFailed as failed:
                # every request commits its own batch, so this is one cut short by the stop:
                # aborted, nothing of it indexed, its client not answered 2xx
                log.warning("shutdown: the last ingest batch was not delivered (%s)", failed)
            app.state.ingest.ingestor.vault.close()
        feasibility_service: FeasibilityService | None = app.state.feasibility
        if feasibility_service is not None:
            feasibility_service.stop()
        if getattr(app.state, "followup_progress", None) is not None:
            stop_progress = getattr(app.state.followup_progress, "stop", None)
            if stop_progress is not None:
                stop_progress()
        if getattr(app.state, "recruitment", None) is not None:
            app.state.recruitment.close()
        if getattr(app.state, "audit_writer", None) is not None:
            app.state.audit_writer.close()  # every queued record committed before the anchor
        if getattr(app.state, "audit_anchors", None) is not None:
            app.state.audit_anchors.stop()  # last: the head after every other record

    return lifespan


def _service_app(settings: Settings, monitor: bool, summary: str) -> FastAPI:
    """What every HTTP service of the product has, the API and the monitor alike: the shared
    start-up (:func:`_lifespan`), offline docs, token verification, the audit log and its
    middleware, problem details, ``/readyz``, ``/metrics`` and ``/healthz``."""
    app = FastAPI(
        title="Trial concierge" + (" signal monitor" if monitor else ""),
        version="0.1.0",
        summary=summary,
        lifespan=_lifespan(settings, monitor),
        docs_url=None,  # served from installed files instead of a CDN (concierge.docs_offline)
        redoc_url=None,
    )
    from concierge.docs_offline import install_offline_docs

    install_offline_docs(app)
    app.state.ingest = None
    app.state.feasibility = None
    app.state.recruitment = None
    app.state.identities = None
    app.state.surveillance = None
    from core.auth import TokenVerifier

    # this site's keys, the identity provider if one is set, and the revocation list
    app.state.token_verifier = TokenVerifier.from_settings(settings)
    app.state.token_key = settings.token_key.get_secret_value().encode()
    app.state.audit = AuditLog(settings.resolved_audit_url(), AuditKeys.from_settings(settings))
    app.state.settings = settings
    install_problem_details(app)
    install_audit(app)
    from concierge import readiness

    readiness.install(app)
    from concierge import metrics

    # /metrics, and every request timed by its route template
    metrics.install(app, "monitor" if monitor else "api")

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    return app


def create_app(
    settings: Settings | None = None,
    ingest_service: IngestService | None = None,
    feasibility: FeasibilityService | None = None,
    recruitment: Runtime | None = None,
    recruitment_identities: VaultIdentities | None = None,
    surveillance: SignalMonitor | None = None,
    federation_node: Node | None = None,
) -> FastAPI:
    """The API with the services given; each one left None is built at start-up from
    ``settings`` when its switch is on (``feasibility_feed``, ``recruitment_api``,
    ``surveillance_monitor``), and stopped at shutdown. With ``surveillance_monitor_url`` set,
    ``/v1/surveillance`` is forwarded to the monitor service (:mod:`concierge.monitor_proxy`).
    ``federation_node``: this API as a node of a hub (by default from ``CONCIERGE_NODE_*``; None
    when ``CONCIERGE_NODE_ID`` is unset)."""
    settings = settings or get_settings()
    app = _service_app(
        settings,
        monitor=False,
        summary="Clinical trial feasibility and recruitment concierge with a streaming "
        "device-safety surveillance core.",
    )
    app.state.ingest = ingest_service
    app.state.feasibility = feasibility
    app.state.recruitment = recruitment
    app.state.identities = recruitment_identities
    app.state.surveillance = surveillance
    if federation_node is None:
        from federation.node import Node
        from federation.settings import NodeSettings

        node_settings = NodeSettings()
        if node_settings.enabled():
            federation_node = Node.from_settings(node_settings)
    app.state.federation_node = federation_node

    def get_ingest(request: Request) -> IngestService:
        service: IngestService = request.app.state.ingest
        return service

    from core.auth import caller_source_system, require_role

    app.include_router(
        build_router(
            get_ingest,
            max_resource_bytes=settings.max_resource_bytes,
            max_body_bytes=settings.max_body_bytes,
            dependencies=[require_role("source")],
            # a source writes and retracts only its own source system's resources
            get_source=caller_source_system,
        )
    )

    from concierge.routes.clinician_page import build_page_router
    from concierge.routes.feasibility import build_admin_router
    from concierge.routes.feasibility import build_router as feasibility_router
    from concierge.routes.recruitment import build_router as clinician_router

    def recruitment_or_none(request: Request) -> RecruitmentService | None:
        runtime: Runtime | None = getattr(request.app.state, "recruitment", None)
        return runtime.service if runtime is not None else None

    def recruitment_service(request: Request) -> RecruitmentService:
        service = recruitment_or_none(request)
        if service is None:
            raise HTTPException(503, "recruitment is not running in this API")
        return service

    # Sponsors get the recruitment counts per state (disclosure-controlled) in saved answers.
    app.include_router(feasibility_router(recruitment_or_none))
    from concierge.routes.workspace import build_router as workspace_router
    from concierge.routes.workspace_page import build_page_router as workspace_page

    app.include_router(workspace_router(recruitment_or_none))
    app.include_router(workspace_page())
    app.include_router(build_admin_router())

    def identities(request: Request) -> VaultIdentities:
        found: VaultIdentities | None = request.app.state.identities
        if found is None:
            raise HTTPException(503, "recruitment is not running in this API")
        return found

    app.include_router(clinician_router(recruitment_service, identities))
    app.include_router(build_page_router())

    from concierge.routes.surveillance import build_router as surveillance_router
    from concierge.routes.terminology import build_import_router
    from concierge.routes.terminology import build_router as terminology_router

    app.include_router(terminology_router())
    app.include_router(build_import_router())

    app.include_router(surveillance_router())

    from concierge.routes.followup import build_router as followup_router

    app.include_router(followup_router())
    if surveillance is None and settings.surveillance_monitor_url:
        # the monitor is a service of its own: /v1/surveillance is forwarded to it
        from concierge import monitor_proxy

        monitor_proxy.install(app, settings.surveillance_monitor_url)
    from concierge.routes.federation import build_node_router

    app.include_router(build_node_router())
    return app


def create_monitor_app(
    settings: Settings | None = None,
    surveillance: SignalMonitor | None = None,
    recruitment: Runtime | None = None,
) -> FastAPI:
    """The signal monitor's service (``concierge monitor``, one per deployment: it is the
    signals topic's single writer): the same start-up as the API (:func:`_service_app`) with
    the monitor in-process, serving only ``/v1/surveillance`` (the same routes, roles and audit
    as the API's), ``/readyz``, ``/metrics`` and ``/healthz``. No ingest, facts snapshot,
    terminology or other routes are built. Signal notifications are queued from here when the
    recruitment database is configured (``recruitment_api``)."""
    settings = (settings or get_settings()).model_copy(
        update={
            "surveillance_monitor": True,
            "surveillance_monitor_url": "",
            "feasibility_feed": False,
        }
    )
    app = _service_app(
        settings,
        monitor=True,
        summary="The device-signal monitor: signals, their history and regulators' actions.",
    )
    app.state.surveillance = surveillance
    app.state.recruitment = recruitment
    from concierge.routes.surveillance import build_router as surveillance_router

    app.include_router(surveillance_router())
    return app
