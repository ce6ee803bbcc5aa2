"""Stream throughput with live saved questions, beside a consume-and-decode baseline.

A synthetic population goes through the real adapters (per-patient batches, as the Kafka sink
publishes them); the raw messages are recorded once and replayed into a fresh set of topics for
every run, so each run starts from an empty broker state. Two processes read the same messages:

* **the worker** (``concierge worker``) with ``--trials`` saved questions registered (live
  cohorts, per event, with stream-time ticks and cohort records written to the cohort topic)
  and its device counters (each exposed patient's contribution recomputed per event and
  written to the device-contribution topic); ``--dense-implants`` gives every older patient
  implants, so the device counters are busy;
* **the baseline**: a Faust worker that only consumes and decodes the same topic
  (``benchmarks/faust_baseline.py``), i.e. the cost of the runtime and the message format.

Figures: envelopes (facts) per CPU-second of the worker process (its user+system time from the
first message to the last, all threads), and wall-clock facts/s; each beside the baseline's in
the same run. Runs alternate (baseline, worker, baseline, ...) and medians are reported.

    python -m benchmarks.bench_stream --patients 20000 --trials 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer

from benchmarks.common import summary, write_result
from concierge.commands.generate import bundle
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import KafkaSink
from fhir_adapters.synthetic.generator import (
    DENSE_IMPLANT_RATES,
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from infra.topics import FACTS, TRIALS
from infra.topics_admin import ensure_topics

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "criteria"


def trials(n: int) -> list[dict[str, Any]]:
    """``n`` realistic saved questions: the shipped examples and variants of them."""
    base = [json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.json"))]
    variants: list[dict[str, Any]] = []
    for threshold in (48, 53, 64, 75):
        t2dm = json.loads(json.dumps(base[2]))
        t2dm["inclusion"][2]["any_of"][0]["value"]["ge"] = threshold
        t2dm["title"] = f"T2DM with HbA1c >= {threshold}"
        variants.append(t2dm)
    for code, title in (("I10", "Hypertension"), ("J45", "Asthma"), ("N18", "CKD")):
        variants.append(
            {
                "title": title,
                "inclusion": [
                    {"type": "condition", "codes": [{"system": "icd10", "prefix": code}]},
                    {"type": "age", "min": 18, "max": 85},
                    {"type": "observation", "codes": [{"concept": "egfr"}],
                     "value": {"ge": 15, "unit": "mL/min/{1.73_m2}"},
                     "window": {"days_before": 730}},
                ],
                "exclusion": [{"type": "condition", "codes": [{"system": "icd10", "prefix": "C"}]}],
            }
        )  # fmt: skip
    return (base + variants)[:n]


class RecordingSink(KafkaSink):
    """The real Kafka sink, also keeping every (topic, key, value) it publishes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: list[tuple[str, str, bytes]] = []

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        self.recorded.append((topic, key, value))
        super()._produce(topic, key, value)


DENSE_IMPLANTS = DENSE_IMPLANT_RATES


