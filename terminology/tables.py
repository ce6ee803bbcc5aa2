"""The terminology store's tables (SQLite: the search index is an FTS5 table)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

releases = sa.Table(
    "terminology_releases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("system", sa.Text, nullable=False),
    #: e.g. http://snomed.info/sct/83821000000107/version/20240410
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("concepts", sa.Integer, nullable=False),
    sa.Column("active_concepts", sa.Integer, nullable=False),
    sa.Column("is_a", sa.Integer, nullable=False),
    sa.Column("descriptions", sa.Integer, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("current", sa.Boolean, nullable=False),
)

concepts = sa.Table(
    "sct_concepts",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("module", sa.BigInteger, nullable=False),
    sa.Column("effective", sa.Text, nullable=False),
    sa.Column("fsn", sa.Text, nullable=True),
    #: the preferred term in the first language reference set that has one
    sa.Column("term", sa.Text, nullable=True),
    sa.Column("semantic_tag", sa.Text, nullable=True),
    sa.Column("descendants", sa.Integer, nullable=False),
)

descriptions = sa.Table(
    "sct_descriptions",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("concept", sa.BigInteger, nullable=False, index=True),
    sa.Column("term", sa.Text, nullable=False),
    #: "fsn" or "synonym"
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("preferred", sa.Boolean, nullable=False),
)

#: The active is-a hierarchy of the current release (:class:`terminology.hierarchy.Hierarchy`
#: as arrays), one row per release id.
hierarchies = sa.Table(
    "sct_hierarchy",
    metadata,
    sa.Column("release", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("arrays", sa.LargeBinary, nullable=False),
)

valuesets = sa.Table(
    "fhir_valuesets",
    metadata,
    sa.Column("url", sa.Text, primary_key=True),
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=True),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
)

#: ``generation``: bumped by every load (a release or ValueSets), so readers know to re-expand.
state = sa.Table(
    "terminology_state",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)

#: Word search over descriptions (FTS5; rowids rank the descriptions, see the store's load).
#: Made by the migration and remade by each load (dropping it is much faster than deleting a
#: million rows from it). Prefix indexes of 2, 3 and 4 characters make a word-prefix query read
#: one doclist instead of merging those of every word with that prefix (on a UK-size release:
#: p99 17-37 ms against 80-110 ms without, on a loaded 2-core machine).
SEARCH_TABLE = "sct_search"
SEARCH_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {SEARCH_TABLE} USING fts5("
    "term, concept UNINDEXED, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3 4')"
)

__all__ = [
    "SEARCH_DDL",
    "SEARCH_TABLE",
    "concepts",
    "descriptions",
    "hierarchies",
    "metadata",
    "releases",
    "state",
    "valuesets",
]
