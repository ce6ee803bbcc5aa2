"""Memory per patient of the two in-memory views a deployment sizes by: the stream worker's
patient state (``surveillance_stream.store.PatientStore``, what the worker holds per partition
with the default ``memory://`` store) and the API's columnar snapshot
(``feasibility.snapshot.ColumnarSnapshot``, every API process holds one).

A synthetic population is generated and ingested through the real adapters (publishing to the
broker, as ``bench_stream`` does); its facts messages are then folded, each view in a fresh
child process, and the growth of the child's resident set (``/proc/self/statm``) over the second
half of the patients is divided by them (the slope, without the libraries' fixed cost).
Baseline, from the same run: the bytes of the facts messages themselves (what the log holds per
patient). ``docs/how-to/deploy-cluster.md`` extrapolates from these figures.

    python -m benchmarks.bench_memory --patients 4000
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def fold(part: str, facts_path: Path) -> dict[str, Any]:
    """In this (child) process: fold the facts into one view, half of them first; the resident
    set's growth over the second half, per patient of that half (the slope: libraries loaded,
    thread pools and the first arenas are paid before it, not per patient)."""
    from core.contracts.facts import envelopes_of
    from feasibility.snapshot import ColumnarSnapshot
    from surveillance_stream.store import PatientStore

    facts: list[tuple[str, bytes]] = pickle.loads(facts_path.read_bytes())
    values = [value for _, value in facts]
    del facts
    half = len(values) // 2
    store = PatientStore()
    snapshot = ColumnarSnapshot()

    def fold_range(start: int, stop: int) -> set[str]:
        patients: set[str] = set()
        for offset in range(start, stop):
            for envelope in envelopes_of(values[offset]):
                patients.add(str(envelope["patient"]))
                if part == "worker":
                    store.apply(offset % 6, envelope)
                else:
                    snapshot.apply(envelope, offset % 6, offset)
        if part == "snapshot":
            snapshot.frames()  # built as an answer builds them
        return patients

    start = rss()
    first = fold_range(0, half)
    middle = rss()
    second = fold_range(half, len(values)) - first
    end = rss()
    extra: dict[str, Any] = {}
    if part == "snapshot":
        rows, size = snapshot.size()
        extra = {"rows": sum(rows.values()), "estimated_frame_bytes": size}
    return {
        "bytes_per_patient": (end - middle) / max(1, len(second)),
        "first_half_bytes": middle - start,
        "second_half_bytes": end - middle,
        "second_half_patients": len(second),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--part", choices=["worker", "snapshot"], help=argparse.SUPPRESS)
    parser.add_argument("--facts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        import json

        print(json.dumps(fold(args.part, args.facts)))
        return

    import json

    from benchmarks.bench_stream import record_population
    from benchmarks.common import write_result

    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    facts, envelopes = record_population(bootstrap, args.patients, args.seed)
    log_bytes = sum(len(value) for _, value in facts)
    parts: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "facts.pickle"
        path.write_bytes(pickle.dumps(facts))
        for part in ("worker", "snapshot"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_memory",
                    "--part",
                    part,
                    "--facts",
                    str(path),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            parts[part] = json.loads(out.stdout.strip().splitlines()[-1])
    per_patient = {part: found["bytes_per_patient"] for part, found in parts.items()}
    load = os.getloadavg()
    result = write_result(
        "memory_per_patient",
        per_patient["worker"],
        "bytes/patient (worker state)",
        log_bytes / args.patients,
        {"patients": args.patients, "envelopes": envelopes, "messages": len(facts)},
        f"python -m benchmarks.bench_memory --patients {args.patients}",
        extra={
            "baseline_is": "bytes of the facts messages per patient (the log)",
            "worker_state_bytes_per_patient": round(per_patient["worker"]),
            "api_snapshot_bytes_per_patient": round(per_patient["snapshot"]),
            "api_snapshot_rows": parts["snapshot"].get("rows"),
            "api_snapshot_estimated_frame_bytes": parts["snapshot"].get("estimated_frame_bytes"),
            "facts_bytes_per_patient": round(log_bytes / args.patients),
            "measured": parts,
            "envelopes_per_patient": round(envelopes / args.patients, 2),
            "load_average": [round(x, 2) for x in load],
        },
        higher_is_better=False,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
