"""The Faust application: per-patient state built from the facts topic.

Processing guarantee is at-least-once (Faust flushes table changelogs before committing offsets);
the effect is exactly-once because the state fold is idempotent and keyed by resource and
version (see :mod:`surveillance_stream.patient_state`). We deliberately do not rely on Faust's
``exactly_once`` mode alone (faust-streaming issues #517 and #323 report duplicates under it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
from pydantic import ValidationError

from concierge.settings import Settings
from fhir_adapters.facts import ResourceFacts, decode_resource_facts
from infra.topics import FACTS

from . import patient_state

log = logging.getLogger(__name__)


class StreamApp:
    """A Faust app and its tables, built from settings (one per worker process)."""

    def __init__(
        self,
        settings: Settings,
        store: str | None = None,
        extensions: list[Callable[[StreamApp], None]] | None = None,
    ) -> None:
        self.settings = settings
        app_id = f"{settings.topic_prefix}{settings.worker_id}"
        datadir = settings.home / "worker" / app_id
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            app_id,
            broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")],
            store=store or "memory://",
            datadir=str(datadir),
            topic_partitions=6,
            topic_replication_factor=1,
            consumer_auto_offset_reset="earliest",
            processing_guarantee="at_least_once",
            web_port=settings.worker_web_port,
            web_host="127.0.0.1",
            broker_commit_every=1000,
            broker_commit_interval=1.0,
            table_cleanup_interval=3600.0,
            stream_wait_empty=True,
        )
        self.facts_topic = self.app.topic(
            settings.topic(FACTS),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=6,
        )
        self.state = self.app.Table(
            "patient-facts",
            default=None,
            key_type=str,
            partitions=6,
        )
        self.applied = 0
        self.ignored = 0
        self.rejected = 0
        #: Called after a patient's state changed, inside the same stream iteration (so tables
        #: they update stay co-partitioned with the facts topic): (envelope, old entry, new entry).
        self.on_change: list[
            Callable[[ResourceFacts, dict[str, Any] | None, dict[str, Any]], None]
        ] = []
        self._register()
        for extension in extensions or ():
            extension(self)

    def _register(self) -> None:
        app = self.app

        @app.agent(self.facts_topic, name="patient-state")
        async def patient_state_agent(stream: Any) -> None:
            async for value in stream:
                self.handle(value)

        @app.page("/health")
        async def health(web: Any, request: Any) -> Any:
            return web.json(
                {
                    "ok": True,
                    "applied": self.applied,
                    "ignored": self.ignored,
                    "rejected": self.rejected,
                }
            )

        @app.page("/state/digest")
        async def state_digest(web: Any, request: Any) -> Any:
            return web.json(self.digest())

        @app.page("/state/patients/{patient}")
        async def patient_page(web: Any, request: Any, patient: str) -> Any:
            prefix = patient + patient_state.SEP
            entries = {
                patient_state.split_key(k)[1]: v
                for k, v in self.state.items()
                if k.startswith(prefix)
            }
            return web.json({"patient": patient, "resources": entries})

    def handle(self, value: bytes) -> None:
        try:
            envelope = decode_resource_facts(value)
        except ValidationError as exc:
            # Only the adapters write this topic; a bad message is a bug, not input. Log and go on.
            self.rejected += 1
            log.error("undecodable facts message skipped: %s", exc.errors()[:1])
            return
        key = patient_state.state_key(envelope.patient, envelope.key)
        old = self.state.get(key)
        if not patient_state.should_apply(old, envelope):
            self.ignored += 1
            return
        new = patient_state.entry_of(envelope)
        self.state[key] = new
        self.applied += 1
        for hook in self.on_change:
            hook(envelope, old, new)

    def digest(self) -> dict[str, Any]:
        return patient_state.digest(self.state.items())


#: Dotted paths of extension functions ``f(stream_app)`` that add agents, tables, pages and
#: on_change hooks (live cohorts, device counters). Each must be importable on its own.
EXTENSIONS: list[str] = []


def _load(path: str) -> Callable[[StreamApp], None]:
    import importlib

    module, _, attr = path.partition(":")
    function: Callable[[StreamApp], None] = getattr(importlib.import_module(module), attr)
    return function


def create_app(settings: Settings, store: str | None = None) -> StreamApp:
    return StreamApp(settings, store, [_load(path) for path in EXTENSIONS])