def record_population(
    bootstrap: str, patients: int, seed: int, dense: bool = False
) -> tuple[list[Any], int]:
    prefix = f"bench-src-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(kafka_bootstrap_servers=bootstrap, topic_prefix=prefix, home=home)
        sink = RecordingSink(bootstrap, prefix)
        ingestor = build_ingestor(settings, sink=sink)
        config = GeneratorConfig(patients=patients, seed=seed, as_of=date.today())
        if dense:
            config = replace(config, implant_rates=DENSE_IMPLANTS)
        ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
        started = time.perf_counter()
        for i, record in enumerate(iter_patients(config)):
            ingestor.ingest_bundle(bundle(record), "bench")
            if i % 2000 == 0:
                print(f"  generated and ingested {i}/{patients} patients", file=sys.stderr)
        ingestor.commit()
        ingestor.vault.close()
        accepted = ingestor.stats.counts["accepted"]
        print(f"  {accepted} resources in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    facts = [(key, value) for topic, key, value in sink.recorded if topic.endswith(FACTS)]
    from core.contracts.facts import envelopes_of

    envelopes = sum(len(envelopes_of(v)) for _, v in facts)
    return facts, envelopes


def register(bootstrap: str, prefix: str, trial_docs: list[dict]) -> None:
    ensure_topics(bootstrap, prefix)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, criteria in enumerate(trial_docs):
        record = {
            "schema": "concierge.trial/1", "id": f"bench-trial-{i}", "version": 1,
            "title": criteria.get("title", f"trial {i}"), "criteria": criteria,
            "recruiting_sites": [], "target": None, "site_targets": {}, "recruiters": {},
            "sponsor": "bench", "status": "active",
            "registered_at": datetime.now(UTC).isoformat(),
        }  # fmt: skip
        producer.produce(prefix + TRIALS, key=record["id"].encode(), value=json.dumps(record))
    producer.flush(30)


def replay(bootstrap: str, prefix: str, facts: list[Any]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    for key, value in facts:
        while True:
            try:
                producer.produce(prefix + FACTS, key=key.encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    args: list[str],
    env: dict[str, str],
    port: int,
    total: int,
    log: Path,
    ready: Any,
    feed: Any,
) -> dict:
    """Start ``args``, wait until its /health satisfies ``ready``, call ``feed`` (produce the
    facts), and measure from the first fact applied to the last."""
    proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not get ready: {log.read_text()[-2000:]}")
            try:
                if ready(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        first_cpu = first_wall = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited: {log.read_text()[-2000:]}")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            done = health.get("applied", 0) + health.get("ignored", 0)
            if first_cpu is None and done > 0:
                first_cpu, first_wall, first_done = cpu_seconds(proc.pid), time.monotonic(), done
            if done >= total:
                cpu = cpu_seconds(proc.pid) - first_cpu  # type: ignore[operator]
                wall = time.monotonic() - first_wall  # type: ignore[operator]
                counted = total - first_done
                return {"cpu_s": cpu, "wall_s": wall, "facts_per_cpu_s": counted / cpu,
                        "facts_per_s": counted / wall, "extra": health}  # fmt: skip
            time.sleep(0.05)
        raise TimeoutError(f"{args} did not finish")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--compare-devices",
        action="store_true",
        help="also run the worker with its device counters off, alternating with the others",
    )
    parser.add_argument(
        "--dense-implants",
        action="store_true",
        help="implants for every older patient (device counters busy), not the usual rates",
    )
    parser.add_argument(
        "--name",
        default="stream_throughput",
        help="result name prefix (results: <name>_per_core, <name>_wall)",
    )
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    print(f"recording {options.patients} patients through the adapters", file=sys.stderr)
    facts, total = record_population(
        bootstrap, options.patients, options.seed, options.dense_implants
    )
    docs = trials(options.trials)
    logs = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    worker_runs: list[dict] = []
    baseline_runs: list[dict] = []
    plain_runs: list[dict] = []
    kinds = ("baseline", "worker", "plain") if options.compare_devices else ("baseline", "worker")
    for repeat in range(options.repeats):
        for kind in kinds:
            prefix = f"bench-{kind}-{uuid.uuid4().hex[:6]}."
            register(bootstrap, prefix, docs if kind != "baseline" else [])
            port = free_port()
            (logs / prefix / "baseline").mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                   "CONCIERGE_TOPIC_PREFIX": prefix, "CONCIERGE_WORKER_WEB_PORT": str(port),
                   "CONCIERGE_HOME": str(logs / prefix), "FAUST_BASELINE_TOPIC": prefix + FACTS,
                   "FAUST_BASELINE_PORT": str(port), "FAUST_BASELINE_ID": prefix + "baseline",
                   "FAUST_BASELINE_DATADIR": str(logs / prefix / "baseline")}  # fmt: skip
            if kind == "plain":  # the same worker with its device counters off
                env["CONCIERGE_STREAM_DEVICE_COUNTERS"] = "false"
            if kind in ("worker", "plain"):
                cmd = [sys.executable, "-m", "concierge", "worker", "--loglevel", "warning"]
            else:
                cmd = [sys.executable, "-m", "benchmarks.faust_baseline", "worker", "-l", "warn"]
            expected = len(docs) * 6 if kind != "baseline" else 0
            run = measure(
                cmd,
                env,
                port,
                total,
                logs / f"{prefix}log",
                ready=lambda h, n=expected: h.get("trials", 0) >= n,
                feed=lambda p=prefix: replay(bootstrap, p, facts),
            )
            runs = {"worker": worker_runs, "baseline": baseline_runs, "plain": plain_runs}
            runs[kind].append(run)
            print(f"  run {repeat + 1} {kind:8}: {run['facts_per_cpu_s']:>9.0f} facts/CPU-s, "
                  f"{run['facts_per_s']:>9.0f} facts/s", file=sys.stderr)  # fmt: skip
    worker = summary([r["facts_per_cpu_s"] for r in worker_runs])
    baseline = summary([r["facts_per_cpu_s"] for r in baseline_runs])
    wall = summary([r["facts_per_s"] for r in worker_runs])
    wall_baseline = summary([r["facts_per_s"] for r in baseline_runs])
    command = "python -m benchmarks.bench_stream " + " ".join(sys.argv[1:])
    parameters = {"patients": options.patients, "envelopes": total, "messages": len(facts),
                  "trials": len(docs), "repeats": options.repeats, "device_counters": True,
                  "dense_implants": options.dense_implants}  # fmt: skip
    for result in (
        write_result(f"{options.name}_per_core", worker["median"], "facts/CPU-second",
                     baseline["median"], parameters, command,
                     {"worker": worker, "baseline_runs": baseline, "target": 20000,
                      "last_health": worker_runs[-1]["extra"],
                      "without_device_counters": summary(
                          [r["facts_per_cpu_s"] for r in plain_runs]) if plain_runs else None}),
        write_result(f"{options.name}_wall", wall["median"], "facts/second",
                     wall_baseline["median"], parameters, command,
                     {"worker": wall, "baseline_runs": wall_baseline}),
    ):  # fmt: skip
        print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}))


if __name__ == "__main__":
    main()
