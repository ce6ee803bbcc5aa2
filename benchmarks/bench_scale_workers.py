"""Scale-out: facts per second with one and with two workers in one consumer group on the same
topic, and CPU-seconds per fact of each.

The same population (a real synthetic one through the adapters, cloned with new pseudonyms:
``benchmarks/workers.py``) is replayed onto fresh topics for every run. One or two ``concierge
worker`` processes (one group, six partitions: two workers hold three each) with ``--trials``
live saved questions and the device counters wait until they hold every partition and have the
saved questions, then the facts are produced; the figure is wall-clock facts per second from
the first fact applied to the last (summed over the workers), and the CPU time of all worker
processes over the same span divided by the facts. Runs alternate (1, 2, 1, 2, ...); medians.

On this 2-core machine two workers can at best double the rate, and only while nothing else
runs; the ratio says how much of that the group delivers.

    python -m benchmarks.bench_scale_workers --patients 20000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.bench_stream import register, replay, trials
from benchmarks.common import summary, write_result
from benchmarks.workers import Worker, clone, load_average, population


def run(
    bootstrap: str, facts: list[Any], total: int, docs: list[Any], workers: int, logs: Path
) -> dict[str, Any]:
    prefix = f"bench-scale{workers}-{uuid.uuid4().hex[:6]}."
    register(bootstrap, prefix, docs)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix}
    procs = [Worker(logs / prefix / f"w{i}", env) for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 300
        while True:
            healths = [p.health() for p in procs]
            held = sorted(x for h in healths for x in h.get("partitions") or [])
            # partitions show once recovered: wait for every one, each on one worker, and the
            # saved questions on each partition
            if (
                held == list(range(6))
                and all(h.get("partitions") for h in healths)
                and sum(h.get("trials", 0) for h in healths) >= len(docs) * 6
            ):
                break
            if time.monotonic() > deadline or not all(p.alive() for p in procs):
                raise RuntimeError(f"workers not ready: {healths}\n{procs[0].tail()}")
            time.sleep(0.2)
        started_feed = time.monotonic()
        replay(bootstrap, prefix, facts)
        fed = time.monotonic() - started_feed
        first: tuple[float, float, int] | None = None
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            done = sum(h.get("applied", 0) + h.get("ignored", 0) for h in map(Worker.health, procs))
            if first is None and done > 0:
                first = (time.monotonic(), sum(p.cpu() for p in procs), done)
            if done >= total and first is not None:
                wall = time.monotonic() - first[0]
                cpu = sum(p.cpu() for p in procs) - first[1]
                counted = total - first[2]
                return {"workers": workers, "facts_per_s": counted / wall,
                        "cpu_s_per_fact": cpu / counted, "wall_s": wall, "cpu_s": cpu,
                        "produce_s": fed, "load_average": load_average()}  # fmt: skip
            time.sleep(0.1)
        raise TimeoutError("the workers did not finish")
    finally:
        for proc in procs:
            proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--base", type=int, default=2000, help="real patients cloned")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    base, per_copy, copies = population(bootstrap, options.patients, options.seed, options.base)
    facts = list(clone(base, copies))
    total = per_copy * copies
    docs = trials(options.trials)
    logs = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for repeat in range(options.repeats):
        for workers in (1, 2):
            found = run(bootstrap, facts, total, docs, workers, logs)
            runs[workers].append(found)
            print(f"  run {repeat + 1}, {workers} worker(s): {found['facts_per_s']:.0f} facts/s, "
                  f"{found['cpu_s_per_fact'] * 1e6:.0f} CPU-us/fact, "
                  f"load {found['load_average']}", file=sys.stderr)  # fmt: skip
    one = summary([r["facts_per_s"] for r in runs[1]])
    two = summary([r["facts_per_s"] for r in runs[2]])
    cpu_one = summary([r["cpu_s_per_fact"] for r in runs[1]])
    cpu_two = summary([r["cpu_s_per_fact"] for r in runs[2]])
    command = "python -m benchmarks.bench_scale_workers " + " ".join(sys.argv[1:])
    result = write_result(
        "scale_workers",
        two["median"],
        "facts/second",
        one["median"],
        {"patients": options.base * copies, "envelopes": total, "messages": len(facts),
         "trials": len(docs), "device_counters": True, "partitions": 6,
         "repeats": options.repeats, "cpus": os.cpu_count()},
        command,
        {"one_worker": one, "two_workers": two,
         "cpu_seconds_per_fact": {"one_worker": cpu_one, "two_workers": cpu_two},
         "runs": runs, "load_average": load_average(),
         "note": "value: two workers in one group; baseline: one worker; same run, alternating"},
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}))


if __name__ == "__main__":
    main()
