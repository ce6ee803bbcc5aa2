"""Worker recovery: restart to caught-up from a local checkpoint, beside the same restart from
offset 0, at several sizes of history.

Per size: a population of that many patients (a real synthetic population through the
adapters, cloned with new pseudonyms: ``benchmarks/workers.py``) is put on fresh topics; one
worker folds all of it, writing checkpoints every ``--interval`` seconds; then a trickle of new
patients for longer than the interval, so every partition has a checkpoint younger than a
minute, as in steady operation. The worker is stopped (SIGTERM) and

* **restarted with its checkpoints** (the figure): time from the process start to ``/readyz``
  answering 200 (every partition recovered and caught up with the topic's end);
* **restarted with checkpoints off** (``CONCIERGE_STREAM_CHECKPOINT_SECONDS=0``, the baseline):
  the same, every partition folded from offset 0, as before checkpoints existed.

Both restarts pay the same fixed costs (interpreter start, joining the group, loading saved
questions); ``/readyz`` also lists what each partition's recovery read and how long it took.

    python -m benchmarks.bench_recovery --patients 100000 300000

With ``--failover``, the failover variant instead (``recovery_failover``): two workers in one
group share the partitions; after the same trickle one is killed with SIGKILL, and the figure is
the time from the kill to the survivor answering ``/readyz`` 200 holding every partition, **with
standby checkpoints** (``CONCIERGE_STREAM_STANDBY=true``: the survivor recovers the dead one's
partitions from its standbys and reads the tail) beside the same failover **without** (the
survivor folds them from offset 0, unless it held them earlier and kept their checkpoint: each
recovery's ``from`` is in the result). Both pairs read the same topics, one after the other,
under different group ids. Both include the session timeout
(``CONCIERGE_STREAM_SESSION_TIMEOUT_SECONDS``, 6 s here) before the survivor is given them.

    python -m benchmarks.bench_recovery --failover --patients 100000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.bench_stream import register, replay
from benchmarks.common import write_result
from benchmarks.workers import Worker, clone, load_average, population
from infra.topics_admin import ensure_topics


def wait_applied(worker: Worker, total: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not worker.alive():
            raise RuntimeError(worker.tail())
        health = worker.health()
        if health.get("applied", 0) + health.get("ignored", 0) >= total:
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"the worker did not fold {total} envelopes in {timeout} s")


def one_size(
    bootstrap: str, facts: list[Any], per_copy: int, copies: int, options: Any, logs: Path
) -> dict[str, Any]:
    total = per_copy * copies
    if options.reuse:
        # topics, group offsets and the worker's home of an earlier run with this population
        prefix, produced = options.reuse, 0.0
        logs = Path(options.reuse_logs)
        print(f"  reusing {prefix} ({total} envelopes) in {logs}", file=sys.stderr)
    else:
        prefix = f"bench-recovery-{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, prefix)
        register(bootstrap, prefix, [])
        print(f"  {copies} copies: {total} envelopes to {prefix}", file=sys.stderr)
        started = time.monotonic()
        replay(bootstrap, prefix, list(clone(facts, copies)))
        produced = time.monotonic() - started
    devices = "true" if options.device_counters else "false"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
           "CONCIERGE_STREAM_CHECKPOINT_SECONDS": str(options.interval),
           "CONCIERGE_STREAM_DEVICE_COUNTERS": devices}  # fmt: skip
    worker = Worker(logs / prefix, env)
    worker.start()
    try:
        fold = 0.0 if options.reuse else wait_applied(worker, total, 7200)
        print(f"  folded in {fold:.0f} s (produced in {produced:.0f} s)", file=sys.stderr)
        # steady operation: new patients trickle in for longer than the checkpoint interval
        extra = list(itertools.islice(clone(facts, copies + 1), len(facts) * copies, None))
        trickle_until = time.monotonic() + options.interval + 10
        sent = 0
        fresh = extra[2000:4000] if options.reuse else extra[:2000]  # new to the worker
        for key, value in itertools.cycle(fresh):
            if time.monotonic() > trickle_until:
                break
            replay(bootstrap, prefix, [(key, value)])
            sent += 1
            time.sleep(0.02)
        worker.wait_ready(300)
        _, before = worker.ready()
        checkpoints = before.get("checkpoints", [])
        worker.stop()

        runs: dict[str, Any] = {}
        off = {"CONCIERGE_STREAM_CHECKPOINT_SECONDS": "0"}
        for kind, extra_env in (("checkpoint", {}), ("offset_0", off)):
            t0 = worker.start(**extra_env)
            body = worker.wait_ready(1800)
            seconds = time.monotonic() - t0
            rebuilds = body.get("rebuilds", [])
            runs[kind] = {
                "seconds_to_ready": round(seconds, 2),
                "recovery_seconds": round(sum(r.get("seconds", 0) for r in rebuilds), 2),
                "envelopes_read": sum(r.get("envelopes", 0) for r in rebuilds),
                "rebuilds": rebuilds,
            }
            print(f"  restart {kind:10}: ready in {seconds:.1f} s, "
                  f"{runs[kind]['envelopes_read']} envelopes read", file=sys.stderr)  # fmt: skip
            worker.stop()
        return {
            "patients": options.base * copies,
            "envelopes": total,
            "first_fold_seconds": round(fold, 1),
            "trickle_messages": sent,
            "checkpoints_before_restart": checkpoints,
            **runs,
            "load_average": load_average(),
        }
    finally:
        worker.stop()


def produce_history(bootstrap: str, facts: list[Any], copies: int) -> str:
    prefix = f"bench-failover-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    register(bootstrap, prefix, [])
    replay(bootstrap, prefix, list(clone(facts, copies)))
    return prefix


def standbys_written(worker: Worker) -> bool:
    """Every partition the worker does not own has a standby checkpoint, close to the end."""
    standby = worker.health().get("standby") or {}
    partitions = standby.get("partitions") or {}
    held = set(worker.health().get("partitions") or [])
    return len(partitions) + len(held) == 6 and all(
        s["checkpoint"] is not None and s["behind_end"] < 5000 for s in partitions.values()
    )


def failover_size(
    bootstrap: str, facts: list[Any], per_copy: int, copies: int, options: Any, logs: Path
) -> dict[str, Any]:
    """One size of the failover variant: the same kill -9 with and without standbys."""
    total = per_copy * copies
    print(f"  {copies} copies: {total} envelopes", file=sys.stderr)
    prefix = produce_history(bootstrap, facts, copies)
    devices = "true" if options.device_counters else "false"
    runs: dict[str, Any] = {}
    for kind, standby in (("standby", "true"), ("no_standby", "false")):
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
               "CONCIERGE_TOPIC_PREFIX": prefix, "CONCIERGE_WORKER_ID": f"failover-{kind}",
               "CONCIERGE_STREAM_CHECKPOINT_SECONDS": str(options.interval),
               "CONCIERGE_STREAM_SESSION_TIMEOUT_SECONDS": "6",
               "CONCIERGE_STREAM_STANDBY": standby,
               "CONCIERGE_STREAM_DEVICE_COUNTERS": devices}  # fmt: skip
        survivor = Worker(logs / prefix / f"{kind}-a", env)
        victim = Worker(logs / prefix / f"{kind}-b", env)
        try:
            survivor.start()
            victim.start()
            started = time.monotonic()
            while True:
                if time.monotonic() - started > 7200:
                    raise TimeoutError("the pair did not share the partitions and catch up")
                owned = [set(w.health().get("partitions") or []) for w in (survivor, victim)]
                if (
                    all(owned)
                    and owned[0] | owned[1] == set(range(6))
                    and survivor.ready()[0]
                    and victim.ready()[0]
                    and (standby == "false" or standbys_written(survivor))
                ):
                    break
                time.sleep(1.0)
            fold = time.monotonic() - started
            extra = list(itertools.islice(clone(facts, copies + 1), len(facts) * copies, None))
            trickle_until = time.monotonic() + options.interval + 10
            sent = 0
            for key, value in itertools.cycle(extra[:2000]):
                if time.monotonic() > trickle_until:
                    break
                replay(bootstrap, prefix, [(key, value)])
                sent += 1
                time.sleep(0.02)
            moved = sorted(victim.health().get("partitions") or [])
            t0 = time.monotonic()
            victim.stop(signal.SIGKILL)
            while True:
                if time.monotonic() - t0 > 1800:
                    raise TimeoutError(f"the survivor did not take over: {survivor.tail()}")
                if not survivor.alive():
                    raise RuntimeError(survivor.tail())
                ok, body = survivor.ready()
                if ok and sorted(survivor.health().get("partitions") or []) == list(range(6)):
                    break
                time.sleep(0.1)
            seconds = time.monotonic() - t0
            rebuilds = [r for r in body.get("rebuilds", []) if r.get("partition") in moved]
            runs[kind] = {
                "seconds_kill_to_ready": round(seconds, 2),
                "recovery_seconds": round(sum(r.get("seconds", 0) for r in rebuilds), 2),
                "envelopes_read": sum(r.get("envelopes", 0) for r in rebuilds),
                "partitions_moved": moved,
                "rebuilds": rebuilds,
                "first_fold_seconds": round(fold, 1),
                "trickle_messages": sent,
                "load_average": load_average(),
            }
            print(f"  failover {kind:10}: ready {seconds:.1f} s after the kill, "
                  f"{runs[kind]['envelopes_read']} envelopes read", file=sys.stderr)  # fmt: skip
        finally:
            victim.stop()
            survivor.stop()
    return {"patients": options.base * copies, "envelopes": total, **runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[100000, 300000])
    parser.add_argument("--base", type=int, default=2000, help="real patients cloned")
    parser.add_argument("--interval", type=float, default=20.0, help="checkpoint interval, s")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device-counters", action="store_true")
    parser.add_argument(
        "--reuse",
        default="",
        help="topic prefix of an earlier run of one size (its history is not produced again)",
    )
    parser.add_argument("--reuse-logs", default="", help="that run's log directory")
    parser.add_argument(
        "--failover",
        action="store_true",
        help="measure a kill -9 failover between two workers with and without standbys",
    )
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    facts, per_copy, _ = population(bootstrap, options.base, options.seed, options.base)
    logs = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    sizes: list[dict[str, Any]] = []
    for patients in options.patients:
        copies = max(1, round(patients / options.base))
        print(f"== {patients} patients", file=sys.stderr)
        if options.failover:
            sizes.append(failover_size(bootstrap, facts, per_copy, copies, options, logs))
            write_failover(sizes, options)
            continue
        sizes.append(one_size(bootstrap, facts, per_copy, copies, options, logs))
        # written after every size: a run stopped early keeps the sizes it measured
        write(sizes, options)


def write_failover(sizes: list[dict[str, Any]], options: Any) -> None:
    last = sizes[-1]
    command = "python -m benchmarks.bench_recovery " + " ".join(sys.argv[1:])
    result = write_result(
        "recovery_failover",
        last["standby"]["seconds_kill_to_ready"],
        "seconds",
        last["no_standby"]["seconds_kill_to_ready"],
        {"patients": [size["patients"] for size in sizes], "base_population": options.base,
         "checkpoint_interval_s": options.interval, "device_counters": options.device_counters,
         "workers": 2, "session_timeout_s": 6},
        command,
        {"sizes": sizes, "load_average": load_average(),
         "note": "value: SIGKILL of one of two workers to the survivor ready with every "
                 "partition, with standby checkpoints, at the largest size; baseline: the same "
                 "failover without standbys, same run, same topics"},
        higher_is_better=False,
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}))


def write(sizes: list[dict[str, Any]], options: Any) -> None:
    last = sizes[-1]
    command = "python -m benchmarks.bench_recovery " + " ".join(sys.argv[1:])
    result = write_result(
        "recovery",
        last["checkpoint"]["seconds_to_ready"],
        "seconds",
        last["offset_0"]["seconds_to_ready"],
        {"patients": [size["patients"] for size in sizes], "base_population": options.base,
         "checkpoint_interval_s": options.interval, "device_counters": options.device_counters,
         "trials": 0},
        command,
        {"sizes": sizes, "load_average": load_average(),
         "note": "value: restart to ready with checkpoints at the largest size; baseline: the "
                 "same restart reading every partition from offset 0, same run"},
        higher_is_better=False,
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}))
    for size in sizes[-1:]:
        print(json.dumps({"patients": size["patients"],
                          "checkpoint_s": size["checkpoint"]["seconds_to_ready"],
                          "offset_0_s": size["offset_0"]["seconds_to_ready"]}))  # fmt: skip


if __name__ == "__main__":
    main()
