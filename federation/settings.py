"""The federation sections of the configuration: ``CONCIERGE_NODE_*`` (this API as a node of a
hub) and ``CONCIERGE_HUB_*`` (``concierge hub``). Listed in README.md (Configuration); what they
mean is in ``docs/explanation/federation.md``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Node and hub names: they appear in token audiences, URLs and answers.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class NodeSettings(BaseSettings):
    """This API as a node: who it is, whose questions it takes, and what it allows."""

    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_NODE_", extra="ignore", env_ignore_empty=True
    )

    #: This node's name at the hub. None: the API is no node (``/v1/federation`` answers 404).
    id: str | None = Field(default=None, pattern=NAME_PATTERN)
    #: This node's Ed25519 private key (PEM; ``concierge hub keygen``): it signs every reply.
    key_file: Path | None = None
    #: The hub whose questions this node answers, and its public key (PEM).
    hub_id: str = Field(default="hub", pattern=NAME_PATTERN)
    hub_public_key_file: Path | None = None
    #: Whether the hub's administrators may ask for exact counts (``/v1/federation/exact``);
    #: off by default: a data controller opts in.
    allow_exact: bool = False

    def enabled(self) -> bool:
        return self.id is not None


class HubSettings(BaseSettings):
    """``concierge hub``: its name, key, nodes and deadline."""

    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_HUB_", extra="ignore", env_ignore_empty=True
    )

    id: str = Field(default="hub", pattern=NAME_PATTERN)
    #: The hub's Ed25519 private key (PEM): it signs every question sent to a node.
    key_file: Path | None = None
    #: The registered nodes (JSON). None: ``hub/nodes.json`` under ``CONCIERGE_HOME``.
    nodes_file: Path | None = None
    #: How long the hub waits for the nodes; a node that has not answered by then is named in
    #: ``nodes_missing`` and the answer is ``partial``.
    deadline_seconds: float = Field(default=5.0, gt=0, le=120, allow_inf_nan=False)
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)


class BunnySettings(BaseSettings):
    """``concierge node poll``: the HDR UK Cohort Discovery task API this node polls."""

    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_BUNNY_", extra="ignore", env_ignore_empty=True
    )

    #: The task API's base URL (``GET {url}/task/nextjob/{collection}``). None: not polling.
    task_api_url: str | None = Field(default=None, pattern=r"^https?://")
    #: The collection (data set) id this node answers for at the task API.
    collection: str | None = Field(default=None, min_length=1)
    username: str = ""
    password: SecretStr = SecretStr("")
    #: Seconds between polls when the task API has no task (or is unreachable).
    poll_seconds: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    #: Seconds one request to the task API may take.
    timeout_seconds: float = Field(default=10.0, gt=0, le=300, allow_inf_nan=False)


__all__ = ["NAME_PATTERN", "BunnySettings", "HubSettings", "NodeSettings"]
