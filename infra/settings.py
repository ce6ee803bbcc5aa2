"""The local broker's section of the configuration (``concierge broker``, the demo, the tests).

Its variables keep the names they always had: ``CONCIERGE_KAFKA_VERSION``,
``CONCIERGE_BROKER_PORT``, ``CONCIERGE_CONTROLLER_PORT``, ``CONCIERGE_BROKER_HEAP``. The tree that
validates every section at start-up is :mod:`concierge.configuration`.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_VERSION = "4.1.1"


class BrokerSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True)

    #: The Kafka release fetched from Maven Central.
    version: str = Field(
        default=DEFAULT_VERSION,
        pattern=r"^\d+\.\d+\.\d+$",
        validation_alias="CONCIERGE_KAFKA_VERSION",
    )
    port: int = Field(default=9092, ge=1, le=65535, validation_alias="CONCIERGE_BROKER_PORT")
    controller_port: int = Field(
        default=9093, ge=1, le=65535, validation_alias="CONCIERGE_CONTROLLER_PORT"
    )
    #: The JVM heap (``-Xmx``), e.g. ``768m`` or ``2g``.
    heap: str = Field(
        default="768m", pattern=r"^[1-9][0-9]*[kKmMgG]?$", validation_alias="CONCIERGE_BROKER_HEAP"
    )
