"""The product-wide section of the configuration (Kafka, home, site keys, tokens, which services
run) and the one rule for a bad value: :class:`ConfigurationError`, one line naming the
environment variable.

It was ``concierge/settings.py``; it is at the bottom now so that every layer can read it. Each
package keeps its own section (``recruitment.settings``, ``surveillance_stream.settings``,
``infra.settings``, ``dashboards.settings``, ``feasibility.disclosure.settings``), and
:mod:`concierge.configuration` composes them with this one into the tree the application
validates at start-up. See "Configuration" in ``docs/explanation/architecture.md`` and README's
table of variables.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

#: A TCP port to bind or reach.
Port = Annotated[int, Field(ge=1, le=65535)]


#: The key id of ``CONCIERGE_TOKEN_KEY`` (the one key, when no others are listed).
DEFAULT_KEY_ID = "default"
#: What a key id may look like (it travels in every token's header).
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
#: Algorithms an external OpenID Connect provider may sign with: asymmetric only, so a key the
#: API can read (the provider's public key) can never sign.
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


def parse_token_keys(text: str) -> dict[str, bytes]:
    """``kid=key,kid=key`` or a JSON object ``{"kid": "key"}`` as ``{kid: key bytes}``, in the
    order given; :class:`ValueError` naming what is wrong (never a key)."""
    text = text.strip()
    pairs: list[tuple[str, str]] = []
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("is not valid JSON") from None
        if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
            raise ValueError('must be a JSON object of strings {"kid": "key"}')
        pairs = list(document.items())
    else:
        for item in text.split(","):
            kid, sep, key = item.strip().partition("=")
            if not sep:
                raise ValueError("must be kid=key pairs separated by commas, or a JSON object")
            pairs.append((kid.strip(), key.strip()))
    if not pairs:
        raise ValueError("lists no key")
    keys: dict[str, bytes] = {}
    for kid, key in pairs:
        if not KEY_ID_RE.match(kid):
            raise ValueError(f"key id {kid[:70]!r} is not 1 to 64 of A-Z a-z 0-9 . _ -")
        if kid in keys:
            raise ValueError(f"key id {kid!r} is listed twice")
        if len(key.encode()) < 32:
            raise ValueError(f"key {kid!r} must be at least 32 bytes (RFC 7518 3.2)")
        keys[kid] = key.encode()
    return keys


#: The audit key used when CONCIERGE_AUDIT_KEY is not set: for development only.
DEVELOPMENT_AUDIT_KEY = "change-me-this-is-a-development-audit-key"
DEVELOPMENT_PSEUDONYM_KEY = "change-me-this-is-a-development-key"
DEVELOPMENT_TOKEN_KEY = "change-me-this-is-a-development-token-key"


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "concierge"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONCIERGE_", extra="ignore")

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "CONCIERGE_KAFKA_BOOTSTRAP_SERVERS"
        ),
    )
    #: Prepended to every topic name; tests use it to get topics of their own.
    topic_prefix: str = ""
    #: Replicas of each topic the product creates (``concierge topics create``, the worker's
    #: own table topics): 1 on one broker, 3 on a cluster of three or more.
    topic_replication_factor: int = Field(default=1, ge=1, le=16)
    #: Where local state lives (broker data, identity vault, worker tables).
    home: Path = Field(default_factory=_default_home)

    # --- the site: pseudonymisation key and identity vault never leave it ---
    site_id: str = "site-local"
    #: Key of the HMAC that turns source identifiers into patient pseudonyms. Keep it secret.
    pseudonym_key: SecretStr = SecretStr(DEVELOPMENT_PSEUDONYM_KEY)
    #: The site-local identity vault (SQLAlchemy URL). Defaults to SQLite under ``home``.
    vault_url: str | None = None
    #: Default ``source system`` recorded in provenance when a resource does not say.
    source_system: str = "urn:concierge:source:default"

    #: Key that signs API tokens (HS256; at least 32 bytes, RFC 7518 3.2), under the key id
    #: ``default``. Keep it secret. To rotate, list several keys in ``token_keys`` instead.
    token_key: SecretStr = SecretStr(DEVELOPMENT_TOKEN_KEY)
    #: Several signing keys at once, for rotation: ``kid=key,kid=key`` or a JSON object
    #: ``{"kid": "key"}``. Every listed key verifies tokens; ``token_key_id`` (default: the first
    #: listed) signs new ones. Replaces ``token_key`` (setting both is an error).
    token_keys: SecretStr | None = None
    #: The key id (``kid``) that signs new tokens: one of ``token_keys``, or ``default``.
    token_key_id: str | None = None
    #: The token revocation list (SQLAlchemy URL; a table of its own, with its own migrations).
    #: Defaults to the audit log's database.
    token_revocation_url: str | None = None
    #: An external OpenID Connect provider whose tokens the API also accepts: its ``iss``, and
    #: where its signing keys are published (a JWKS, by ``https://``, ``http://`` or ``file://``).
    oidc_issuer: str | None = None
    oidc_jwks_url: str | None = None
    #: The asymmetric algorithms accepted from the provider (comma-separated).
    oidc_algorithms: str = "RS256,ES256"
    #: The ``aud`` every API token carries and the API requires.
    token_audience: str = Field(default="urn:concierge:api", min_length=1)
    #: The ``iss`` of the tokens this site issues, the only one the API trusts.
    token_issuer: str = Field(default="urn:concierge:token-issuer", min_length=1)
    #: Clock skew allowed when checking a token's ``exp`` and ``iat``.
    token_leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    #: The audit log (SQLAlchemy URL). Defaults to SQLite under ``home``.
    audit_url: str | None = None
    #: Key of the HMAC that chains audit records (at least 32 bytes). It must not live in the
    #: audit database: whoever holds it can rebuild the chain. Keep it secret; see
    #: ``docs/explanation/security.md`` (Audit trail and anchors).
    audit_key: SecretStr = SecretStr(DEVELOPMENT_AUDIT_KEY)
    #: Earlier audit keys, comma-separated, still accepted when verifying the records they
    #: chained (each record names its key by id); new records use ``audit_key`` only.
    audit_retired_keys: SecretStr = SecretStr("")
    #: How often the API publishes the audit chain's head to the anchors topic (0: never, for
    #: tests and processes without a broker; ``concierge audit verify --against-anchors`` then
    #: has nothing to check against).
    audit_anchor_seconds: float = Field(default=10.0, ge=0, le=3600, allow_inf_nan=False)

    @field_validator("audit_key")
    @classmethod
    def _audit_key_long_enough(cls, key: SecretStr) -> SecretStr:
        if len(key.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return key

    @field_validator("audit_retired_keys")
    @classmethod
    def _retired_audit_keys_long_enough(cls, keys: SecretStr) -> SecretStr:
        for part in keys.get_secret_value().split(","):
            if part.strip() and len(part.strip().encode()) < 32:
                raise ValueError("each key must be at least 32 bytes (comma-separated)")
        return keys

    def audit_keys(self) -> tuple[bytes, tuple[bytes, ...]]:
        """The current audit key and the retired ones still accepted for verification."""
        retired = self.audit_retired_keys.get_secret_value().split(",")
        return (
            self.audit_key.get_secret_value().encode(),
            tuple(part.strip().encode() for part in retired if part.strip()),
        )

    # --- adapters ---
    #: ``fast``: checked extraction of every element the product uses; fhir.resources runs only to
    #: explain a rejection. ``full``: fhir.resources validates every resource before extraction.
    validation_mode: Literal["fast", "full"] = "fast"
    #: Resources larger than this many bytes are dead-lettered (and refused with 413 over HTTP).
    max_resource_bytes: int = Field(default=1_000_000, gt=0)
    #: The largest body ``POST /fhir`` reads (a Bundle); larger ones are refused with 413.
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    #: How long an ingest request may wait for the broker to acknowledge what it published (and
    #: for its turn at the one ingestor) before answering 503 with Retry-After.
    ingest_timeout_seconds: float = Field(default=5.0, gt=0)

    # --- feasibility ---
    #: Disclosure-control registry and query budgets (SQLAlchemy URL). Defaults to SQLite.
    feasibility_url: str | None = None
    #: Whether the API keeps a columnar snapshot of the facts topic for ad hoc questions.
    feasibility_feed: bool = True

    #: Whether the API serves clinicians (the recruitment database, migrated on start).
    recruitment_api: bool = True

    #: Whether this API process runs the device-signal monitor in-process (the single-process
    #: demo). Off by default: the monitor is its own service (``concierge monitor``), exactly
    #: one per deployment since it is the only writer of the signals topic.
    surveillance_monitor: bool = False

    #: The monitor service's base URL (``concierge monitor``): API processes forward
    #: ``/v1/surveillance`` to it and report its readiness as their ``signals`` view. Empty:
    #: this API serves no signals (503) unless ``surveillance_monitor`` runs one in-process.
    surveillance_monitor_url: str = ""
    monitor_port: Port = 8010

    # --- services ---
    #: How every service logs: ``text`` (one line for a person) or ``json`` (one JSON object
    #: per line for a log collector; concierge/logs.py).
    log_format: Literal["text", "json"] = "text"
    api_host: str = "127.0.0.1"
    api_port: Port = 8000
    worker_web_port: Port = 6066
    #: The address the worker's status pages listen on (Faust's ``web_bind``; its ``web_host``
    #: only names the worker in URLs). Loopback unless an operator opens it on purpose: every
    #: page but ``/health`` and ``/readyz`` needs an admin token even then.
    worker_web_bind: str = "127.0.0.1"
    worker_id: str = Field(default="concierge-stream", min_length=1)
    #: How often the worker sends a stream-time tick to each partition it owns (0: never; tests
    #: that control time send their own ticks).
    stream_tick_seconds: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    #: Whether the worker keeps device-counter contributions (device-safety surveillance).
    stream_device_counters: bool = True
    #: More worker extensions, comma-separated dotted paths ``module:function``; each function
    #: is called with the worker's StreamApp before it starts and may add agents, tables, pages
    #: and on_change hooks (the device counters are one such extension).
    stream_extensions: str = ""
    #: How often the worker checks the trials topic for saved questions its partitions lack.
    stream_trial_sync_seconds: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    #: How far the stream's time may trail the wall clock before saved answers say 503 (the
    #: worker ticks every CONCIERGE_STREAM_TICK_SECONDS; a dead or stalled worker stops them).
    stream_max_lag_seconds: float = Field(default=15.0, gt=0)
    #: The worker's consumer-group session timeout: how long the partitions of a worker that
    #: died wait before another (or the restarted one) gets them.
    stream_session_timeout_seconds: float = Field(default=10.0, ge=6.0, le=300.0)
    #: How long a facts partition may stand still while messages wait past it (the broker
    #: answering, no rebuild under way) before the worker calls it stalled: /readyz then says
    #: so (503), /metrics counts it and the log says once where the stream waits.
    stream_stall_seconds: float = Field(default=60.0, ge=5.0, le=3600, allow_inf_nan=False)
    #: How often the worker writes a local checkpoint of each partition's patient state (the
    #: state and the facts offset it reflects, in RocksDB under the worker's data directory), so
    #: that a restart replays only the facts after it; 0: never (a restart reads every partition
    #: from offset 0).
    stream_checkpoint_seconds: float = Field(default=30.0, ge=0, le=3600, allow_inf_nan=False)
    #: How many patients' state the worker keeps in memory beyond those changed since the
    #: last checkpoint, across its partitions (the rest is read from the local checkpoint when
    #: needed); 0: every patient stays in memory. Only with checkpoints on.
    stream_state_cache_patients: int = Field(default=50_000, ge=0)
    #: Whether the worker keeps standby checkpoints of the facts partitions it does not own
    #: (``surveillance_stream.standby``): a plain consumer folds them, without effects, into the
    #: same local checkpoints at offsets the group has committed, so a partition that fails over
    #: to this worker reads only the tail. Needs checkpoints on.
    stream_standby: bool = False

    @field_validator("token_key")
    @classmethod
    def _long_enough(cls, key: SecretStr) -> SecretStr:
        if len(key.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (RFC 7518 3.2)")
        return key

    @field_validator("worker_web_bind")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip().strip("[]")))
        except ValueError:
            raise ValueError("must be an IP address, e.g. 127.0.0.1, ::1 or 0.0.0.0") from None

    @field_validator("token_keys")
    @classmethod
    def _key_list(cls, keys: SecretStr | None) -> SecretStr | None:
        if keys is not None:
            parse_token_keys(keys.get_secret_value())  # raises ValueError with the reason
        return keys

    @field_validator("token_key_id")
    @classmethod
    def _names_a_key(cls, kid: str | None, info: ValidationInfo) -> str | None:
        if kid is None or "token_keys" not in info.data:  # the list itself is wrong: said so
            return kid
        listed = info.data["token_keys"]
        kids = (
            list(parse_token_keys(listed.get_secret_value()))
            if isinstance(listed, SecretStr)
            else [DEFAULT_KEY_ID]
        )
        if kid not in kids:
            raise ValueError(f"names no signing key (the keys are {', '.join(kids)})")
        return kid

    @field_validator("oidc_algorithms")
    @classmethod
    def _asymmetric(cls, value: str) -> str:
        names = [a.strip() for a in value.split(",") if a.strip()]
        wrong = [a for a in names if a not in OIDC_ALGORITHMS]
        if not names or wrong:
            raise ValueError(
                f"must be a comma-separated list of {', '.join(OIDC_ALGORITHMS)}"
                + (f" (not {', '.join(wrong)})" if wrong else "")
            )
        return ",".join(names)

    @model_validator(mode="after")
    def _tokens_agree(self) -> Settings:
        if self.stream_standby and self.stream_checkpoint_seconds == 0:
            raise ValueError(
                "CONCIERGE_STREAM_STANDBY needs CONCIERGE_STREAM_CHECKPOINT_SECONDS above 0 "
                "(standbys are local checkpoints)"
            )
        if self.token_keys is not None and "token_key" in self.model_fields_set:
            raise ValueError(
                "set CONCIERGE_TOKEN_KEYS or CONCIERGE_TOKEN_KEY, not both (list the single key "
                "in CONCIERGE_TOKEN_KEYS as default=...)"
            )
        if (self.oidc_issuer is None) != (self.oidc_jwks_url is None):
            raise ValueError("set CONCIERGE_OIDC_ISSUER and CONCIERGE_OIDC_JWKS_URL together")
        if self.oidc_issuer is not None and self.oidc_issuer == self.token_issuer:
            raise ValueError(
                "CONCIERGE_OIDC_ISSUER must differ from CONCIERGE_TOKEN_ISSUER (the issuer says "
                "which keys verify a token)"
            )
        if self.oidc_jwks_url is not None and not self.oidc_jwks_url.startswith(
            ("https://", "http://", "file://")
        ):
            raise ValueError("CONCIERGE_OIDC_JWKS_URL must be an https://, http:// or file:// URL")
        return self

    def development_keys(self) -> list[str]:
        """The variables still at their public development defaults (each must be set in
        production: ``docs/explanation/security.md``)."""
        found = []
        if self.pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY:
            found.append("CONCIERGE_PSEUDONYM_KEY")
        if DEVELOPMENT_TOKEN_KEY.encode() in self.signing_keys().values():
            found.append("CONCIERGE_TOKEN_KEY")
        if self.audit_key.get_secret_value() == DEVELOPMENT_AUDIT_KEY:
            found.append("CONCIERGE_AUDIT_KEY")
        return found

    def signing_keys(self) -> dict[str, bytes]:
        """Every key that verifies this site's tokens, by key id, in the order configured."""
        if self.token_keys is not None:
            return parse_token_keys(self.token_keys.get_secret_value())
        return {DEFAULT_KEY_ID: self.token_key.get_secret_value().encode()}

    def signing_key_id(self) -> str:
        """The key id that signs new tokens."""
        return self.token_key_id or next(iter(self.signing_keys()))

    def resolved_token_revocation_url(self) -> str:
        return self.token_revocation_url or self.resolved_audit_url()

    def oidc_algorithm_list(self) -> list[str]:
        return self.oidc_algorithms.split(",")

    def resolved_vault_url(self) -> str:
        if self.vault_url:
            return self.vault_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'identity-vault.sqlite'}"

    def resolved_audit_url(self) -> str:
        if self.audit_url:
            return self.audit_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'audit.sqlite'}"

    def resolved_feasibility_url(self) -> str:
        if self.feasibility_url:
            return self.feasibility_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'feasibility.sqlite'}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def api_address(self) -> str:
        """The API as this machine reaches it: its host (loopback for a wildcard bind) and port."""
        return f"http://{_reachable(self.api_host)}:{self.api_port}"

    def worker_address(self) -> str:
        """The worker's status pages as this machine reaches them (loopback for a wildcard
        bind)."""
        return f"http://{_reachable(self.worker_web_bind)}:{self.worker_web_port}"


