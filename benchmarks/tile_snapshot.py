"""A larger benchmark snapshot made of copies of a smaller one, in seconds instead of an hour.

Building a 1M-patient snapshot from the generator (:mod:`benchmarks.build_snapshot`) takes
~25 minutes on a quiet 2-core machine and well over an hour on a shared, loaded one. This
writes ``copies`` copies of a built snapshot as one: copy ``k`` of patient ``pid`` is
``pid + k * patients`` with the pseudonym suffixed ``~k``, and its resources' ``rid`` move up
the same way; the dictionaries (tokens, code sets, labels) are shared. Every table keeps its
index order. The result loads with ``ColumnarSnapshot.load_parquet`` like any snapshot; its
``meta.json`` says it is tiled (``tiled``: source, copies), and a benchmark on it says so.

What differs from a population generated at full size: every count is ``copies`` times the
source's, and the dictionaries are those of the source (the generator draws codes from fixed
lists, so they are nearly the full size's anyway). Rows per patient, codes, dates and values
are the generator's, so scans, joins and bitmaps do the same work per row.

    python -m benchmarks.tile_snapshot var/bench-home/snapshot-200000 \\
        var/bench-home/snapshot-1000000 --copies 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from feasibility.snapshot import (
    INDEX,
    PATIENTS_SCHEMA,
    RESOURCES_SCHEMA,
    SCHEMAS,
    _read_partitioned,
    _write_partitioned,
)

SHARED = ("tokens", "codesets", "value_sets", "interp_sets", "labels")


def _copies(frame: pl.DataFrame, copies: int, patients: int, resources: int) -> pl.DataFrame:
    parts = []
    for k in range(copies):
        moved = [pl.col("pid") + k * patients]
        if "rid" in frame.columns:
            moved.append(pl.col("rid") + k * resources)
        parts.append(frame.with_columns(moved))
    return pl.concat(parts)


def tile(source: Path, out: Path, copies: int) -> dict[str, Any]:
    started = time.perf_counter()
    meta = json.loads((source / "meta.json").read_text())
    buckets = int(meta.get("buckets", 16))
    out.mkdir(parents=True, exist_ok=True)
    patients = pl.read_parquet(source / "patients.parquet").cast(pl.Schema(PATIENTS_SCHEMA))
    n = patients.height
    resources = _read_partitioned(source / "resources", RESOURCES_SCHEMA)
    r = resources.height
    if (n * copies) >= 2**32 or (r * copies) >= 2**32:
        raise SystemExit("too many copies for 32-bit patient and resource ids")
    tiled_patients = pl.concat(
        patients.with_columns(
            pl.col("pid") + k * n,
            pl.col("patient") + (f"~{k}" if k else ""),
        )
        for k in range(copies)
    ).sort("pid")
    tiled_patients.write_parquet(out / "patients.parquet")
    for name in SHARED:
        shutil.copyfile(source / f"{name}.parquet", out / f"{name}.parquet")
    rows = {}
    for name, schema in SCHEMAS.items():
        frame = _copies(_read_partitioned(source / name, schema), copies, n, r)
        _write_partitioned(frame.sort(list(INDEX[name])), out / name, buckets)
        rows[name] = frame.height
    _write_partitioned(_copies(resources, copies, n, r).sort("rid"), out / "resources", buckets)
    watermark = dict(meta.get("watermark") or {})
    for key in ("envelopes", "applied"):
        if key in watermark:
            watermark[key] = int(watermark[key]) * copies
    tiled = {
        **meta,
        "patients": n * copies,
        "rows": rows,
        "watermark": watermark,
        "tiled": {"source": str(source), "copies": copies, "source_patients": n},
    }
    (out / "meta.json").write_text(json.dumps(tiled, indent=2) + "\n")
    return {
        "patients": n * copies,
        "copies": copies,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "out": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a folder written by build_snapshot")
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--copies", type=int, required=True)
    args = parser.parse_args(argv)
    if args.copies < 1:
        raise SystemExit("--copies must be at least 1")
    print(json.dumps(tile(args.source, args.out, args.copies)), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
