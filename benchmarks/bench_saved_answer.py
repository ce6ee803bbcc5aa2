"""A saved question's live answer under load (`GET /v1/feasibility/saved-questions/{id}/answer`:
p50/p95/p99, requests/s), beside ``/healthz`` under the same load.

Set-up: a real worker and a real API process (``concierge api``: uvicorn, one process, audit log
on) on the broker, ``--patients`` generated patients ingested through ``/fhir``, and the type 2
diabetes question of ``docs/examples/criteria/t2dm-sglt2.json`` registered as a saved question.
The load starts once its answer is 200 (every partition has evaluated it and the snapshot has
reached the stream's position); the data then stays put, so every answer is a republication
(free of query budget) and any 503 or 429 under load is counted as an error.

Load: ``--concurrency`` sponsor clients (httpx, asyncio, one process) for ``--duration`` seconds;
the first second is a warm-up and not counted. Baseline, same run, same clients: ``GET /healthz``.

    python -m benchmarks.bench_saved_answer --patients 2000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_clinician_api import health_plans, load
from benchmarks.bench_freshness import spawn, wait
from benchmarks.bench_stream import free_port
from benchmarks.common import write_result
from concierge.commands.generate import bundle
from core.auth import issue
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from infra.topics_admin import ensure_topics

KEY = "bench-token-key-0123456789abcdef"
TRIAL = "bench-saved-answer"
CRITERIA = Path(__file__).parents[1] / "docs" / "examples" / "criteria" / "t2dm-sglt2.json"


def answer_plans(headers: dict[str, str], concurrency: int) -> list[dict[str, Any]]:
    path = f"/v1/feasibility/saved-questions/{TRIAL}/answer"

    def requests(rng: random.Random, step: int) -> tuple[str, str]:
        return "answer", path

    return [{"seed": w, "headers": headers, "requests": requests} for w in range(concurrency)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    prefix = f"bench-answer-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    home = Path(tempfile.mkdtemp(prefix="bench-saved-answer-"))
    api_port, worker_port = free_port(), free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
           "CONCIERGE_HOME": str(home), "CONCIERGE_API_PORT": str(api_port),
           "CONCIERGE_WORKER_WEB_PORT": str(worker_port), "CONCIERGE_TOKEN_KEY": KEY,
           "CONCIERGE_DC_QUERY_BUDGET": "100000"}  # fmt: skip
    worker = spawn([sys.executable, "-m", "concierge", "worker"], env, home / "worker.log")
    api = spawn([sys.executable, "-m", "concierge", "api"], env, home / "api.log")
    base = f"http://127.0.0.1:{api_port}"
    sponsor = {"Authorization": f"Bearer {issue(KEY.encode(), 'sponsor', 'bench')}"}
    source = issue(KEY.encode(), "source", "bench-ehr", source_system="urn:bench:ehr")
    fhir = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {source}"}
    try:
        wait(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 300, "API")
        config = GeneratorConfig(patients=options.patients, seed=7, as_of=date.today())
        reference = bundle(list(iter_reference_resources(config)))
        httpx.post(
            f"{base}/fhir", content=orjson.dumps(reference), headers=fhir, timeout=120
        ).raise_for_status()
        batch: list[dict[str, Any]] = []
        for resources in iter_patients(config):
            batch.extend(resources)
            if len(batch) >= 2000:
                httpx.post(f"{base}/fhir", content=orjson.dumps(bundle(batch)), headers=fhir,
                           timeout=300).raise_for_status()  # fmt: skip
                batch = []
        if batch:
            httpx.post(f"{base}/fhir", content=orjson.dumps(bundle(batch)), headers=fhir,
                       timeout=300).raise_for_status()  # fmt: skip
        question = json.loads(CRITERIA.read_text())
        trial = {"id": TRIAL, "title": question.get("title", TRIAL), "criteria": question}
        wait(lambda: httpx.post(f"{base}/v1/feasibility/saved-questions", json=trial,
                                headers=sponsor, timeout=60).status_code in (201, 200, 409),
             300, "saved question registered")  # fmt: skip
        url = f"{base}/v1/feasibility/saved-questions/{TRIAL}/answer"
        wait(lambda: httpx.get(url, headers=sponsor, timeout=60).status_code == 200, 600,
             "saved answer")  # fmt: skip
        first = httpx.get(url, headers=sponsor, timeout=60).json()
        print(f"  answer ready: total {first.get('total')}", file=sys.stderr)
        health = asyncio.run(load(base, health_plans(options.concurrency), options.duration, 1.0))
        print(f"  /healthz: p50 {health['p50_ms']:.1f} ms, p99 {health['p99_ms']:.1f} ms, "
              f"{health['rps']:.0f} req/s", file=sys.stderr)  # fmt: skip
        ours = asyncio.run(
            load(base, answer_plans(sponsor, options.concurrency), options.duration, 1.0)
        )
        print(f"  answer: p50 {ours['p50_ms']:.1f} ms, p95 {ours['p95_ms']:.1f} ms, "
              f"p99 {ours['p99_ms']:.1f} ms, {ours['rps']:.0f} req/s, errors {ours['errors']}",
              file=sys.stderr)  # fmt: skip
    finally:
        for proc in (api, worker):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if ours["errors"] or health["errors"]:
        raise RuntimeError(f"errors under load: {ours['errors']} {health['errors']}")
    parameters = {"patients": options.patients, "concurrency": options.concurrency,
                  "duration_s": options.duration, "question": CRITERIA.name,
                  "server": "concierge api (uvicorn, 1 process) and concierge worker"}  # fmt: skip
    extra = {
        "p50": round(ours["p50_ms"], 2), "p95": round(ours["p95_ms"], 2),
        "p99": round(ours["p99_ms"], 2), "max": round(ours["max_ms"], 2),
        "requests_per_second": round(ours["rps"], 1), "requests": ours["count"],
        "baseline_p50": round(health["p50_ms"], 2), "baseline_p95": round(health["p95_ms"], 2),
        "baseline_requests_per_second": round(health["rps"], 1),
        "load_average": os.getloadavg()[0],
        "note": "load generator, API and worker share the machine's 2 cores",
    }  # fmt: skip
    command = "python -m benchmarks.bench_saved_answer " + " ".join(sys.argv[1:])
    result = write_result("clinician_answer_p99", ours["p99_ms"], "milliseconds", health["p99_ms"],
                          parameters, command.strip(), extra, higher_is_better=False)  # fmt: skip
    summary = {k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}
    print(json.dumps(summary | {"p50": extra["p50"], "rps": extra["requests_per_second"]}))


if __name__ == "__main__":
    main()
