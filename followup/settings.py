"""Follow-up configuration, by environment variables prefixed ``CONCIERGE_FOLLOWUP_``.

The follow-up tables live in the recruitment database (``CONCIERGE_RECRUITMENT_URL``): the
service reads its enrolments and queues safety notifications in its outbox in the same
transaction as its own effects. The ``followup`` section of the tree
:mod:`concierge.configuration` validates at start-up. Kafka, the topic prefix and
``CONCIERGE_HOME`` come from :mod:`core.settings`.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_SECRET = "change-me-this-is-a-development-follow-up-key"


class FollowupSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONCIERGE_FOLLOWUP_", extra="ignore")

    #: The secret every trial's pseudonym key is derived from (HKDF, one key per trial).
    secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    #: The Kafka consumer group several ``concierge followup`` instances share (with ``group``).
    consumer_group: str = Field(default="concierge-followup", min_length=1, max_length=200)
    #: Several instances share the facts topic's partitions as a consumer group (offsets stay
    #: in the database); false: one instance reads every partition.
    group: bool = False
    batch_size: int = Field(default=500, ge=1)
    #: How often the relay looks for feed entries to publish on the trials' topics.
    relay_interval_seconds: float = Field(default=0.2, gt=0, le=60, allow_inf_nan=False)
    #: An answer from the follow-up tables is ``partial`` when the consumer's committed offsets
    #: have not reached the facts topic's high watermarks measured at most this long ago.
    max_lag_seconds: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    #: The consumer is down (503) when its newest heartbeat is older than this.
    down_after_seconds: float = Field(default=15.0, ge=3, le=3600, allow_inf_nan=False)
    #: Port of ``concierge followup``'s ``/healthz`` and ``/readyz`` (0: none), on loopback.
    status_port: int = Field(default=6068, ge=0, le=65535)

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value


@lru_cache(maxsize=1)
def get_followup_settings() -> FollowupSettings:
    return FollowupSettings()