def _reachable(host: str) -> str:
    """A bind address as a URL host: loopback for a wildcard, IPv6 in brackets."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    if ":" in host:
        return f"[{host}]"
    return host


class ConfigurationError(ValueError):
    """A configuration value is missing or wrong. ``str()`` is one line naming the environment
    variable(s), fit to print at start-up instead of a traceback."""


def _field_of(cls: type[BaseSettings], loc: str) -> str | None:
    """The field an error's location names: the field itself or one of its aliases."""
    if loc in cls.model_fields:
        return loc
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if any(isinstance(c, str) and c.upper() == loc.upper() for c in choices):
            return name
    return None


def env_names(cls: type[BaseSettings], field: str) -> list[str]:
    """The environment variables a field of a settings class is read from, first preferred."""
    info = cls.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, str):
        return [alias.upper()]
    if isinstance(alias, AliasChoices):
        return [c.upper() for c in alias.choices if isinstance(c, str)]
    return [f"{cls.model_config.get('env_prefix', '')}{field}".upper()]


def _secret(cls: type[BaseSettings], field: str) -> bool:
    info = cls.model_fields.get(field)
    return info is not None and "Secret" in repr(info.annotation)


def describe(exc: ValidationError, classes: Iterable[type[BaseSettings]]) -> str:
    """One line for a settings class's validation error: each wrong variable, the value it has
    (never a secret's) and what is wrong with it."""
    by_title = {cls.__name__: cls for cls in classes}
    cls = by_title.get(exc.title)
    parts: list[str] = []
    for error in exc.errors(include_url=False):
        field = _field_of(cls, str(error["loc"][0])) if cls is not None and error["loc"] else None
        if cls is None or field is None:
            parts.append(f"{exc.title}: {str(error['msg']).removeprefix('Value error, ')}")
            continue
        names = env_names(cls, field)
        name = next((n for n in names if n in os.environ), names[0])
        shown = ""
        if name in os.environ and not _secret(cls, field):
            value = os.environ[name]
            shown = f"={value if len(value) <= 200 else value[:197] + '...'!r}"
        part = f"{name}{shown}: {str(error['msg']).removeprefix('Value error, ')}"
        if part not in parts:  # one per variable, not one per item of a list
            parts.append(part)
    return "bad configuration: " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The product-wide settings from the environment; :class:`ConfigurationError` (one line)
    when a value is wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(describe(exc, [Settings])) from None
