"""The SQL tables disclosure control persists (the publication registry's publications,
relations, overlap events and last answers; the query budget's questions and locks), and
:func:`open_engine`, which opens them (the store's Alembic migrations make them). See
``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from core.db import Schema, ensure_engine_schema, make_engine

metadata = sa.MetaData()

publications_table = sa.Table(
    "dc_publications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("cardinality", sa.Integer, nullable=False, index=True),
    sa.Column("bitmap", sa.LargeBinary, nullable=False),
    sa.Column("value", sa.Integer, nullable=True),
    sa.Column("display", sa.Text, nullable=False),
    sa.Column("hidden", sa.Boolean, nullable=False),
    # the publication this one copies (overlap control), null for a fresh publication
    sa.Column("copied_from", sa.Integer, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

relations_table = sa.Table(
    "dc_relations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # publication ids: |parent| = sum of |children| (children as a JSON list, with repeats)
    sa.Column("parent", sa.Integer, nullable=False),
    sa.Column("children", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

overlap_events_table = sa.Table(
    "dc_overlap_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("hits", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_dc_overlap_events_org_at", "org", "at"),
)

# the last answer each organisation got to each question (its cells' displays and the policy,
# and per cell the last few displays it saw before): one row per (org, fingerprint), replaced
# when the answer changes
answers_table = sa.Table(
    "dc_answers",
    metadata,
    sa.Column("org", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, primary_key=True),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


# one number per patient pseudonym, shared by every process on the database (migration 0003):
# the registry's bitmaps are of these numbers. Pseudonyms: as sensitive as the bitmaps.
patient_numbers_table = sa.Table(
    "dc_patient_numbers",
    metadata,
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("patient", sa.String(128), nullable=False, unique=True),
)

budget_queries_table = sa.Table(
    "dc_budget_queries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_dc_budget_queries_org_at", "org", "at"),
)

budget_locks_table = sa.Table(
    "dc_budget_locks",
    metadata,
    sa.Column("org", sa.Text, primary_key=True),
    sa.Column("locked", sa.Boolean, nullable=False),
    sa.Column("locked_at", sa.Float, nullable=True),
    sa.Column("unlocked_at", sa.Float, nullable=True),
)

# The sponsor workspace (``feasibility/workspace/``), in the same database (migration 0002).
# Every membership change of a saved question's cohort as the API read it from the cohort
# topic, which is compacted (only each patient's latest record survives): arrival rates and the
# live count's history need the changes, so they are kept here. Pseudonyms: as sensitive as
# the registry's bitmaps.
cohort_changes_table = sa.Table(
    "ws_cohort_changes",
    metadata,
    sa.Column("trial", sa.String(200), primary_key=True),
    sa.Column("patient", sa.String(128), primary_key=True),
    sa.Column("change", sa.Integer, primary_key=True),
    sa.Column("member", sa.Boolean, nullable=False),
    # stream time of the change, epoch seconds
    sa.Column("at", sa.Float, nullable=False),
)

# when the API first saw every partition's first evaluation of a saved question complete:
# members before it were there when the question was registered; later ones arrived
cohort_baselines_table = sa.Table(
    "ws_cohort_baselines",
    metadata,
    sa.Column("trial", sa.String(200), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
)

# every answer a sponsor organisation got (the protected body, as sent), for its history and
# exports
sponsor_answers_table = sa.Table(
    "ws_sponsor_answers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("trial", sa.String(200), nullable=True),
    sa.Column("title", sa.Text, nullable=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_ws_sponsor_answers_org_at", "org", "at"),
)


#: The tables above are made only by the migrations in ``feasibility/disclosure/migrations``.
SCHEMA = Schema(
    name="disclosure registry",
    migrations=Path(__file__).parent / "migrations",
    version_table="disclosure_alembic_version",
)


def open_engine(target: str | sa.Engine) -> sa.Engine:
    """An engine on the registry's database (``target``: a URL, or an engine to share), migrated
    to the code's revision. An in-memory SQLite URL gets one shared connection."""
    if isinstance(target, sa.Engine):
        engine = target
    else:
        url = sa.make_url(target)
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one shared in-memory database
        engine = make_engine(url.render_as_string(hide_password=False), **kwargs)
    ensure_engine_schema(SCHEMA, engine)
    return engine


__all__ = [
    "SCHEMA",
    "answers_table",
    "budget_locks_table",
    "budget_queries_table",
    "cohort_baselines_table",
    "cohort_changes_table",
    "metadata",
    "open_engine",
    "overlap_events_table",
    "publications_table",
    "relations_table",
    "sponsor_answers_table",
]
