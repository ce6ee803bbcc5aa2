"""How cost grows with the population: the ad hoc answer and the stream's state per patient.

Ad hoc (``adhoc_scaling``): for each population size the snapshot is built once from the
generator (``benchmarks.build_snapshot``, cached as ``CACHE/snapshot-N``, the same folders
``run.sh`` uses) and measured in a fresh process: the engine's answer to the six-criterion
question of :mod:`benchmarks.bench_adhoc` (p50, p99), beside the hand-written polars query for
the same count in the same process (counts must agree); the resident memory the loaded snapshot
takes, per fact and per patient; the columnar frames' own size. The figure is the exponent of a
power-law fit of the engine's p50 against patients (1 = linear); its baseline is the same fit of
the hand-written query, so the ratio says whether the engine scales worse than plain polars.

Stream (``stream_memory_per_patient``): for each size the generator's envelopes are folded into
the worker's :class:`~surveillance_stream.store.PatientStore` as the worker does (apply, then
the patient view the cohort keeper and device counters read), in a fresh process; the figure is
resident memory per patient at the largest size, beside the envelopes' own JSON bytes per
patient (what the facts topic holds for them).

    python -m benchmarks.bench_scaling                               # 100k, 300k, 1M, 3M
    python -m benchmarks.bench_scaling --sizes 100000,300000 --stream-sizes 5000,20000
    python -m benchmarks.bench_scaling --skip stream                 # ad hoc only

Building a snapshot takes about 1.5 ms per patient on this machine (3M: over an hour); built
snapshots are kept, so later runs only measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_result

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size now (not the peak: ``ru_maxrss`` only grows)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def power_law(xs: list[float], ys: list[float]) -> float:
    """Exponent b of y = a * x**b, least squares on logs (numpy; two or more points)."""
    slope, _intercept = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


# --------------------------------------------------------------------------- ad hoc, one size


def measure_adhoc(folder: Path, repeats: int) -> dict[str, Any]:
    """Runs in a child process: load the snapshot, time engine and hand-written query."""
    from benchmarks.bench_adhoc import QUESTION, hand_written
    from feasibility.criteria import parse_question
    from feasibility.engines.polars_engine import PolarsEngine
    from feasibility.snapshot import ColumnarSnapshot

    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    snapshot = ColumnarSnapshot.load_parquet(folder)
    frames = snapshot.frames()
    loaded = time.perf_counter() - started
    gc.collect()
    resident = rss_bytes() - before
    columnar = frames.patients.estimated_size() + sum(
        view.main.estimated_size() + view.tail.estimated_size() + view.dead.estimated_size()
        for view in frames.tables.values()
    )
    columnar += sum(
        frame.estimated_size()
        for frame in (frames.tokens, frames.codesets, frames.value_sets, frames.interp_sets)
    )
    facts = sum(view.main.height + view.tail.height for view in frames.tables.values())
    meta = json.loads((folder / "meta.json").read_text())
    as_of = meta.get("as_of") or "2026-01-01"
    at = datetime.combine(date.fromisoformat(str(as_of)[:10]), datetime.min.time(), UTC)
    at += timedelta(hours=12)
    question = parse_question(QUESTION)
    engine = PolarsEngine()
    ours: list[float] = []
    theirs: list[float] = []
    counts: set[tuple[int, int]] = set()
    for _ in range(repeats):  # alternating, so drift on a shared machine hits both
        t0 = time.perf_counter()
        n_engine = int(engine.evaluate_frames(question, frames, at).get_column("member").sum())
        t1 = time.perf_counter()
        n_hand = hand_written(frames, at)
        t2 = time.perf_counter()
        ours.append((t1 - t0) * 1000)
        theirs.append((t2 - t1) * 1000)
        counts.add((n_engine, n_hand))
    patients = frames.patients.height
    return {
        "patients": patients,
        "facts": facts,
        "p50_ms": round(statistics.median(ours), 3),
        "p99_ms": round(percentile(ours, 0.99), 3),
        "baseline_p50_ms": round(statistics.median(theirs), 3),
        "baseline_p99_ms": round(percentile(theirs, 0.99), 3),
        "counts": sorted(counts),
        "counts_agree": len(counts) == 1 and len({c for pair in counts for c in pair}) == 1,
        "load_seconds": round(loaded, 2),
        "resident_bytes": resident,
        "columnar_bytes": columnar,
        "resident_bytes_per_fact": round(resident / facts, 1) if facts else None,
        "columnar_bytes_per_fact": round(columnar / facts, 1) if facts else None,
        "resident_bytes_per_patient": round(resident / patients, 1) if patients else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# --------------------------------------------------------------------------- stream, one size


def measure_stream(patients: int, seed: int) -> dict[str, Any]:
    """Runs in a child process: fold the generator's envelopes into the worker's store and
    build each patient's view, as the worker's cohort keeper does per event."""
    import orjson

    from benchmarks import build_snapshot
    from fhir_adapters.synthetic.generator import GeneratorConfig, iter_patients
    from surveillance_stream.store import PatientStore

    config = GeneratorConfig(patients=patients, seed=seed)
    build_snapshot._init(config)
    # generated and serialised first, then decoded one chunk at a time like messages, so what
    # is resident at the end is the store's own state, not the generator's
    chunks: list[bytes] = []
    step = 2_000
    for start in range(0, patients, step):
        records = iter_patients(config, start, min(start + step, patients))
        chunks.append(orjson.dumps(build_snapshot._envelopes(records, "2026-01-01T00:00:00Z")))
    topic_bytes = sum(len(c) for c in chunks)
    gc.collect()
    before = rss_bytes()
    store = PatientStore()
    envelopes = 0
    started = time.perf_counter()
    for index in range(len(chunks)):
        for envelope in orjson.loads(chunks[index]):
            change = store.apply(0, envelope)
            store.view(0, change.patient)
            envelopes += 1
        chunks[index] = b""  # the message bytes are gone once consumed
    elapsed = time.perf_counter() - started
    gc.collect()
    resident = rss_bytes() - before
    held = store.counts()
    return {
        "patients": held["patients"],
        "envelopes": envelopes,
        "resident_bytes": resident,
        "resident_bytes_per_patient": round(resident / max(1, held["patients"]), 1),
        "topic_json_bytes_per_patient": round(topic_bytes / max(1, held["patients"]), 1),
        "fold_seconds": round(elapsed, 2),
    }


# --------------------------------------------------------------------------- driver


def _child(kind: str, argument: str, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_scaling", "--child", kind, argument, *extra]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ensure_snapshot(cache: Path, patients: int, seed: int) -> Path:
    folder = cache / f"snapshot-{patients}"
    if not (folder / "meta.json").exists():
        print(f"building the {patients:,}-patient snapshot in {folder} ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.build_snapshot", str(folder),
             "--patients", str(patients), "--seed", str(seed)],
            check=True,
        )  # fmt: skip
    return folder


def run_adhoc(sizes: list[int], cache: Path, seed: int, repeats: int, command: str) -> None:
    series = []
    for size in sizes:
        folder = ensure_snapshot(cache, size, seed)
        point = _child("adhoc", str(folder), ["--repeats", str(repeats)])
        print(f"adhoc {size:,}: {json.dumps(point)}", file=sys.stderr)
        series.append(point)
    xs = [float(p["patients"]) for p in series]
    exponent = power_law(xs, [p["p50_ms"] for p in series]) if len(series) > 1 else float("nan")
    baseline = (
        power_law(xs, [p["baseline_p50_ms"] for p in series]) if len(series) > 1 else float("nan")
    )
    largest = max(series, key=lambda p: p["patients"])
    write_result(
        "adhoc_scaling",
        exponent,
        "power-law exponent of engine p50 against patients",
        baseline,
        {"sizes": sizes, "seed": seed, "repeats": repeats, "criteria": 6},
        command,
        {
            "baseline_is": "the same fit of the hand-written polars query, same processes",
            "exponent": round(exponent, 3),
            "exponent_p99": round(power_law(xs, [p["p99_ms"] for p in series]), 3)
            if len(series) > 1
            else None,
            "bytes_per_fact": largest["resident_bytes_per_fact"],
            "bytes_per_patient": largest["resident_bytes_per_patient"],
            "columnar_bytes_per_fact": largest["columnar_bytes_per_fact"],
            "counts_agree": all(p["counts_agree"] for p in series),
            "series": series,
            "load_average": os.getloadavg(),
        },
        higher_is_better=False,
    )


def run_stream(sizes: list[int], seed: int, command: str) -> None:
    series = []
    for size in sizes:
        point = _child("stream", str(size), ["--seed", str(seed)])
        print(f"stream {size:,}: {json.dumps(point)}", file=sys.stderr)
        series.append(point)
    largest = max(series, key=lambda p: p["patients"])
    xs = [float(p["patients"]) for p in series]
    write_result(
        "stream_memory_per_patient",
        largest["resident_bytes_per_patient"],
        "bytes of worker state per patient",
        largest["topic_json_bytes_per_patient"],
        {"sizes": sizes, "seed": seed},
        command,
        {
            "baseline_is": "the patient's envelopes as JSON on the facts topic",
            "exponent": round(power_law(xs, [float(p["resident_bytes"]) for p in series]), 3)
            if len(series) > 1
            else None,
            "series": series,
            "load_average": os.getloadavg(),
        },
        higher_is_better=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000,3000000")
    parser.add_argument("--stream-sizes", default="10000,30000,100000")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("CONCIERGE_HOME", "var/bench-home")),
        help="where snapshots are built and kept (snapshot-N)",
    )
    parser.add_argument("--skip", action="append", default=[], choices=["adhoc", "stream"])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, argument = args.child
        point = (
            measure_adhoc(Path(argument), args.repeats)
            if kind == "adhoc"
            else measure_stream(int(argument), args.seed)
        )
        print(json.dumps(point))
        return
    command = "python -m benchmarks.bench_scaling " + " ".join(argv or sys.argv[1:])
    if "adhoc" not in args.skip:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        run_adhoc(sizes, args.cache, args.seed, args.repeats, command.strip())
    if "stream" not in args.skip:
        sizes = [int(s) for s in args.stream_sizes.split(",") if s]
        run_stream(sizes, args.seed, command.strip())


if __name__ == "__main__":
    main()
