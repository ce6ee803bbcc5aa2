"""Recruitment configuration, by environment variables prefixed ``CONCIERGE_RECRUITMENT_``.

Kafka, the topic prefix and ``CONCIERGE_HOME`` come from :mod:`core.settings`; everything
specific to recruitment (its database, the fatigue rules, notification channels and schedules) is
here, so the product-wide settings class does not grow a field per package. It is the
``recruitment`` section of the tree :mod:`concierge.configuration` validates at start-up.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.settings import get_settings


def _default_public_url() -> str:
    """The API as this machine reaches it (``CONCIERGE_API_HOST``, ``CONCIERGE_API_PORT``)."""
    return get_settings().api_address()


class RecruitmentSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_RECRUITMENT_",
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
    )

    #: The recruitment database (SQLAlchemy URL); SQLite under ``CONCIERGE_HOME`` by default.
    url: str | None = None

    # --- rules ---
    #: Days after a patient declines an invitation before they may be invited to any trial.
    cooldown_days: int = Field(default=90, ge=0)
    #: Invitations per patient across all trials within ``cap_window_days``.
    yearly_cap: int = Field(default=3, ge=1)
    cap_window_days: int = Field(default=365, ge=1)
    #: An open invitation with no change for this many days expires.
    expiry_days: int = Field(default=30, ge=1)
    #: A clinician who has not acted on an invitation for this many days gets one reminder.
    reminder_days: int = Field(default=7, ge=1)

    # --- consumer ---
    consumer_group: str = "concierge-recruitment"
    #: Kafka static membership (``group.instance.id``): a restarted consumer with the same id
    #: takes its partitions back at once instead of waiting out the session timeout.
    instance_id: str | None = None
    batch_size: int = Field(default=500, ge=1)
    #: Port of ``concierge recruitment run``'s ``/healthz``, ``/readyz`` and ``/metrics``
    #: (0: none), and the address it listens on (loopback unless opened on purpose: the pages
    #: carry no patient data, see docs/how-to/deploy-cluster.md).
    status_port: int = Field(default=6067, ge=0, le=65535)
    status_bind: str = "127.0.0.1"

    @field_validator("status_bind")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        import ipaddress

        try:
            return str(ipaddress.ip_address(value.strip().strip("[]")))
        except ValueError:
            raise ValueError("must be an IP address, e.g. 127.0.0.1, ::1 or 0.0.0.0") from None

    # --- notifications ---
    #: The public address of the API that links in notifications point to (the clinician page,
    #: ``/clinician``, where the clinician signs in to see who the patient is).
    #: ``CONCIERGE_PUBLIC_URL`` (or ``CONCIERGE_RECRUITMENT_APP_BASE_URL``); by default the API's
    #: own host and port (``CONCIERGE_API_HOST``, ``CONCIERGE_API_PORT``).
    app_base_url: str = Field(
        default_factory=_default_public_url,
        validation_alias=AliasChoices("CONCIERGE_PUBLIC_URL", "CONCIERGE_RECRUITMENT_APP_BASE_URL"),
    )
    email_enabled: bool = True
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_sender: str = "recruitment@concierge.invalid"
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_seconds: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    #: When set, every notification is also POSTed here as JSON, signed with ``webhook_secret``.
    webhook_url: str | None = None
    webhook_secret: SecretStr = SecretStr("change-me-this-is-a-development-webhook-key")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=30.0, gt=0)
    backoff_max_seconds: float = Field(default=6 * 3600.0, gt=0)

    # --- scheduled work ---
    timezone: str = "Europe/London"
    digest_hour: int = Field(default=7, ge=0, le=23)
    dispatch_interval_seconds: int = Field(default=15, ge=1)
    housekeeping_interval_minutes: int = Field(default=60, ge=1)

    @field_validator("timezone")
    @classmethod
    def _a_time_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"not a time zone: {name!r} (e.g. Europe/London)") from None
        return name

    def resolved_url(self, home: Path | None = None) -> str:
        if self.url:
            return self.url
        home = home or get_settings().home
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'recruitment.sqlite'}"

    @property
    def cooldown(self) -> timedelta:
        return timedelta(days=self.cooldown_days)

    @property
    def cap_window(self) -> timedelta:
        return timedelta(days=self.cap_window_days)


@lru_cache(maxsize=1)
def get_recruitment_settings() -> RecruitmentSettings:
    return RecruitmentSettings()
