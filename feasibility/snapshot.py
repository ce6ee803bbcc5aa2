"""The columnar snapshot: the live facts of a population as polars tables, kept incrementally.

Ad hoc feasibility questions run over this snapshot with the polars engine
(:mod:`feasibility.engines.polars_engine`). It folds the facts topic exactly like the stream's
per-patient state (:mod:`surveillance_stream.patient_state`): per ``(patient, resource key)``
only the envelope with the highest ``seq`` counts; an equal or lower ``seq`` changes nothing; a
retraction is a tombstone that removes the resource's rows and keeps its ``seq``, so a replayed
older version cannot bring them back.

Layout
------
* **Dictionaries.** Every coding becomes a *token* (:func:`feasibility.terminology.token`) with
  a dense ``UInt32`` id; the set of tokens of one fact (a condition's SNOMED and ICD-10 codings)
  is a *codeset* with its own id (0 is the empty set), so a row carries one ``codeset`` integer
  and a code filter is an ``is_in`` on integers. Observation answers (``value_codes``) and
  interpretations are interned the same way as *value sets* and *interpretation sets*, and
  statuses, units and (casefolded) device names as *labels*. Patients
  get a dense, stable ``pid`` in order of first appearance (:meth:`ColumnarSnapshot.patient_id`,
  :meth:`ColumnarSnapshot.pseudonym_of`); each ``(patient, resource key)`` a ``rid``.
* **Tables** (schemas in :data:`SCHEMAS`): ``patient_facts``, ``conditions``, ``medications``,
  ``procedures``, ``devices``, ``observations`` (one row per observation fact: its own value),
  ``components`` (one row per component) and ``consents``. Every row carries ``pid``, ``rid``
  and the ``seq`` of the version it came from; dates are ``Int64`` epoch microseconds (UTC),
  ``when_us``, beside ``when_s``, the same instant in float seconds exactly as
  :func:`feasibility.patient_data.epoch` gives it (correctly rounded ``us / 1e6``; polars
  divides by a scalar through its reciprocal, which is not), so windows compare exactly like
  the reference engine.
* **Main, tail, dead.** Each table has a *main* frame, sorted by its index (:data:`INDEX`: for
  the coded tables ``(codeset, pid, when_us)``, so a criterion on HbA1c slices only the HbA1c
  rows), a *tail* of chunks appended since main was last rebuilt (unsorted), and the *dead*
  pairs ``(rid, seq)`` of versions superseded or retracted since then. :meth:`apply` only
  appends to Python row buffers; :meth:`frames` turns the buffers into a new tail chunk and
  hands out an immutable :class:`SnapshotFrames`; a table is compacted (main + tail - dead,
  re-sorted) when its tail or its dead share grows large.
* **Parquet.** :meth:`ColumnarSnapshot.save_parquet` writes one folder per table with one file
  per bucket of a hash of ``pid`` (``<table>/bucket=NNN/part-0.parquet``), plus the
  dictionaries, the resource versions (so replays stay idempotent after a reload) and
  ``meta.json`` (the watermark). :func:`scan_table` scans one table lazily, bucket by bucket.

Rows are read from the patient view (:mod:`core.patient_view`): each live resource version
becomes its typed items (:func:`core.patient_view.parse_resource`, the same per-resource fold
the reference engine, device surveillance and recruitment read), so dates, tokens, the
condition date ``onset or recorded`` and the demographics rule (the latest live Patient version
by ``(last_updated, seq, resource key)``; region "Unknown" is null) are the view's.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.patient_view import epoch_us as _view_epoch_us
from core.patient_view import parse_resource

from .terminology import token as make_token

#: How a resource version becomes typed items: the patient view's per-resource fold.
read_resource = parse_resource

FORMAT = "concierge.snapshot/1"
SEP = "\x1f"  # patient SEP resource key: one string per (patient, resource key), as the stream
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

U32 = pl.UInt32
I64 = pl.Int64
#: Statuses, units and device names are interned as labels (null for a missing value).
LABEL = U32
_BASE: dict[str, Any] = {"pid": U32, "rid": U32, "seq": I64}

#: Column schemas of the fact tables.
SCHEMAS: dict[str, dict[str, Any]] = {
    "patient_facts": {
        **_BASE,
        "fact": U32,
        "key": pl.String,
        "birth_date": pl.Date,
        "sex": pl.String,
        "deceased": pl.Boolean,
        "deceased_us": I64,
        "site": pl.String,
        "site_key": pl.String,
        "region": pl.String,
        #: ``provenance.last_updated`` of the version (epoch us; null: undated), for the rule
        #: that picks a patient's demographics
        "effective_us": I64,
    },
    "conditions": {
        **_BASE,
        "when_us": I64,
        "when_s": pl.Float64,
        "codeset": U32,
        "clinical_status": LABEL,
        "verification_status": LABEL,
    },
    "medications": {**_BASE, "when_us": I64, "when_s": pl.Float64, "codeset": U32, "status": LABEL},
    "procedures": {**_BASE, "when_us": I64, "when_s": pl.Float64, "codeset": U32, "status": LABEL},
    "devices": {
        **_BASE,
        "when_us": I64,
        "when_s": pl.Float64,
        "codeset": U32,
        "status": LABEL,
        # labels of the casefolded names (str.casefold, as the reference compares them)
        "manufacturer_cf": LABEL,
        "model_cf": LABEL,
    },
    "observations": {
        **_BASE,
        "fact": U32,
        "when_us": I64,
        "when_s": pl.Float64,
        "status": LABEL,
        "codeset": U32,
        "value": pl.Float64,
        "unit": LABEL,
        "value_set": U32,
        "interp_set": U32,
    },
    "components": {
        **_BASE,
        "fact": U32,
        "comp": U32,
        "when_us": I64,
        "when_s": pl.Float64,
        "status": LABEL,
        "codeset": U32,
        "comp_codeset": U32,
        "value": pl.Float64,
        "unit": LABEL,
        "value_set": U32,
        "interp_set": U32,
    },
    "consents": {
        **_BASE,
        "when_us": I64,
        "when_s": pl.Float64,
        "status": LABEL,
        "research_opt_out": pl.Boolean,
    },
}

#: Sort order of each table's main frame; a leading codeset column is sliced by code.
INDEX: dict[str, tuple[str, ...]] = {
    "patient_facts": ("pid", "key", "fact"),
    "conditions": ("codeset", "pid", "when_us"),
    "medications": ("codeset", "pid", "when_us"),
    "procedures": ("codeset", "pid", "when_us"),
    "devices": ("codeset", "pid", "when_us"),
    "observations": ("codeset", "pid", "when_us"),
    "components": ("comp_codeset", "pid", "when_us"),
    "consents": ("pid",),
}

TOKENS_SCHEMA: dict[str, Any] = {"token_id": U32, "token": pl.String}
CODESETS_SCHEMA: dict[str, Any] = {"codeset": U32, "token_id": U32}
VALUE_SETS_SCHEMA: dict[str, Any] = {
    "value_set": U32,
    "system": pl.String,
    "code": pl.String,
    "token_id": U32,
}
INTERP_SETS_SCHEMA: dict[str, Any] = {"interp_set": U32, "code": pl.String}
LABELS_SCHEMA: dict[str, Any] = {"label_id": U32, "label": pl.String}
PATIENTS_SCHEMA: dict[str, Any] = {"pid": U32, "patient": pl.String}
RESOURCES_SCHEMA: dict[str, Any] = {
    "rid": U32,
    "pid": U32,
    "key": pl.String,
    "seq": I64,
    "rows": U32,
    "retracted": pl.Boolean,
}
DEAD_SCHEMA: dict[str, Any] = {"rid": U32, "seq": I64}
#: Demographics, one row per pid (aligned: row i is pid i).
DEMOGRAPHICS_SCHEMA: dict[str, Any] = {
    "has_demographics": pl.Boolean,
    "birth_date": pl.Date,
    "sex": pl.String,
    "deceased": pl.Boolean,
    "deceased_us": I64,
    #: ODS code as the fact knew it; ``site_key``: the managing organisation's reference key
    #: (see :func:`core.contracts.facts.patient_site`)
    "site": pl.String,
    "site_key": pl.String,
    "region": pl.String,
}

#: Rebuild a table's main frame when its tail exceeds this share of main (or the minimum).
COMPACT_TAIL_SHARE = 0.25
COMPACT_TAIL_MIN = 65_536
#: ... or when versions superseded since its last rebuild exceed this share of main.
COMPACT_DEAD_SHARE = 0.0625
COMPACT_DEAD_MIN = 16_384
#: Tail chunks are merged into one beyond this many.
MAX_TAIL_CHUNKS = 16


# --------------------------------------------------------------------------- parsing


def epoch_us(value: Any) -> int | None:
    """Epoch microseconds of an ISO date-time (UTC when no offset), or None: the patient
    view's (:func:`core.patient_view.epoch_us`; ``us / 1e6`` is exactly its float seconds)."""
    return _view_epoch_us(value)


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class TableView:
    """One table as of a :meth:`ColumnarSnapshot.frames` call (immutable)."""

    name: str
    #: Sorted by :data:`INDEX`; live as of its last rebuild.
    main: pl.DataFrame
    #: Rows appended since (unsorted); may include rows of versions that are dead since.
    tail: pl.DataFrame
    #: ``(rid, seq)`` of versions superseded or retracted since main was rebuilt.
    dead: pl.DataFrame
    #: codeset -> (first row, row count) in main, for the table's leading codeset column.
    offsets: Mapping[int, tuple[int, int]]
    code_column: str | None
    #: distinct (code column, ``unit``) pairs of main, for tables with units
    unit_pairs: pl.DataFrame | None = None

    def units_of(self, codesets: Iterable[int]) -> pl.DataFrame:
        """Distinct (code column, unit) pairs among rows with these codesets (and maybe a few
        more: dead rows' pairs stay until main is rebuilt)."""
        assert self.unit_pairs is not None and self.code_column is not None
        wanted = pl.col(self.code_column).is_in(sorted(set(codesets)))
        pairs = self.unit_pairs.filter(wanted)
        if self.tail.height:
            extra = self.tail.filter(wanted).select(self.code_column, "unit").unique()
            pairs = pl.concat([pairs, extra]).unique()
        return pairs

    def live(self) -> pl.DataFrame:
        """Every live row."""
        frame = pl.concat([self.main, self.tail], rechunk=False) if self.tail.height else self.main
        return self._drop_dead(frame)

    def rows(self, codesets: Iterable[int] | None) -> pl.DataFrame:
        """Live rows whose code column is in ``codesets`` (None: every row)."""
        if codesets is None or self.code_column is None:
            return self.live()
        wanted = sorted(set(codesets))
        parts: list[pl.DataFrame] = []
        if len(wanted) <= 64:
            for cs in wanted:
                found = self.offsets.get(cs)
                if found is not None:
                    parts.append(self.main.slice(found[0], found[1]))
        else:
            parts.append(self.main.filter(pl.col(self.code_column).is_in(wanted)))
        if self.tail.height:
            parts.append(self.tail.filter(pl.col(self.code_column).is_in(wanted)))
        if not parts:
            return self.main.clear()
        frame = parts[0] if len(parts) == 1 else pl.concat(parts, rechunk=False)
        return self._drop_dead(frame)

    def _drop_dead(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Without the rows of dead versions: only rows of a resource with a dead version
        (few) are matched against the dead (rid, seq) pairs."""
        if self.dead.height == 0 or frame.height == 0:
            return frame
        suspect = frame.select(
            pl.col("rid").is_in(self.dead.get_column("rid").implode())
        ).to_series()
        if not suspect.any():
            return frame
        checked = frame.filter(suspect).join(self.dead, on=["rid", "seq"], how="anti")
        return pl.concat([frame.filter(~suspect), checked])


@dataclass(frozen=True)
class SnapshotFrames:
    """An immutable view of the snapshot for one evaluation (safe to read outside the lock)."""

    #: One row per pid in pid order: ``pid``, ``patient`` (pseudonym) and the demographics
    #: the patient view picks (latest live Patient version by ``(last_updated, seq, key)``):
    #: ``has_demographics``,
    #: ``birth_date``, ``sex`` ("unknown" when the fact has none; null without a Patient
    #: fact), ``deceased``, ``deceased_us``, ``site`` (ODS code as the fact knew it),
    #: ``site_key`` (the organisation's reference key), ``region`` (null for "Unknown").
    patients: pl.DataFrame
    tables: Mapping[str, TableView]
    tokens: pl.DataFrame
    codesets: pl.DataFrame
    value_sets: pl.DataFrame
    interp_sets: pl.DataFrame
    #: ``label_id``, ``label``: statuses, units and casefolded device names.
    labels: pl.DataFrame
    #: ``key_of(rids)``: the ``patient SEP resource key`` string of each rid (for tie-breaks
    #: by resource key, which the reference engine orders by).
    key_of: Callable[[Sequence[int]], list[str]] = field(repr=False)
    #: engines' lookups derived from these frames (codes resolved, analytes, labels), kept
    #: while the snapshot does not change: :meth:`ColumnarSnapshot.frames` hands out the same
    #: object until the next change
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def table(self, name: str) -> pl.DataFrame:
        return self.tables[name].live()

    @property
    def conditions(self) -> pl.DataFrame:
        return self.table("conditions")

    @property
    def medications(self) -> pl.DataFrame:
        return self.table("medications")

    @property
    def procedures(self) -> pl.DataFrame:
        return self.table("procedures")

    @property
    def devices(self) -> pl.DataFrame:
        return self.table("devices")

    @property
    def observations(self) -> pl.DataFrame:
        return self.table("observations")

    @property
    def components(self) -> pl.DataFrame:
        return self.table("components")

    @property
    def consents(self) -> pl.DataFrame:
        return self.table("consents")


# --------------------------------------------------------------------------- tables


class _Table:
    def __init__(self, name: str) -> None:
        self.name = name
        self.schema = SCHEMAS[name]
        #: what the Python row buffers hold (``when_s`` is derived at flush)
        self.row_schema = {k: v for k, v in self.schema.items() if k != "when_s"}
        self.index = INDEX[name]
        lead = self.index[0]
        self.code_column = lead if lead.endswith("codeset") else None
        self.buffer: list[tuple[Any, ...]] = []
        self.main = pl.DataFrame(schema=self.schema)
        self.tail: list[pl.DataFrame] = []
        self.tail_rows = 0
        #: number of dead pairs (global count) already dropped from main
        self.dead_applied = 0
        self.offsets: dict[int, tuple[int, int]] = {}
        self.unit_pairs: pl.DataFrame | None = None
        #: bumped whenever main is rebuilt
        self.generation = 0
        self.set_main(self.main)

    def flush(self) -> pl.DataFrame | None:
        if not self.buffer:
            return None
        chunk = pl.DataFrame(self.buffer, schema=self.row_schema, orient="row")
        self.buffer = []
        if "when_s" in self.schema:
            chunk = chunk.with_columns(_seconds(chunk.get_column("when_us"))).select(
                list(self.schema)
            )
        self.tail.append(chunk)
        self.tail_rows += chunk.height
        if len(self.tail) > MAX_TAIL_CHUNKS:
            self.tail = [pl.concat(self.tail, rechunk=True)]
        return chunk

    def tail_frame(self) -> pl.DataFrame:
        if not self.tail:
            return self.main.clear()
        if len(self.tail) == 1:
            return self.tail[0]
        return pl.concat(self.tail, rechunk=False)

    def rebuild(self, dead: pl.DataFrame, dead_total: int) -> None:
        frame = pl.concat([self.main, *self.tail], rechunk=True) if self.tail else self.main
        if dead.height and frame.height:
            frame = frame.join(dead, on=["rid", "seq"], how="anti")
        self.set_main(frame.sort(list(self.index)))
        self.tail, self.tail_rows = [], 0
        self.dead_applied = dead_total

    def set_main(self, frame: pl.DataFrame) -> None:
        self.main = frame.select(list(self.schema)).rechunk()
        self.generation += 1
        self.offsets = {}
        if "unit" in self.schema and self.code_column is not None:
            self.unit_pairs = self.main.select(self.code_column, "unit").unique()
        if self.code_column is not None and frame.height:
            counts = (
                self.main.get_column(self.code_column)
                .rle()
                .struct.unnest()
                .with_columns(start=pl.col("len").cum_sum() - pl.col("len"))
            )
            self.offsets = {
                int(cs): (int(start), int(n))
                for cs, start, n in zip(
                    counts.get_column("value").to_list(),
                    counts.get_column("start").to_list(),
                    counts.get_column("len").to_list(),
                    strict=True,
                )
            }


# --------------------------------------------------------------------------- snapshot


class ColumnarSnapshot:
    """The live facts of a population as polars tables, built incrementally from envelopes.

    Not thread-safe: callers serialise :meth:`apply` and :meth:`frames` (the feed and the
    service share one lock); the :class:`SnapshotFrames` returned can be read without it.
    """

    def __init__(self) -> None:
        self._tables = {name: _Table(name) for name in SCHEMAS}
        # patients
        self._pids: dict[str, int] = {}
        self._patients: list[str] = []
        self._patients_frame = pl.DataFrame(schema=PATIENTS_SCHEMA)
        # resources: rid per "patient SEP key"; per rid its pid, current seq, row count
        self._rids: dict[str, int] | None = {}
        self._rid_keys: list[str] = []
        self._rid_pid = array("I")
        self._rid_seq = array("q")
        self._rid_rows = array("I")
        self._rid_retracted = bytearray()
        #: resources loaded from Parquet and not yet indexed in Python (see _index)
        self._loaded: pl.DataFrame | None = None
        # dead versions (rid, seq), in the order they died
        self._dead: list[tuple[int, int]] = []
        self._dead_frame = pl.DataFrame(schema=DEAD_SCHEMA)
        self._dead_base = 0  # global number of the first pair in _dead_frame
        self._dead_total = 0  # global number of pairs ever (flushed or not)
        # dictionaries
        self._token_ids: dict[str, int] = {}
        self._tokens: list[str] = []
        self._codesets_of_tokens: dict[frozenset[str], int] = {}
        self._codeset_ids: dict[tuple[int, ...], int] = {(): 0}
        self._value_set_ids: dict[tuple[tuple[str, str], ...], int] = {(): 0}
        self._interp_set_ids: dict[tuple[str, ...], int] = {(): 0}
        self._codeset_rows: list[tuple[int, int]] = []
        self._value_set_rows: list[tuple[int, str, str, int]] = []
        self._interp_set_rows: list[tuple[int, str]] = []
        self._label_ids: dict[Any, int] = {}
        self._labels: list[str] = []
        self._labels_frame = pl.DataFrame(schema=LABELS_SCHEMA)
        self._tokens_frame = pl.DataFrame(schema=TOKENS_SCHEMA)
        self._codesets_frame = pl.DataFrame(schema=CODESETS_SCHEMA)
        self._value_sets_frame = pl.DataFrame(schema=VALUE_SETS_SCHEMA)
        self._interp_sets_frame = pl.DataFrame(schema=INTERP_SETS_SCHEMA)
        self._casefold: dict[str, int | None] = {}
        # demographics cache (aligned by pid)
        self._demo: pl.DataFrame | None = None
        self._demo_generation = -1
        self._demo_tail_rows = 0
        self._demo_dead = 0
        # watermark
        self._envelopes = 0
        self._applied = 0
        self._max_ingested: datetime | None = None
        self._offsets: dict[int, int] = {}
        self._cached_frames: SnapshotFrames | None = None

    # ------------------------------------------------------------------ identity

    def patient_id(self, pseudonym: str) -> int:
        """The dense id of a patient (assigned on first appearance; stable for the snapshot's
        lifetime and across save/load). KeyError for a patient never seen."""
        return self._pids[pseudonym]

    def known(self, pseudonym: str) -> bool:
        """Whether the snapshot has read any fact of this patient."""
        return pseudonym in self._pids

    def pseudonym_of(self, pid: int) -> str:
        return self._patients[pid]

    def _pid_for(self, patient: str) -> int:
        pid = self._pids.get(patient)
        if pid is None:
            pid = len(self._patients)
            self._pids[patient] = pid
            self._patients.append(patient)
        return pid

    @property
    def patient_count(self) -> int:
        return len(self._patients)

    def size(self) -> tuple[dict[str, int], int]:
        """Rows per fact table (kept, buffered and not yet compacted away) and the estimated
        bytes of the tables' frames, for ``/metrics``; called under the snapshot's lock."""
        rows: dict[str, int] = {}
        size = self._patients_frame.estimated_size()
        for name, table in self._tables.items():
            rows[name] = table.main.height + table.tail_rows + len(table.buffer)
            size += table.main.estimated_size() + sum(f.estimated_size() for f in table.tail)
        return rows, int(size)

    # ------------------------------------------------------------------ input

    def apply(
        self, envelope: Mapping[str, Any], partition: int | None = None, offset: int | None = None
    ) -> bool:
        """Fold one facts-topic envelope (``concierge.facts/1`` as a plain object) in; True when
        it changed the snapshot (a new version or a retraction)."""
        self._envelopes += 1
        if (
            partition is not None
            and offset is not None
            and offset + 1 > self._offsets.get(partition, 0)
        ):
            self._offsets[partition] = offset + 1
        provenance = envelope.get("provenance")
        if provenance:
            ingested = provenance.get("ingested_at")
            if ingested:
                when = ingested if isinstance(ingested, datetime) else _instant(ingested)
                if self._max_ingested is None or when > self._max_ingested:
                    self._max_ingested = when
        changed = self._apply_version(
            envelope["patient"],
            envelope["key"],
            int(envelope["seq"]),
            bool(envelope.get("retracted")),
            envelope,
        )
        if changed:
            self._applied += 1
        return changed

    def apply_entries(self, population: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        """Bulk-load the stream's state shape: patient -> resource key -> entry (``seq``,
        ``retracted``, ``facts``). Every patient is registered, even one without entries."""
        for patient, entries in population.items():
            self._pid_for(patient)
            for key, entry in entries.items():
                self._apply_version(
                    patient, key, int(entry.get("seq", 1)), bool(entry.get("retracted")), entry
                )

    def _index(self) -> dict[str, int]:
        """The Python index of resources (built on first use after a Parquet load)."""
        if self._rids is None:
            loaded = self._loaded
            assert loaded is not None
            combined = (
                loaded.join(self._patients_frame, on="pid", how="left", maintain_order="left")
                .select(pl.concat_str(pl.col("patient"), pl.lit(SEP), pl.col("key")))
                .to_series()
                .to_list()
            )
            self._rid_keys = combined
            self._rids = {k: i for i, k in enumerate(combined)}
            self._rid_pid = array("I", loaded.get_column("pid").to_numpy().astype(np.uint32))
            self._rid_seq = array("q", loaded.get_column("seq").to_numpy().astype(np.int64))
            self._rid_rows = array("I", loaded.get_column("rows").to_numpy().astype(np.uint32))
            self._rid_retracted = bytearray(
                loaded.get_column("retracted").cast(pl.UInt8).to_numpy().tobytes()
            )
            self._loaded = None
        return self._rids

    def _apply_version(
        self, patient: str, key: str, seq: int, retracted: bool, entry: Mapping[str, Any]
    ) -> bool:
        pid = self._pid_for(patient)
        rids = self._rids if self._rids is not None else self._index()
        skey = patient + SEP + key
        rid = rids.get(skey)
        if rid is None:
            rid = len(self._rid_keys)
            rids[skey] = rid
            self._rid_keys.append(skey)
            self._rid_pid.append(pid)
            self._rid_seq.append(seq)
            self._rid_rows.append(0)
            self._rid_retracted.append(retracted)
        else:
            current = self._rid_seq[rid]
            if seq <= current:
                return False
            if self._rid_rows[rid]:
                self._dead.append((rid, current))
                self._dead_total += 1
            self._rid_seq[rid] = seq
            self._rid_retracted[rid] = retracted
        self._rid_rows[rid] = 0 if retracted else self._add_facts(pid, rid, seq, key, entry)
        self._cached_frames = None
        return True

    # ------------------------------------------------------------------ facts -> rows

    def _token_id(self, tok: str) -> int:
        found = self._token_ids.get(tok)
        if found is None:
            found = len(self._tokens)
            self._token_ids[tok] = found
            self._tokens.append(tok)
        return found

    def _codeset(self, tokens: frozenset[str]) -> int:
        """The codeset id of a set of match tokens (0: the empty set)."""
        if not tokens:
            return 0
        found = self._codesets_of_tokens.get(tokens)
        if found is None:
            ids = tuple(sorted({self._token_id(t) for t in tokens}))
            found = self._codeset_ids.get(ids)
            if found is None:
                found = len(self._codeset_ids)
                self._codeset_ids[ids] = found
                self._codeset_rows.extend((found, t) for t in ids)
            if len(self._codesets_of_tokens) < 1_000_000:
                self._codesets_of_tokens[tokens] = found
        return found

    def _value_set(self, value_codes: tuple[tuple[str, str], ...]) -> int:
        if not value_codes:
            return 0
        pairs = tuple(sorted(set(value_codes)))
        found = self._value_set_ids.get(pairs)
        if found is None:
            found = len(self._value_set_ids)
            self._value_set_ids[pairs] = found
            for system, code in pairs:
                tok = self._token_id(make_token(system or None, code))
                self._value_set_rows.append((found, system, code, tok))
        return found

    def _interp_set(self, interpretation: frozenset[str]) -> int:
        if not interpretation:
            return 0
        codes = tuple(sorted(interpretation))
        found = self._interp_set_ids.get(codes)
        if found is None:
            found = len(self._interp_set_ids)
            self._interp_set_ids[codes] = found
            self._interp_set_rows.extend((found, c) for c in codes)
        return found

    def _label(self, value: Any) -> int | None:
        if value is None:
            return None
        found = self._label_ids.get(value)
        if found is None:
            # a non-string value never equals a string in the criteria, so keep it apart
            text = value if isinstance(value, str) else f"\x00{value!r}"
            found = self._label_ids.get(text)
            if found is None:
                found = len(self._labels)
                self._labels.append(text)
                self._label_ids[text] = found
            self._label_ids[value] = found
        return found

    def _fold(self, name: str | None) -> int | None:
        """The label of a casefolded device name (a missing name is "", as the reference
        reads it)."""
        text = name or ""
        found = self._casefold.get(text)
        if found is None:
            found = self._label(text.casefold())
            if len(self._casefold) < 100_000:
                self._casefold[text] = found
        return found

    def _add_facts(self, pid: int, rid: int, seq: int, key: str, entry: Mapping[str, Any]) -> int:
        """The rows of one live resource version, read from its patient-view items
        (:func:`core.patient_view.parse_resource`, the per-resource half of the one fold)."""
        version = read_resource(key, entry)
        rows = 0
        tables = self._tables
        label = self._label
        if version.observations:
            buffer = tables["observations"].buffer
            components = tables["components"].buffer
            for obs in version.observations:
                status = label(obs.status)
                codeset = self._codeset(obs.tokens)
                m = obs.result
                buffer.append(
                    (
                        pid,
                        rid,
                        seq,
                        obs.index,
                        obs.when_us,
                        status,
                        codeset,
                        m.value,
                        label(m.unit),
                        self._value_set(m.value_codes),
                        self._interp_set(m.interpretation),
                    )
                )
                rows += 1
                for number, comp in enumerate(obs.components):
                    components.append(
                        (
                            pid,
                            rid,
                            seq,
                            obs.index,
                            number,
                            obs.when_us,
                            status,
                            codeset,
                            self._codeset(comp.tokens),
                            comp.value,
                            label(comp.unit),
                            self._value_set(comp.value_codes),
                            self._interp_set(comp.interpretation),
                        )
                    )
                    rows += 1
        if version.conditions:
            buffer = tables["conditions"].buffer
            for cond in version.conditions:
                buffer.append(
                    (
                        pid,
                        rid,
                        seq,
                        cond.when_us,
                        self._codeset(cond.tokens),
                        label(cond.clinical_status),
                        label(cond.verification_status),
                    )
                )
                rows += 1
        for name, events in (
            ("medications", version.medications),
            ("procedures", version.procedures),
        ):
            if events:
                buffer = tables[name].buffer
                for event in events:
                    buffer.append(
                        (pid, rid, seq, event.when_us, self._codeset(event.tokens),
                         label(event.status))
                    )  # fmt: skip
                    rows += 1
        if version.exposures:
            buffer = tables["devices"].buffer
            for exposure in version.exposures:
                buffer.append(
                    (
                        pid,
                        rid,
                        seq,
                        exposure.when_us,
                        self._codeset(exposure.tokens),
                        label(exposure.status),
                        self._fold(exposure.manufacturer),
                        self._fold(exposure.model),
                    )
                )
                rows += 1
        if version.patients:
            buffer = tables["patient_facts"].buffer
            for demo in version.patients:
                buffer.append(
                    (
                        pid,
                        rid,
                        seq,
                        demo.index,
                        key,
                        demo.birth_date,
                        demo.sex,
                        demo.deceased,
                        demo.deceased_us,
                        demo.site,
                        demo.site_key,
                        demo.region,
                        demo.effective_us,
                    )
                )
                rows += 1
        if version.consents:
            buffer = tables["consents"].buffer
            for consent in version.consents:
                buffer.append(
                    (
                        pid,
                        rid,
                        seq,
                        consent.when_us,
                        label(consent.status),
                        consent.research_opt_out,
                    )
                )
                rows += 1
        return rows

    # ------------------------------------------------------------------ materialisation

    def flush(self) -> None:
        """Move buffered rows into the tables' tails (cheap; bounds the Python-side buffers
        during a bulk load). :meth:`frames` does this too."""
        self._flush()

    def _flush(self) -> None:
        for table in self._tables.values():
            table.flush()
        if len(self._patients) > self._patients_frame.height:
            start = self._patients_frame.height
            self._patients_frame = _append(
                self._patients_frame,
                list(enumerate(self._patients[start:], start)),
                PATIENTS_SCHEMA,
            )
        if len(self._tokens) > self._tokens_frame.height:
            start = self._tokens_frame.height
            self._tokens_frame = _append(
                self._tokens_frame, list(enumerate(self._tokens[start:], start)), TOKENS_SCHEMA
            )
        if len(self._labels) > self._labels_frame.height:
            start = self._labels_frame.height
            self._labels_frame = _append(
                self._labels_frame, list(enumerate(self._labels[start:], start)), LABELS_SCHEMA
            )
        if self._codeset_rows:
            self._codesets_frame = _append(
                self._codesets_frame, self._codeset_rows, CODESETS_SCHEMA
            )
            self._codeset_rows = []
        if self._value_set_rows:
            self._value_sets_frame = _append(
                self._value_sets_frame, self._value_set_rows, VALUE_SETS_SCHEMA
            )
            self._value_set_rows = []
        if self._interp_set_rows:
            self._interp_sets_frame = _append(
                self._interp_sets_frame, self._interp_set_rows, INTERP_SETS_SCHEMA
            )
            self._interp_set_rows = []
        if self._dead:
            self._dead_frame = _append(self._dead_frame, self._dead, DEAD_SCHEMA)
            self._dead = []

    def _dead_since(self, applied: int) -> pl.DataFrame:
        return self._dead_frame.slice(max(0, applied - self._dead_base))

    def _maybe_compact(self, force: bool = False) -> None:
        for table in self._tables.values():
            main = table.main.height
            pending_dead = self._dead_total - table.dead_applied
            if (
                force
                or table.tail_rows > max(COMPACT_TAIL_MIN, int(main * COMPACT_TAIL_SHARE))
                or pending_dead > max(COMPACT_DEAD_MIN, int(main * COMPACT_DEAD_SHARE))
            ):
                if table.tail_rows or pending_dead:
                    table.rebuild(self._dead_since(table.dead_applied), self._dead_total)
                else:
                    table.dead_applied = self._dead_total
        # forget dead pairs every table has dropped
        low = min(t.dead_applied for t in self._tables.values())
        if low > self._dead_base:
            self._dead_frame = self._dead_frame.slice(low - self._dead_base)
            self._dead_base = low

    def compact(self) -> None:
        """Rebuild every table's main frame now (buffers flushed, dead rows dropped)."""
        self._flush()
        self._maybe_compact(force=True)
        self._cached_frames = None

    def frames(self) -> SnapshotFrames:
        """The current facts as immutable polars frames (see :class:`SnapshotFrames`)."""
        if self._cached_frames is not None:
            return self._cached_frames
        self._flush()
        self._maybe_compact()
        views = {
            name: TableView(
                name,
                table.main,
                table.tail_frame(),
                self._dead_since(table.dead_applied),
                table.offsets,
                table.code_column,
                table.unit_pairs,
            )
            for name, table in self._tables.items()
        }
        patients = pl.concat(
            [self._patients_frame, self._demographics(views["patient_facts"])], how="horizontal"
        )
        self._cached_frames = SnapshotFrames(
            patients=patients,
            tables=views,
            tokens=self._tokens_frame,
            codesets=self._codesets_frame,
            value_sets=self._value_sets_frame,
            interp_sets=self._interp_sets_frame,
            labels=self._labels_frame,
            key_of=self._key_of,
        )
        return self._cached_frames

    def _key_of(self, rids: Sequence[int]) -> list[str]:
        if self._rids is None and self._loaded is not None:
            # loaded resources are sorted by rid, and rids are dense
            index = pl.Series("rid", list(rids), dtype=U32)
            keys = self._loaded.get_column("key").gather(index)
            pids = self._loaded.get_column("pid").gather(index)
            patients = self._patients_frame.get_column("patient").gather(pids)
            return [f"{p}{SEP}{k}" for p, k in zip(patients, keys, strict=True)]
        known = self._rid_keys  # append-only: safe to read while the feed appends
        return [known[r] for r in rids]

    def _demographics(self, view: TableView) -> pl.DataFrame:
        """Demographics aligned by pid, updated for the patients whose Patient facts changed."""
        n = self._patients_frame.height
        table = self._tables["patient_facts"]
        cached = self._demo
        if cached is not None and self._demo_generation == table.generation:
            if (
                cached.height == n
                and self._demo_tail_rows == table.tail_rows
                and self._demo_dead == self._dead_total
            ):
                return cached
            tail = view.tail.slice(self._demo_tail_rows)
            dead_pids = self._pids_of_rids(self._dead_since(self._demo_dead).get_column("rid"))
            affected = pl.concat(
                [
                    tail.get_column("pid"),
                    dead_pids,
                    pl.int_range(cached.height, n, dtype=U32, eager=True),
                ]
            ).unique()
            mine = pl.col("pid").is_in(affected.implode())
            live = view._drop_dead(pl.concat([view.main.filter(mine), view.tail.filter(mine)]))
            winners = _winners(live)
            extended = cached
            if n > cached.height:
                extended = pl.concat([cached, _nulls(n - cached.height)])
            update = (
                pl.DataFrame({"pid": affected})
                .join(winners, on="pid", how="left")
                .with_columns(pl.col("has_demographics").fill_null(False))
            )
            idx = update.get_column("pid")
            columns = []
            for name in DEMOGRAPHICS_SCHEMA:
                series = extended.get_column(name).clone()
                if idx.len():
                    series.scatter(idx, update.get_column(name))
                columns.append(series)
            demo = pl.DataFrame(columns)
        else:
            winners = _winners(view.live())
            demo = (
                pl.DataFrame({"pid": pl.int_range(0, n, dtype=U32, eager=True)})
                .join(winners, on="pid", how="left", maintain_order="left")
                .with_columns(pl.col("has_demographics").fill_null(False))
                .select(list(DEMOGRAPHICS_SCHEMA))
            )
        self._demo = demo
        self._demo_generation = table.generation
        self._demo_tail_rows = table.tail_rows
        self._demo_dead = self._dead_total
        return demo

    def _pids_of_rids(self, rids: pl.Series) -> pl.Series:
        if self._rids is None and self._loaded is not None:
            return self._loaded.get_column("pid").gather(rids)
        pids = np.frombuffer(self._rid_pid, dtype=np.uint32) if len(self._rid_pid) else None
        if pids is None or rids.len() == 0:
            return pl.Series("pid", [], dtype=U32)
        return pl.Series("pid", pids[rids.to_numpy()], dtype=U32)

    # ------------------------------------------------------------------ watermark

    def watermark(self) -> dict[str, Any]:
        """How current the snapshot is: envelopes seen and applied, the latest
        ``provenance.ingested_at`` seen, and per partition the next offset to read."""
        return {
            "envelopes": self._envelopes,
            "applied": self._applied,
            "max_ingested_at": (
                self._max_ingested.isoformat() if self._max_ingested is not None else None
            ),
            "offsets": dict(sorted(self._offsets.items())),
            "patients": len(self._patients),
        }

    # ------------------------------------------------------------------ Parquet

    def _resources_frame(self) -> pl.DataFrame:
        if self._rids is None and self._loaded is not None:
            return self._loaded
        keys = [k.partition(SEP)[2] for k in self._rid_keys]
        n = len(keys)
        return pl.DataFrame(
            {
                "rid": pl.int_range(0, n, dtype=U32, eager=True),
                "pid": pl.Series(np.frombuffer(self._rid_pid, dtype=np.uint32)[:n]),
                "key": pl.Series(keys, dtype=pl.String),
                "seq": pl.Series(np.frombuffer(self._rid_seq, dtype=np.int64)[:n]),
                "rows": pl.Series(np.frombuffer(self._rid_rows, dtype=np.uint32)[:n]),
                "retracted": pl.Series(
                    np.frombuffer(bytes(self._rid_retracted), dtype=np.uint8)[:n]
                ).cast(pl.Boolean),
            },
            schema=RESOURCES_SCHEMA,
        )

    def save_parquet(self, directory: str | Path, buckets: int = 16) -> Path:
        """Write the snapshot as partitioned Parquet (see the module docstring)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.compact()
        frames = self.frames()
        for name, view in frames.tables.items():
            _write_partitioned(view.main, out / name, buckets)
        _write_partitioned(self._resources_frame(), out / "resources", buckets)
        self._patients_frame.write_parquet(out / "patients.parquet")
        frames.tokens.write_parquet(out / "tokens.parquet")
        frames.codesets.write_parquet(out / "codesets.parquet")
        frames.value_sets.write_parquet(out / "value_sets.parquet")
        frames.interp_sets.write_parquet(out / "interp_sets.parquet")
        frames.labels.write_parquet(out / "labels.parquet")
        meta = {
            "format": FORMAT,
            "buckets": buckets,
            "patients": self._patients_frame.height,
            "rows": {name: view.main.height for name, view in frames.tables.items()},
            "watermark": {
                **self.watermark(),
                "offsets": {str(k): v for k, v in self._offsets.items()},
            },
            "max_ingested_at": (
                self._max_ingested.isoformat() if self._max_ingested is not None else None
            ),
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load_parquet(cls, directory: str | Path) -> ColumnarSnapshot:
        """A snapshot written by :meth:`save_parquet`; applying envelopes to it continues
        exactly where the saved one stopped."""
        src = Path(directory)
        meta = json.loads((src / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{src} is not a {FORMAT} snapshot")
        snap = cls()
        patients = (
            pl.read_parquet(src / "patients.parquet").cast(pl.Schema(PATIENTS_SCHEMA)).sort("pid")
        )
        snap._patients = patients.get_column("patient").to_list()
        snap._pids = {p: i for i, p in enumerate(snap._patients)}
        snap._patients_frame = patients
        tokens = (
            pl.read_parquet(src / "tokens.parquet").cast(pl.Schema(TOKENS_SCHEMA)).sort("token_id")
        )
        snap._tokens = tokens.get_column("token").to_list()
        snap._token_ids = {t: i for i, t in enumerate(snap._tokens)}
        snap._tokens_frame = tokens
        codesets = pl.read_parquet(src / "codesets.parquet").cast(pl.Schema(CODESETS_SCHEMA))
        snap._codesets_frame = codesets
        for cs, members in codesets.group_by("codeset").agg(pl.col("token_id").sort()).iter_rows():
            snap._codeset_ids[tuple(members)] = cs
        value_sets = pl.read_parquet(src / "value_sets.parquet").cast(pl.Schema(VALUE_SETS_SCHEMA))
        snap._value_sets_frame = value_sets
        for vs, systems, codes in (
            value_sets.group_by("value_set").agg(pl.col("system"), pl.col("code")).iter_rows()
        ):
            snap._value_set_ids[tuple(sorted(zip(systems, codes, strict=True)))] = vs
        interp = pl.read_parquet(src / "interp_sets.parquet").cast(pl.Schema(INTERP_SETS_SCHEMA))
        snap._interp_sets_frame = interp
        for iset, codes in interp.group_by("interp_set").agg(pl.col("code")).iter_rows():
            snap._interp_set_ids[tuple(sorted(codes))] = iset
        labels = pl.read_parquet(src / "labels.parquet").cast(pl.Schema(LABELS_SCHEMA))
        snap._labels_frame = labels.sort("label_id")
        snap._labels = snap._labels_frame.get_column("label").to_list()
        snap._label_ids = {text: i for i, text in enumerate(snap._labels)}
        for name, table in snap._tables.items():
            frame = _read_partitioned(src / name, table.schema)
            table.set_main(frame.sort(list(table.index)))
        resources = _read_partitioned(src / "resources", RESOURCES_SCHEMA).sort("rid")
        snap._rids = None
        snap._loaded = resources
        snap._rid_keys = []
        watermark = meta.get("watermark") or {}
        snap._envelopes = int(watermark.get("envelopes", 0))
        snap._applied = int(watermark.get("applied", 0))
        snap._offsets = {int(k): int(v) for k, v in (watermark.get("offsets") or {}).items()}
        if meta.get("max_ingested_at"):
            snap._max_ingested = _instant(meta["max_ingested_at"])
        return snap


# --------------------------------------------------------------------------- helpers


def _seconds(when_us: pl.Series) -> pl.Series:
    """Float epoch seconds, correctly rounded (numpy divides element by element; int64 to
    float64 is exact below 2**53 us, about 285 years)."""
    values = when_us.to_numpy().astype(np.float64) / 1e6
    return pl.Series("when_s", values, dtype=pl.Float64, nan_to_null=True)


def _instant(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _append(frame: pl.DataFrame, rows: list[Any], schema: dict[str, Any]) -> pl.DataFrame:
    chunk = pl.DataFrame(rows, schema=schema, orient="row")
    return pl.concat([frame, chunk], rechunk=frame.n_chunks() > MAX_TAIL_CHUNKS)


def _nulls(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            name: pl.repeat(None, n, dtype=dtype, eager=True)
            for name, dtype in DEMOGRAPHICS_SCHEMA.items()
        }
    )


def _winners(live: pl.DataFrame) -> pl.DataFrame:
    """Per pid, the demographics the patient view's rule picks
    (:func:`core.patient_view.latest_demographics`): the first fact of the live Patient version
    latest by ``(last_updated, seq, resource key)``."""
    if live.height == 0:
        return pl.DataFrame(schema={"pid": U32, **DEMOGRAPHICS_SCHEMA})
    dup = pl.col("pid").is_duplicated()
    single = live.filter(~dup)
    multi = live.filter(dup)
    if multi.height:
        # the latest version by (last_updated, seq, key), undated lowest; its first fact
        multi = multi.sort(
            ["pid", "effective_us", "seq", "key", "fact"],
            descending=[False, False, False, False, True],
            nulls_last=False,
        ).unique(subset="pid", keep="last", maintain_order=True)
        single = pl.concat([single, multi])
    return single.select(
        "pid",
        pl.lit(True).alias("has_demographics"),
        *[c for c in DEMOGRAPHICS_SCHEMA if c != "has_demographics"],
    )


def _bucket_expr(buckets: int) -> pl.Expr:
    # a multiplicative hash of pid (stable across polars versions, unlike Expr.hash)
    return ((pl.col("pid").cast(pl.UInt64) * 2_654_435_761) % 4_294_967_296 % buckets).cast(
        pl.UInt32
    )


def _write_partitioned(frame: pl.DataFrame, folder: Path, buckets: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("bucket=*/*.parquet"):
        old.unlink()
    if frame.height == 0:
        return
    keyed = frame.with_columns(_bucket_expr(buckets).alias("_bucket"))
    for part in keyed.partition_by("_bucket", maintain_order=True):
        bucket = int(part.get_column("_bucket")[0])
        target = folder / f"bucket={bucket:03d}"
        target.mkdir(exist_ok=True)
        part.drop("_bucket").write_parquet(target / "part-0.parquet", statistics=True)


def _read_partitioned(folder: Path, schema: dict[str, Any]) -> pl.DataFrame:
    files = sorted(folder.glob("bucket=*/*.parquet"))
    if not files:
        return pl.DataFrame(schema=schema)
    scan = pl.scan_parquet(files, hive_partitioning=False)
    present = set(scan.collect_schema().names())
    # a snapshot saved before a column existed (site_key): the column is null there
    absent = [c for c in schema if c not in present]
    frame = (
        scan.with_columns([pl.lit(None, dtype=schema[c]).alias(c) for c in absent])
        .select(list(schema))
        .cast(pl.Schema(schema))
        .collect()
    )
    if "site_key" in absent:
        # ... and its site column holds an organisation's key where the ODS code was unknown
        legacy = pl.col("site").str.contains("|Organization|", literal=True).fill_null(False)
        frame = frame.with_columns(
            site_key=pl.when(legacy).then(pl.col("site")),
            site=pl.when(legacy).then(None).otherwise(pl.col("site")),
        )
    return frame


def scan_table(directory: str | Path, table: str, bucket: int | None = None) -> pl.LazyFrame:
    """Scan one table of a saved snapshot lazily (all buckets, or one), without loading it."""
    folder = Path(directory) / table
    pattern = f"bucket={bucket:03d}/*.parquet" if bucket is not None else "bucket=*/*.parquet"
    files = sorted(folder.glob(pattern))
    schema = SCHEMAS.get(table) or RESOURCES_SCHEMA
    if not files:
        return pl.DataFrame(schema=schema).lazy()
    return pl.scan_parquet(files, hive_partitioning=False)


__all__ = [
    "INDEX",
    "SCHEMAS",
    "ColumnarSnapshot",
    "SnapshotFrames",
    "TableView",
    "epoch_us",
    "scan_table",
]
