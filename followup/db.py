"""The follow-up store: its :class:`core.db.Schema` (own version table) and its URL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from core import db as core_db

SCHEMA = core_db.Schema(
    name="followup",
    migrations=Path(__file__).parent / "migrations",
    version_table="followup_alembic_version",
    migrate_hint="restart `concierge followup` (or the API) to migrate it",
)


def default_url(home: Path | None = None) -> str:
    """The recruitment database's URL (the follow-up tables live beside its enrolments)."""
    from recruitment.settings import get_recruitment_settings

    return get_recruitment_settings().resolved_url(home)


def ensure(engine: sa.Engine) -> None:
    """Migrate the follow-up tables on ``engine`` if they are behind (recruitment's first)."""
    from recruitment.db import SCHEMA as RECRUITMENT

    core_db.ensure_engine_schema(RECRUITMENT, engine)
    core_db.ensure_engine_schema(SCHEMA, engine)


def upgrade(url: str | None = None) -> None:
    """The follow-up tables and, under them, recruitment's (enrolments, the outbox)."""
    from recruitment.db import upgrade as recruitment_upgrade

    url = url or default_url()
    recruitment_upgrade(url)
    core_db.upgrade(SCHEMA, url)
