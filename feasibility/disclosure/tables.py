"""The SQL tables disclosure control persists (the publication registry's publications,
relations, overlap events and last answers; the query budget's questions and locks), and
:func:`open_engine`, which creates them. See ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

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


def open_engine(target: str | sa.Engine) -> sa.Engine:
    if isinstance(target, sa.Engine):
        engine = target
    else:
        url = sa.make_url(target)
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
        engine = sa.create_engine(url, **kwargs)
    metadata.create_all(engine)
    return engine


__all__ = [
    "answers_table",
    "budget_locks_table",
    "budget_queries_table",
    "metadata",
    "open_engine",
    "overlap_events_table",
    "publications_table",
    "relations_table",
]
