"""The terminology store: a local SQLite database of the current SNOMED CT release (concepts,
descriptions, the active is-a hierarchy, a word index) and FHIR ValueSets.

One release is current at a time; loading another replaces it in one transaction (readers see
the old one until it commits) and keeps a row per load in ``terminology_releases``. Every load
bumps ``generation``, which is how a running API learns that expansions may have changed.

SQLite only, on purpose: the word search is SQLite's FTS5, a release is read-mostly reference
data local to a node (like the release files themselves), and a bulk load of a UK release into
a local file takes a minute or two where a server round trip per batch would not. The engine
comes from :func:`core.db.make_engine` and the schema from Alembic (``migrations/``), as for
every store.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import sqlalchemy as sa

from core.codes import SNOMED
from core.db import Schema, ensure_schema, make_engine

from . import rf2
from .hierarchy import Hierarchy
from .tables import SEARCH_DDL, SEARCH_TABLE, releases, state

SCHEMA = Schema(
    name="terminology",
    migrations=Path(__file__).parent / "migrations",
    version_table="alembic_version_terminology",
)

_TAG = re.compile(r"\(([^()]*)\)\s*$")
_WORD = re.compile(r"\w+", re.UNICODE)


def search_words(text: str) -> list[str]:
    """The words a search looks for (lower case), each as the start of a word."""
    return _WORD.findall(text.lower())


class NoRelease(LookupError):
    """No SNOMED CT release is loaded in this store."""


@dataclass(frozen=True)
class ReleaseInfo:
    id: int
    system: str
    version: str
    source: str
    loaded_at: datetime
    concepts: int
    active_concepts: int
    is_a: int
    descriptions: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "version": self.version,
            "source": self.source,
            "loaded_at": self.loaded_at.isoformat(),
            "concepts": self.concepts,
            "active_concepts": self.active_concepts,
            "is_a": self.is_a,
            "descriptions": self.descriptions,
            "load_seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class ConceptSummary:
    code: str
    term: str | None
    fsn: str | None
    semantic_tag: str | None
    active: bool
    descendants: int
    #: the description that matched a search (None for look-ups by id)
    matched: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "system": SNOMED,
            "code": self.code,
            "term": self.term,
            "fsn": self.fsn,
            "semantic_tag": self.semantic_tag,
            "active": self.active,
            "descendants": self.descendants,
        }
        if self.matched is not None:
            out["matched"] = self.matched
        return out


@dataclass(frozen=True)
class ConceptDetail:
    concept: ConceptSummary
    parents: list[ConceptSummary]
    children: list[ConceptSummary]
    synonyms: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.concept.to_dict(),
            "synonyms": self.synonyms,
            "parents": [p.to_dict() for p in self.parents],
            "children": [c.to_dict() for c in self.children],
        }


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class TerminologyStore:
    """The store at ``url`` (migrated when opened)."""

    def __init__(
        self,
        url: str,
        language_refsets: Sequence[int] = rf2.DEFAULT_LANGUAGE_REFSETS,
    ) -> None:
        if not url.startswith("sqlite"):
            raise ValueError("the terminology store is SQLite (its search index is FTS5)")
        ensure_schema(SCHEMA, url)
        self.url = url
        self.engine = make_engine(url)
        self.language_refsets = tuple(language_refsets)
        self._cache_lock = threading.Lock()
        self._hierarchy: tuple[int, Hierarchy] | None = None

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ state

    def generation(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(state.c.value).where(state.c.key == "generation")
            ).scalar()
        return int(value or 0)

    def current(self) -> ReleaseInfo | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(releases)
                .where(releases.c.current.is_(True))
                .order_by(releases.c.id.desc())
            ).first()
        if row is None:
            return None
        return ReleaseInfo(
            id=row.id,
            system=row.system,
            version=row.version,
            source=row.source,
            loaded_at=_utc(row.loaded_at),
            concepts=row.concepts,
            active_concepts=row.active_concepts,
            is_a=row.is_a,
            descriptions=row.descriptions,
            seconds=row.seconds,
        )

    def history(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(releases).order_by(releases.c.id)).all()
        return [
            {
                "version": r.version,
                "loaded_at": _utc(r.loaded_at).isoformat(),
                "current": bool(r.current),
                "source": r.source,
            }
            for r in rows
        ]

    def hierarchy(self) -> tuple[ReleaseInfo, Hierarchy]:
        """The current release and its hierarchy (cached until another release is loaded)."""
        info = self.current()
        if info is None:
            raise NoRelease("no SNOMED CT release is loaded (concierge terminology load PATH)")
        with self._cache_lock:
            if self._hierarchy is not None and self._hierarchy[0] == info.id:
                return info, self._hierarchy[1]
            with self.engine.connect() as conn:
                blob = conn.exec_driver_sql(
                    "SELECT arrays FROM sct_hierarchy WHERE release = ?", (info.id,)
                ).scalar()
            if blob is None:
                raise NoRelease(f"release {info.version} has no hierarchy stored")
            hierarchy = Hierarchy.from_bytes(blob)
            self._hierarchy = (info.id, hierarchy)
            return info, hierarchy

    # ------------------------------------------------------------------ loading

    def load(self, path: Path, version: str | None = None) -> dict[str, Any]:
        """Load whatever ``path`` holds: an RF2 release (folder or zip), ValueSet JSON files
        (a resource or a Bundle each), or both. Returns what was loaded."""
        report: dict[str, Any] = {}
        if rf2.is_rf2(path):
            report["release"] = self.load_release(path, version).to_dict()
        sets = self.load_valuesets(path)
        if sets:
            report["valuesets"] = sets
        if not report:
            raise rf2.ReleaseError(
                f"{path}: neither RF2 Snapshot files nor FHIR ValueSet JSON found"
            )
        return report

    def load_release(self, path: Path, version: str | None = None) -> ReleaseInfo:
        started = time.perf_counter()
        with rf2.Release(path) as release:
            concepts = release.concepts()
            descriptions = release.descriptions()
            relationships = release.relationships()
            language = release.language()
            date = release.release_date()
        active = concepts.filter(pl.col("active") == 1)
        is_a = relationships.filter((pl.col("active") == 1) & (pl.col("typeId") == rf2.IS_A))
        hierarchy = Hierarchy.build(
            active.get_column("id").to_numpy(),
            child_ids=is_a.get_column("sourceId").to_numpy(),
            parent_ids=is_a.get_column("destinationId").to_numpy(),
        )
        counts = hierarchy.descendant_counts()
        descriptions = descriptions.filter(pl.col("active") == 1).join(
            concepts.select(pl.col("id").alias("conceptId")), on="conceptId", how="semi"
        )
        terms = self._preferred_terms(descriptions, language)
        fsn = (
            descriptions.filter(pl.col("typeId") == rf2.FSN)
            .sort("id")
            .unique("conceptId", keep="first")
            .select(pl.col("conceptId").alias("id"), pl.col("term").alias("fsn"))
        )
        table = (
            concepts.select("id", "active", "moduleId", "effectiveTime")
            .join(fsn, on="id", how="left")
            .join(terms, on="id", how="left")
            .with_columns(
                pl.col("fsn").str.extract(r"\(([^()]*)\)\s*$", 1).alias("semantic_tag"),
                pl.coalesce(
                    pl.col("term"), pl.col("fsn").str.replace(r"\s*\([^()]*\)\s*$", "")
                ).alias("term"),
            )
        )
        by_id = dict(zip(hierarchy.ids.tolist(), counts.tolist(), strict=True))
        if version is None:
            modules = Counter(active.get_column("moduleId").to_list())
            modules.pop(rf2.CORE_MODULE, None)
            module = modules.most_common(1)[0][0] if modules else rf2.CORE_MODULE
            effective = date or (str(concepts.get_column("effectiveTime").max()) or "unknown")
            version = f"{SNOMED}/{module}/version/{effective}"
        preferred_ids = set(terms.get_column("description").to_list())
        self._write(
            table,
            descriptions,
            preferred_ids,
            hierarchy,
            by_id,
            version,
            str(path),
            is_a.height,
            started,
        )
        info = self.current()
        assert info is not None
        return info

    def _preferred_terms(self, descriptions: pl.DataFrame, language: pl.DataFrame) -> pl.DataFrame:
        """``id, term, description``: each concept's preferred synonym in the first language
        reference set (in ``language_refsets`` order) that gives one; concepts without one
        fall back to their FSN without its semantic tag (done by the caller)."""
        rank = {refset: n for n, refset in enumerate(self.language_refsets)}
        preferred = language.filter(
            (pl.col("active") == 1)
            & (pl.col("acceptabilityId") == rf2.PREFERRED)
            & pl.col("refsetId").is_in(list(rank))
        ).with_columns(pl.col("refsetId").replace_strict(rank, default=len(rank)).alias("rank"))
        synonyms = descriptions.filter(pl.col("typeId") == rf2.SYNONYM)
        return (
            synonyms.join(
                preferred.select(pl.col("referencedComponentId").alias("id"), "rank"),
                on="id",
            )
            .sort("rank", "id")
            .unique("conceptId", keep="first")
            .select(
                pl.col("conceptId").alias("id"),
                pl.col("term"),
                pl.col("id").alias("description"),
            )
        )

    def _write(
        self,
        table: pl.DataFrame,
        descriptions: pl.DataFrame,
        preferred_ids: set[int],
        hierarchy: Hierarchy,
        counts: dict[int, int],
        version: str,
        source: str,
        is_a_rows: int,
        started: float,
    ) -> None:
        raw = self.engine.raw_connection()
        try:
            cursor: Any = raw.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute("DELETE FROM sct_concepts")
            cursor.execute("DELETE FROM sct_descriptions")
            cursor.execute("DELETE FROM sct_hierarchy")
            cursor.execute(f"DROP TABLE IF EXISTS {SEARCH_TABLE}")
            cursor.execute(SEARCH_DDL)
            cursor.executemany(
                "INSERT INTO sct_concepts (id, active, module, effective, fsn, term, "
                "semantic_tag, descendants) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (cid, bool(act), module, eff, fsn, term, tag, counts.get(cid, 0))
                    for cid, act, module, eff, fsn, term, tag in table.select(
                        "id",
                        "active",
                        "moduleId",
                        "effectiveTime",
                        "fsn",
                        "term",
                        "semantic_tag",
                    ).iter_rows()
                ),
            )
            rows = descriptions.select("id", "conceptId", "term", "typeId")
            cursor.executemany(
                "INSERT INTO sct_descriptions (id, concept, term, kind, preferred) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    (did, cid, term, "fsn" if kind == rf2.FSN else "synonym", did in preferred_ids)
                    for did, cid, term, kind in rows.iter_rows()
                ),
            )
            # The search index's rowids rank the descriptions (preferred terms first, then
            # synonyms, then FSNs, shorter first): a search reads matches in rowid order and
            # stops at its limit, rather than sorting every match of a common word.
            ranked = (
                rows.with_columns(
                    pl.col("id").is_in(list(preferred_ids)).alias("preferred"),
                    pl.col("term").str.len_chars().alias("length"),
                )
                .sort(
                    ["preferred", "typeId", "length", "id"], descending=[True, True, False, False]
                )
                .select("term", "conceptId")
            )
            cursor.executemany(
                f"INSERT INTO {SEARCH_TABLE} (rowid, term, concept) VALUES (?, ?, ?)",
                ((n, term, cid) for n, (term, cid) in enumerate(ranked.iter_rows(), start=1)),
            )
            cursor.execute("UPDATE terminology_releases SET current = 0")
            cursor.execute(
                "INSERT INTO terminology_releases (system, version, source, loaded_at, concepts,"
                " active_concepts, is_a, descriptions, seconds, current) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    SNOMED,
                    version,
                    source,
                    datetime.now(UTC).isoformat(sep=" "),
                    table.height,
                    len(hierarchy),
                    is_a_rows,
                    descriptions.height,
                    time.perf_counter() - started,
                ),
            )
            release_id = cursor.lastrowid
            cursor.execute(
                "INSERT INTO sct_hierarchy (release, arrays) VALUES (?, ?)",
                (release_id, hierarchy.to_bytes()),
            )
            self._bump(cursor)
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()

    @staticmethod
    def _bump(cursor: Any) -> None:
        cursor.execute(
            "INSERT INTO terminology_state (key, value) VALUES ('generation', 1) "
            "ON CONFLICT(key) DO UPDATE SET value = value + 1"
        )

    def load_valuesets(self, path: Path) -> list[dict[str, str | None]]:
        """Every ValueSet resource in the JSON files at ``path`` (a resource or a Bundle each);
        a ValueSet without ``url`` is refused. Returns ``[{url, version}]``."""
        from .valuesets import ValueSetError, valuesets_in

        found: list[dict[str, Any]] = []
        for name, data in rf2.walk_json_files(path):
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise ValueSetError(f"{name}: not JSON ({exc})") from None
            found.extend(valuesets_in(document, name))
        if not found:
            return []
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            for resource in found:
                url, version = resource["url"], resource.get("version") or ""
                conn.exec_driver_sql(
                    "INSERT INTO fhir_valuesets (url, version, name, resource, loaded_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(url, version) DO UPDATE SET "
                    "name = excluded.name, resource = excluded.resource, "
                    "loaded_at = excluded.loaded_at",
                    (
                        url,
                        version,
                        resource.get("name"),
                        orjson.dumps(resource).decode(),
                        now.isoformat(sep=" "),
                    ),
                )
            conn.exec_driver_sql(
                "INSERT INTO terminology_state (key, value) VALUES ('generation', 1) "
                "ON CONFLICT(key) DO UPDATE SET value = value + 1"
            )
        return [{"url": r["url"], "version": r.get("version")} for r in found]

    def valueset(self, url: str, version: str | None = None) -> dict[str, Any] | None:
        """The ValueSet at ``url`` (and ``version``; None: the one loaded last)."""
        with self.engine.connect() as conn:
            if version is not None:
                row = conn.exec_driver_sql(
                    "SELECT resource FROM fhir_valuesets WHERE url = ? AND version = ?",
                    (url, version),
                ).first()
            else:
                row = conn.exec_driver_sql(
                    "SELECT resource FROM fhir_valuesets WHERE url = ? "
                    "ORDER BY loaded_at DESC, version DESC LIMIT 1",
                    (url,),
                ).first()
        if row is None:
            return None
        resource: dict[str, Any] = orjson.loads(row[0])
        return resource

    def valuesets(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT url, version, name, loaded_at FROM fhir_valuesets ORDER BY url, version"
            ).all()
        return [
            {"url": r[0], "version": r[1] or None, "name": r[2], "loaded_at": str(r[3])}
            for r in rows
        ]

    # ------------------------------------------------------------------ reading

    def summaries(self, codes: Iterable[int]) -> list[ConceptSummary]:
        """Concepts by id, in the order given (unknown ids left out)."""
        wanted = list(dict.fromkeys(int(c) for c in codes))
        if not wanted:
            return []
        found: dict[int, ConceptSummary] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in conn.exec_driver_sql(
                    "SELECT id, term, fsn, semantic_tag, active, descendants FROM sct_concepts "
                    f"WHERE id IN ({marks})",
                    tuple(chunk),
                ):
                    found[row[0]] = ConceptSummary(
                        str(row[0]), row[1], row[2], row[3], bool(row[4]), row[5]
                    )
        return [found[c] for c in wanted if c in found]

    def concept(self, code: int) -> ConceptDetail | None:
        summaries = self.summaries([code])
        if not summaries:
            return None
        info, hierarchy = self.hierarchy()
        del info
        i = hierarchy.index_of(code)
        parents: list[int] = []
        children: list[int] = []
        if i is not None:
            parents = hierarchy.ids[hierarchy.parents_of(i)].tolist()
            children = hierarchy.ids[hierarchy.children_of(i)].tolist()
        with self.engine.connect() as conn:
            synonyms = [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT term FROM sct_descriptions WHERE concept = ? AND kind = 'synonym' "
                    "ORDER BY preferred DESC, term",
                    (code,),
                )
            ]
        by_term = lambda s: (s.term or "").lower()  # noqa: E731
        return ConceptDetail(
            summaries[0],
            sorted(self.summaries(parents), key=by_term),
            sorted(self.summaries(children), key=by_term),
            synonyms,
        )

    def ancestors(self, code: int) -> list[ConceptSummary]:
        _, hierarchy = self.hierarchy()
        i = hierarchy.index_of(code)
        if i is None:
            return []
        found = hierarchy.closure(np.asarray([i], dtype=np.int32), down=False)
        return sorted(self.summaries(hierarchy.ids[found].tolist()), key=lambda s: -s.descendants)

    def search(self, text: str, limit: int = 20) -> list[ConceptSummary]:
        """Concepts whose descriptions hold a word starting with each word of ``text``, or
        the concept whose id ``text`` is. Ranked: matches on a preferred term first, then on
        other synonyms, then on fully specified names, shorter terms first."""
        text = text.strip()
        if text.isdigit():
            return self.summaries([int(text)])
        words = search_words(text)
        if not words:
            return []
        query = " AND ".join(f'"{w}"*' for w in words)
        with self.engine.connect() as conn:
            hits = conn.exec_driver_sql(
                f"SELECT concept, term FROM {SEARCH_TABLE} "
                f"WHERE {SEARCH_TABLE} MATCH ? ORDER BY rowid LIMIT ?",
                (query, max(limit * 5, 50)),
            ).all()
        # rowid order is rank order (see _write): each concept's best match comes first
        best: dict[int, str] = {}
        for concept, term in hits:
            best.setdefault(int(concept), term)
        by_id = {int(s.code): s for s in self.summaries(best)}
        ranked = [by_id[c] for c in best if c in by_id]
        return [
            ConceptSummary(
                s.code, s.term, s.fsn, s.semantic_tag, s.active, s.descendants, best[int(s.code)]
            )
            for s in ranked[:limit]
            if s.active
        ]


__all__ = [
    "SCHEMA",
    "ConceptDetail",
    "ConceptSummary",
    "NoRelease",
    "ReleaseInfo",
    "TerminologyStore",
    "search_words",
]
