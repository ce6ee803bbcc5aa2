"""The regulator dashboard's section of the configuration.

``CONCIERGE_API_URL`` (the API it reads), ``CONCIERGE_DASHBOARD_TOKEN`` (a regulator token),
``CONCIERGE_DASHBOARD_PORT``, ``CONCIERGE_DASHBOARD_BIND``,
``CONCIERGE_DASHBOARD_REFRESH_SECONDS`` and ``CONCIERGE_DASHBOARD_ROWS``. A wrong value is an
error, never a silent default; the tree that validates every section at start-up is
:mod:`concierge.configuration`.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_PORT = 8501
DEFAULT_REFRESH_SECONDS = 2.0


class DashboardSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_DASHBOARD_",
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
    )

    #: The API the dashboard reads; unset: the API's own host and port.
    api_url: str | None = Field(default=None, min_length=1, validation_alias="CONCIERGE_API_URL")
    #: A bearer token with the role ``regulator``; unset: ``concierge dashboard`` issues one.
    token: SecretStr | None = None
    #: The port it serves on, and the address it listens on (loopback unless opened on
    #: purpose, e.g. 0.0.0.0 in a container; every page reads the API with the regulator token).
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    bind: str = "127.0.0.1"

    @field_validator("bind")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        import ipaddress

        try:
            return str(ipaddress.ip_address(value.strip().strip("[]")))
        except ValueError:
            raise ValueError("must be an IP address, e.g. 127.0.0.1, ::1 or 0.0.0.0") from None

    #: How often the live parts re-read the API.
    refresh_seconds: float = Field(default=DEFAULT_REFRESH_SECONDS, gt=0, allow_inf_nan=False)
    #: Rows of the signal table shown at first.
    rows: int = Field(default=15, ge=5, le=1000)

    @property
    def api(self) -> str:
        """The API's address, the default one when none is configured."""
        return self.api_url or DEFAULT_API_URL
