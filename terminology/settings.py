"""The terminology section of the configuration: ``CONCIERGE_TERMINOLOGY_*``.

Listed in README.md (Configuration); what they mean is in ``docs/how-to/load-snomed.md``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .rf2 import DEFAULT_LANGUAGE_REFSETS


class TerminologySettings(BaseSettings):
    """Where the terminology store is and how expansions are bounded."""

    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_TERMINOLOGY_", extra="ignore", env_ignore_empty=True
    )

    #: The store (a SQLAlchemy SQLite URL; its search index is SQLite FTS5). None: SQLite file
    #: ``terminology.db`` under ``CONCIERGE_HOME``.
    store_url: str | None = None
    #: Language reference sets whose preferred synonym is a concept's term, most preferred
    #: first (comma-separated SCTIDs).
    language_refsets: str = ",".join(str(r) for r in DEFAULT_LANGUAGE_REFSETS)
    #: An ECL expression or ValueSet expanding to more codes than this is refused (422): its
    #: expansion travels in the saved question's record on the trials topic.
    max_expansion: int = Field(default=50_000, ge=1, le=1_000_000)
    #: How often the API checks the store for a new release or ValueSets, and re-expands the
    #: saved questions whose expansions changed (0: never).
    refresh_seconds: float = Field(default=5.0, ge=0)

    @field_validator("store_url")
    @classmethod
    def _sqlite(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith("sqlite"):
            raise ValueError("must be a sqlite:/// URL (the search index is SQLite FTS5)")
        return url

    @field_validator("language_refsets")
    @classmethod
    def _ids(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError("must be comma-separated SNOMED CT ids of language refsets")
        return ",".join(parts)

    @property
    def language_refset_ids(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.language_refsets.split(","))

    def resolved_store_url(self, home: Path) -> str:
        if self.store_url:
            return self.store_url
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'terminology.db'}"


__all__ = ["TerminologySettings"]
