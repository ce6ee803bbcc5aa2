"""Wiring: an Ingestor on the real vault and the real Kafka sink, from settings."""

from __future__ import annotations

from core.settings import Settings

from .pipeline import Ingestor
from .pseudonym import Pseudonymiser
from .sinks import FactSink, KafkaSink
from .vault import SqlVault


def build_ingestor(
    settings: Settings,
    sink: FactSink | None = None,
    source: str | None = None,
    validation_mode: str | None = None,
) -> Ingestor:
    vault = SqlVault(settings.resolved_vault_url())
    return Ingestor(
        vault=vault,
        sink=sink or KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix),
        pseudonymiser=Pseudonymiser(settings.pseudonym_key.get_secret_value().encode()),
        source=source or settings.source_system,
        validation_mode=validation_mode or settings.validation_mode,  # type: ignore[arg-type]
        max_resource_bytes=settings.max_resource_bytes,
    )
