"""Recruitment configuration, by environment variables prefixed ``CONCIERGE_RECRUITMENT_``.

Kafka, the topic prefix and ``CONCIERGE_HOME`` come from :mod:`concierge.settings`; everything
specific to recruitment (its database, the fatigue rules, notification channels and schedules) is
here, so the product-wide settings class does not grow a field per package.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from concierge.settings import get_settings


class RecruitmentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONCIERGE_RECRUITMENT_", extra="ignore")

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

    # --- notifications ---
    #: Links in notifications point here; the clinician opens the app to see who the patient is.
    app_base_url: str = "http://127.0.0.1:8000"
    email_enabled: bool = True
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_sender: str = "recruitment@concierge.invalid"
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_seconds: float = 10.0
    #: When set, every notification is also POSTed here as JSON, signed with ``webhook_secret``.
    webhook_url: str | None = None
    webhook_secret: SecretStr = SecretStr("change-me-this-is-a-development-webhook-key")
    webhook_timeout_seconds: float = 10.0
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=30.0, gt=0)
    backoff_max_seconds: float = Field(default=6 * 3600.0, gt=0)

    # --- scheduled work ---
    timezone: str = "Europe/London"
    digest_hour: int = Field(default=7, ge=0, le=23)
    dispatch_interval_seconds: int = Field(default=15, ge=1)
    housekeeping_interval_minutes: int = Field(default=60, ge=1)

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
