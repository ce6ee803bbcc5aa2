"""Clinician API latency under load (p50/p95/p99, requests/s), beside ``/healthz`` under the same
load.

Set-up: a recruitment database (SQLite, migrated) seeded through the real service with
``--invitations`` candidates routed over ``--clinicians`` GPs (one patient in ten has no GP and
goes to a site's trial-recruiter nurse instead), and an identity vault holding every patient's
identity; then the API served as the product serves it (``concierge api``: uvicorn, one process,
audit log on). No notification channel is configured, so invitations wait for the clinician in
``sent_to_clinician``.

Load: ``--concurrency`` clients (httpx, asyncio, one process) for ``--duration`` seconds, each a
GP with a token of their own, cycling through what the clinician page calls: their candidates,
their invitations (first page, 100 rows each, identities read from the vault) and one of their
invitations in detail (with its history). The first second is a warm-up and not counted.

Baseline, same run, same clients: ``GET /healthz`` (the HTTP stack, the auth-less floor).

    python -m benchmarks.bench_clinician_api --invitations 10000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from benchmarks.bench_freshness import percentile, spawn, wait
from benchmarks.bench_recruitment import (
    SOURCE,
    cohort_record,
    patient_envelope,
    patient_name,
    reference_records,
    trial_record,
)
from benchmarks.bench_stream import free_port
from benchmarks.common import write_result
from core.auth import issue
from core.contracts.cohorts import CohortRecord
from core.contracts.trials import OpaqueTrialRecord
from fhir_adapters.extract import IdentityRecord
from fhir_adapters.vault import SqlVault
from recruitment.db import upgrade
from recruitment.models import Invitation
from recruitment.runtime import build_runtime
from recruitment.settings import RecruitmentSettings

KEY = "bench-token-key-0123456789abcdef"
CHUNK = 1000
GIVEN = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Tony")
FAMILY = ("Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Hoare")


def seed(home: Path, invitations: int, sites: int, clinicians: int) -> str:
    """The recruitment database and the identity vault; returns the database URL."""
    url = f"sqlite:///{home / 'recruitment.sqlite'}"
    upgrade(url)
    logging.getLogger("recruitment").setLevel(logging.ERROR)  # no channel: one line per alert
    runtime = build_runtime(RecruitmentSettings(url=url), url=url, channels={})
    try:
        with runtime.sessions.begin() as session:
            work = runtime.service.unit_of_work(session)
            for record in reference_records(sites, clinicians):
                work.reference(record)
            work.trial(
                trial_record(sites)["id"], OpaqueTrialRecord.model_validate(trial_record(sites))
            )
            work.finish()
        for start in range(0, invitations, CHUNK):
            with runtime.sessions.begin() as session:
                work = runtime.service.unit_of_work(session)
                for i in range(start, min(start + CHUNK, invitations)):
                    work.facts(patient_envelope(i, sites, clinicians))
                    entry = CohortRecord.model_validate(cohort_record(i, sites))
                    work.cohort(entry.trial, entry.patient, entry)
                work.finish()
            print(f"  seeded {min(start + CHUNK, invitations)} candidates", file=sys.stderr)
    finally:
        runtime.close()
    vault = SqlVault(f"sqlite:///{home / 'identity-vault.sqlite'}")
    for i in range(invitations):
        identity = IdentityRecord(
            resource_id=f"pat-{i}", identifiers=[], nhs_number=f"{9000000000 + i}",
            family=FAMILY[i % len(FAMILY)], given=GIVEN[(i // 8) % len(GIVEN)],
            birth_date=date(1940 + i % 50, 1 + i % 12, 1 + i % 28), gender="unknown", address=[],
            postcode=None, phone=f"07700{900000 + i % 100000:06d}", email=None,
        )  # fmt: skip
        vault.put_identity(patient_name(i), SOURCE, identity, [])
    vault.close()
    return url


def invitations_by_clinician(url: str) -> dict[str, list[str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(Invitation.practitioner, Invitation.id)).all()
    finally:
        engine.dispose()
    out: dict[str, list[str]] = {}
    for practitioner, invitation_id in rows:
        out.setdefault(practitioner, []).append(invitation_id)
    return out


async def load(base: str, plans: list[dict[str, Any]], duration: float,
               warmup: float) -> dict[str, Any]:  # fmt: skip
    """Run one client per plan until ``duration`` is over; latencies after the warm-up."""
    samples: list[tuple[str, float]] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=len(plans), max_keepalive_connections=len(plans))
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        started = time.monotonic()
        counted_from = started + warmup
        end = counted_from + duration

        async def worker(plan: dict[str, Any]) -> None:
            rng = random.Random(plan["seed"])
            step = plan["seed"]
            while time.monotonic() < end:
                kind, path = plan["requests"](rng, step)
                step += 1
                sent = time.monotonic()
                response = await client.get(path, headers=plan["headers"])
                now = time.monotonic()
                if response.status_code != 200:
                    errors[f"{kind} {response.status_code}"] = (
                        errors.get(f"{kind} {response.status_code}", 0) + 1
                    )
                elif sent >= counted_from and now <= end:
                    samples.append((kind, now - sent))

        await asyncio.gather(*(worker(plan) for plan in plans))
    latencies = [s for _, s in samples]
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({k for k, _ in samples}):
        values = [s for k, s in samples if k == kind]
        by_kind[kind] = {"count": len(values), "p50_ms": statistics.median(values) * 1000,
                         "p99_ms": percentile(values, 0.99) * 1000}  # fmt: skip
    return {
        "count": len(latencies),
        "rps": len(latencies) / duration,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "by_endpoint": by_kind,
        "errors": errors,
    }


def clinician_plans(tokens: dict[str, str], ids: dict[str, list[str]],
                    concurrency: int) -> list[dict[str, Any]]:  # fmt: skip
    gps = sorted(tokens)
    plans = []
    for w in range(concurrency):
        gp = gps[w % len(gps)]
        mine = ids[gp]

        def requests(rng: random.Random, step: int, mine: list[str] = mine) -> tuple[str, str]:
            which = step % 3
            if which == 0:
                return "candidates", "/v1/clinician/candidates?limit=100"
            if which == 1:
                return "invitations", "/v1/clinician/invitations?limit=100"
            return "invitation", f"/v1/clinician/invitations/{rng.choice(mine)}"

        plans.append({"seed": w, "headers": {"Authorization": f"Bearer {tokens[gp]}"},
                      "requests": requests})  # fmt: skip
    return plans


def health_plans(concurrency: int) -> list[dict[str, Any]]:
    return [
        {"seed": w, "headers": {}, "requests": lambda rng, step: ("healthz", "/healthz")}
        for w in range(concurrency)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--invitations", type=int, default=10000)
    parser.add_argument("--clinicians", type=int, default=20, help="GPs the patients are with")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load run")
    parser.add_argument("--quick", action="store_true", help="2,000 invitations, 5 s runs")
    options = parser.parse_args()
    if options.quick:
        options.invitations = min(options.invitations, 2000)
        options.duration = min(options.duration, 5.0)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    home = Path(tempfile.mkdtemp(prefix="bench-clinician-api-"))
    print(f"seeding {options.invitations} candidates in {home}", file=sys.stderr)
    started = time.monotonic()
    url = seed(home, options.invitations, options.sites, options.clinicians)
    seed_s = time.monotonic() - started
    ids = {k: v for k, v in invitations_by_clinician(url).items() if "|gp-" in k}
    tokens = {gp: issue(KEY.encode(), "clinician", "Bench practice", practitioner=gp)
              for gp in ids}  # fmt: skip
    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_HOME": str(home),
           "CONCIERGE_API_PORT": str(port), "CONCIERGE_TOKEN_KEY": KEY,
           "CONCIERGE_FEASIBILITY_FEED": "false", "CONCIERGE_RECRUITMENT_URL": url,
           "CONCIERGE_TOPIC_PREFIX": f"bench-api-{port}."}  # fmt: skip
    api = spawn([sys.executable, "-m", "concierge", "api"], env, home / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 120, "API")
        some = next(iter(tokens))
        check = httpx.get(f"{base}/v1/clinician/invitations", timeout=30,
                          headers={"Authorization": f"Bearer {tokens[some]}"})  # fmt: skip
        check.raise_for_status()
        assert check.json()["count"] == len(ids[some]), check.json()["count"]
        print(f"  {len(ids)} GPs, {sum(map(len, ids.values()))} invitations of theirs",
              file=sys.stderr)  # fmt: skip
        health = asyncio.run(load(base, health_plans(options.concurrency), options.duration, 1.0))
        print(f"  /healthz: p50 {health['p50_ms']:.1f} ms, p99 {health['p99_ms']:.1f} ms, "
              f"{health['rps']:.0f} req/s", file=sys.stderr)  # fmt: skip
        plans = clinician_plans(tokens, ids, options.concurrency)
        ours = asyncio.run(load(base, plans, options.duration, 1.0))
        print(f"  clinician: p50 {ours['p50_ms']:.1f} ms, p95 {ours['p95_ms']:.1f} ms, "
              f"p99 {ours['p99_ms']:.1f} ms, {ours['rps']:.0f} req/s, errors {ours['errors']}",
              file=sys.stderr)  # fmt: skip
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
    if ours["errors"] or health["errors"]:
        raise RuntimeError(f"errors under load: {ours['errors']} {health['errors']}")
    per_gp = [len(v) for v in ids.values()]
    parameters = {"invitations": options.invitations, "clinicians": len(ids),
                  "invitations_per_clinician": round(statistics.mean(per_gp)),
                  "concurrency": options.concurrency, "duration_s": options.duration,
                  "page_size": 100, "database": "sqlite",
                  "server": "concierge api (uvicorn, 1 process)"}  # fmt: skip
    extra = {
        "p50": round(ours["p50_ms"], 2), "p95": round(ours["p95_ms"], 2),
        "p99": round(ours["p99_ms"], 2), "max": round(ours["max_ms"], 2),
        "requests_per_second": round(ours["rps"], 1), "requests": ours["count"],
        "by_endpoint": ours["by_endpoint"],
        "baseline_p50": round(health["p50_ms"], 2), "baseline_p95": round(health["p95_ms"], 2),
        "baseline_requests_per_second": round(health["rps"], 1),
        "seed_seconds": round(seed_s, 1),
        "note": "load generator and server share the machine's 2 cores",
    }  # fmt: skip
    command = "python -m benchmarks.bench_clinician_api " + " ".join(sys.argv[1:])
    result = write_result("clinician_api_p99", ours["p99_ms"], "milliseconds", health["p99_ms"],
                          parameters, command.strip(), extra, higher_is_better=False)  # fmt: skip
    print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}
                     | {"p50": extra["p50"], "p95": extra["p95"],
                        "requests_per_second": extra["requests_per_second"]}))  # fmt: skip


if __name__ == "__main__":
    main()
