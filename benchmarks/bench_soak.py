"""Soak under load: ``--rate`` FHIR resources a second (1,000 by default) through ``POST /fhir``
for ``--minutes`` (10 by default), with every service up as deployed: the API, the stream
worker, the signal monitor (``concierge monitor``, the API forwarding to it) and the recruitment
service, each its own process on the broker ``KAFKA_BOOTSTRAP_SERVERS`` names.

The load: synthetic patients (the generator's, through the real adapters), each sent as one
collection Bundle, cloned under new ids when the generated ones run out, paced to the rate by a
pool of senders; a sponsor asks an ad hoc question every ``--ask-every`` seconds. Every
``--interval`` seconds (10) it samples, per service, the resident memory of its process tree,
the consumer lag from its ``/metrics`` (the sum over partitions of every topic it reads), and
from the API's own histograms the p99 of answers (``concierge_answer_duration_seconds``) and of
``POST /fhir`` in that interval. After the load stops it waits for every lag to reach 0.

One JSON (``benchmarks/results/soak_load.json`` by default) holds the series and the bounds
checked: the rate reached, answers' p99, lag not growing (the last third's peak within twice the
first third's, plus a margin) and draining to 0 afterwards, memory not growing (each service's
last third within 1.5 times its first third, plus 64 MB); ``ok`` says whether all held, and the
exit code is 1 when one did not.

    python -m benchmarks.bench_soak --minutes 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_stream import free_port
from benchmarks.common import write_result
from benchmarks.soak import _children_map, descendants, rss_bytes
from benchmarks.workers import load_average
from core.auth import issue
from fhir_adapters.synthetic.generator import GeneratorConfig, iter_patients
from infra.topics_admin import ensure_topics

TOKEN_KEY = "soak-bench-token-key-not-a-secret-0123456789"
SOURCE = "urn:bench:soak-ehr"
SERVICES = ("api", "worker", "monitor", "recruitment")
QUESTION: dict[str, Any] = {
    "schema": "concierge.criteria/1",
    "title": "Adults with an HbA1c of 48 mmol/mol or more",
    "index_date": "2026-01-01",
    "inclusion": [
        {"type": "age", "min": 18},
        {"type": "observation", "codes": [{"concept": "hba1c"}],
         "value": {"ge": 48, "unit": "mmol/mol"}},
    ],
}  # fmt: skip


@dataclass
class Service:
    name: str
    argv: list[str]
    url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", *self.argv], env=env,
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        try:
            text = httpx.get(self.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return samples
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return samples


def bundles(patients: int, seed: int) -> Iterator[tuple[int, bytes]]:
    """``(resources, Bundle JSON)`` forever: the generated patients, then the same under new
    ids (every id and reference of copy *k* suffixed ``-k``: new patients, new resources)."""
    base = [list(resources) for resources in iter_patients(GeneratorConfig(patients, seed))]
    for copy in itertools.count():
        for resources in base:
            sent = resources
            if copy:
                # new ids; a copy's Patient has no identifiers (its pseudonym would be the
                # original's, from the NHS number): its pseudonym comes from its new id
                sent = [{**r, "id": f"{r['id']}-{copy}"} for r in resources]
                for r in sent:
                    if r["resourceType"] == "Patient":
                        r.pop("identifier", None)
            text = orjson.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "collection",
                    "entry": [{"resource": r} for r in sent],
                }
            ).decode()
            if copy:
                for resource in resources:
                    rid = f"{resource['resourceType']}/{resource['id']}"
                    text = text.replace(f'"{rid}"', f'"{rid}-{copy}"')
            yield len(resources), text.encode()


def percentile_from_buckets(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a histogram interval (cumulative counts by upper bound): the upper
    bound of the first bucket reaching it, as Prometheus' histogram_quantile bounds it."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return None


def histogram(samples: dict[str, Any], name: str, **labels: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for found, value in samples.get(name + "_bucket", []):
        if labels.items() <= found.items():
            bound = float(found["le"])
            out[bound] = out.get(bound, 0.0) + value
    return out


def delta(now: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {b: v - before.get(b, 0.0) for b, v in now.items()}


def lag(samples: dict[str, Any]) -> float:
    return sum(v for _, v in samples.get("concierge_consumer_lag_messages", []))


@dataclass
class Sender:
    api: str
    headers: dict[str, str]
    statuses: dict[int, int] = field(default_factory=dict)
    resources: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, client: httpx.Client, count: int, body: bytes) -> None:
        try:
            status = client.post(
                f"{self.api}/fhir", content=body, headers=self.headers, timeout=60
            ).status_code
        except httpx.HTTPError:
            status = 0
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.resources += count


def run(options: argparse.Namespace) -> dict[str, Any]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    root = Path(options.home or f"/tmp/bench-soak-{uuid.uuid4().hex[:6]}")
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"bench-soak-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
        "CONCIERGE_HOME": str(root / "home"), "CONCIERGE_TOKEN_KEY": TOKEN_KEY,
        "CONCIERGE_SOURCE_SYSTEM": SOURCE, "CONCIERGE_API_PORT": str(ports["api"]),
        "CONCIERGE_WORKER_WEB_PORT": str(ports["worker"]),
        "CONCIERGE_MONITOR_PORT": str(ports["monitor"]),
        "CONCIERGE_SURVEILLANCE_MONITOR_URL": f"http://127.0.0.1:{ports['monitor']}",
        "CONCIERGE_RECRUITMENT_STATUS_PORT": str(ports["recruitment"]),
        "CONCIERGE_RECRUITMENT_EMAIL_ENABLED": "false", "CONCIERGE_AUDIT_ANCHOR_SECONDS": "0",
        # one sponsor asks all the time: a budget that lasts the soak
        "CONCIERGE_DC_QUERY_BUDGET": "1000000", "CONCIERGE_DC_OVERLAP_CONTROL": "false",
        "CONCIERGE_LOG_FORMAT": "json",
    }  # fmt: skip
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    services = {
        "api": Service("api", ["api"], url["api"], root / "api.log"),
        "worker": Service("worker", ["worker", "--loglevel", "warning"], url["worker"],
                          root / "worker.log"),
        "monitor": Service("monitor", ["monitor"], url["monitor"], root / "monitor.log"),
        "recruitment": Service("recruitment", ["recruitment", "run", "--migrate"],
                               url["recruitment"], root / "recruitment.log"),
    }  # fmt: skip
    print(f"soak: {prefix} on {bootstrap}, logs in {root}", file=sys.stderr)
    source = {"Authorization": "Bearer " + issue(TOKEN_KEY.encode(), "source", "ehr",
                                                 source_system=SOURCE),
              "Content-Type": "application/fhir+json"}  # fmt: skip
    sponsor = {"Authorization": "Bearer " + issue(TOKEN_KEY.encode(), "sponsor", "Soak Pharma")}
    work = bundles(options.patients, options.seed)
    next(work)  # generate before the clock starts
    try:
        for service in services.values():
            service.start(env)
        deadline = time.monotonic() + 300
        while not all(s.ready() for s in services.values()):
            for s in services.values():
                if s.proc is not None and s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} exited: {s.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("the services were not ready in 300 s")
            time.sleep(1)
        sender = Sender(url["api"], source)
        asked: dict[int, int] = {}
        stop = threading.Event()

        def ask() -> None:
            with httpx.Client() as client:
                while not stop.wait(options.ask_every):
                    try:
                        code = client.post(f"{url['api']}/v1/feasibility/ask", json=QUESTION,
                                           headers=sponsor, timeout=60).status_code  # fmt: skip
                    except httpx.HTTPError:
                        code = 0
                    asked[code] = asked.get(code, 0) + 1

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        series: list[dict[str, Any]] = []
        before = {name: s.scrape() for name, s in services.items()}
        started = time.monotonic()
        end = started + options.minutes * 60
        next_sample = started + options.interval
        sent = 0
        clients = [httpx.Client() for _ in range(options.senders)]
        with ThreadPoolExecutor(options.senders) as pool:
            pending: list[Any] = []
            for index in itertools.count():
                now = time.monotonic()
                if now >= end:
                    break
                # paced: the resources sent so far never run ahead of rate x elapsed
                ahead = sent / options.rate - (now - started)
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                pending = [f for f in pending if not f.done()]
                if len(pending) < options.senders * 4:
                    count, body = next(work)
                    pending.append(pool.submit(sender.send, clients[index % options.senders],
                                               count, body))  # fmt: skip
                    sent += count
                else:
                    time.sleep(0.005)  # the API is behind: do not queue without bound
                if time.monotonic() >= next_sample:
                    next_sample += options.interval
                    series.append(sample(services, before, started, sender))
            for future in pending:
                future.result()
        for client in clients:
            client.close()
        stop.set()
        load_seconds = time.monotonic() - started
        series.append(sample(services, before, started, sender))
        # the load has stopped: every reader must drain to 0
        drained: float | None = None
        drain_started = time.monotonic()
        while time.monotonic() - drain_started < options.drain_seconds:
            lags = {name: lag(s.scrape()) for name, s in services.items()}
            if all(v == 0 for v in lags.values()):
                drained = time.monotonic() - drain_started
                break
            time.sleep(1)
        return verdict(options, series, sender, asked, load_seconds, drained, root, prefix)
    finally:
        for service in services.values():
            service.stop()


def sample(
    services: dict[str, Service],
    before: dict[str, Any],
    started: float,
    sender: Sender,
) -> dict[str, Any]:
    children = _children_map()
    point: dict[str, Any] = {
        "t": round(time.monotonic() - started, 1),
        "resources_acknowledged": sender.resources,
        "rss_mb": {},
        "lag_messages": {},
    }
    for name, service in services.items():
        if service.proc is None or service.proc.poll() is not None:
            point["rss_mb"][name] = None
            point.setdefault("died", []).append(name)
            continue
        tree = descendants(service.proc.pid, children)
        point["rss_mb"][name] = round(sum(rss_bytes(p) or 0 for p in tree) / 2**20, 1)
        scraped = service.scrape()
        point["lag_messages"][name] = lag(scraped)
        if name == "api":
            for key, family, labels in (
                ("answer_p99_s", "concierge_answer_duration_seconds", {}),
                ("fhir_post_p99_s", "concierge_http_request_duration_seconds",
                 {"route": "/fhir", "method": "POST"}),
            ):  # fmt: skip
                now = histogram(scraped, family, **labels)
                window = delta(now, histogram(before.get(name, {}), family, **labels))
                point[key] = percentile_from_buckets(window, 0.99)
                point[key.replace("p99_s", "count")] = window.get(float("inf"), 0.0)
        before[name] = scraped
    print(f"soak: {point['t']:6.0f} s {point['resources_acknowledged']} resources "
          f"rss {point['rss_mb']} lag {point['lag_messages']} "
          f"answer p99 {point.get('answer_p99_s')}", file=sys.stderr)  # fmt: skip
    return point


def verdict(
    options: argparse.Namespace,
    series: list[dict[str, Any]],
    sender: Sender,
    asked: dict[int, int],
    load_seconds: float,
    drained: float | None,
    root: Path,
    prefix: str,
) -> dict[str, Any]:
    third = max(1, len(series) // 3)
    first, last = series[:third], series[-third:]
    rate = sender.resources / load_seconds if load_seconds else 0.0
    bounds: dict[str, Any] = {}
    bounds["rate"] = {"reached": round(rate, 1), "wanted": options.rate,
                      "ok": rate >= 0.9 * options.rate}  # fmt: skip
    p99s = [p["answer_p99_s"] for p in series if p.get("answer_p99_s") is not None]
    bounds["answer_p99"] = {"max_s": max(p99s) if p99s else None,
                            "bound_s": options.max_answer_p99,
                            "ok": bool(p99s) and max(p99s) <= options.max_answer_p99}  # fmt: skip
    for name in SERVICES:
        lag_first = max((p["lag_messages"].get(name, 0) for p in first), default=0)
        lag_last = max((p["lag_messages"].get(name, 0) for p in last), default=0)
        rss_first = max((p["rss_mb"].get(name) or 0 for p in first), default=0)
        rss_last = max((p["rss_mb"].get(name) or 0 for p in last), default=0)
        bounds[f"{name}_lag"] = {"first_third_max": lag_first, "last_third_max": lag_last,
                                 "ok": lag_last <= 2 * lag_first + options.rate}  # fmt: skip
        bounds[f"{name}_rss"] = {"first_third_max_mb": rss_first, "last_third_max_mb": rss_last,
                                 "ok": 0 < rss_last <= 1.5 * rss_first + 64}  # fmt: skip
    bounds["drained"] = {"seconds": drained, "bound_s": options.drain_seconds,
                         "ok": drained is not None}  # fmt: skip
    died = sorted({n for p in series for n in p.get("died", [])})
    bounds["nothing_died"] = {"died": died, "ok": not died}
    ok = all(b["ok"] for b in bounds.values())
    return {
        "minutes": options.minutes,
        "rate_wanted": options.rate,
        "load_seconds": round(load_seconds, 1),
        "resources_acknowledged": sender.resources,
        "fhir_statuses": {str(k): v for k, v in sorted(sender.statuses.items())},
        "ask_statuses": {str(k): v for k, v in sorted(asked.items())},
        "bounds": bounds,
        "ok": ok,
        "series": series,
        "logs": str(root),
        "topic_prefix": prefix,
        "load_average": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="FHIR resources a second")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--senders", type=int, default=8, help="concurrent POSTs")
    parser.add_argument("--patients", type=int, default=400, help="generated patients cloned")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ask-every", type=float, default=1.0, help="seconds between asks")
    parser.add_argument("--max-answer-p99", type=float, default=2.5, help="seconds")
    parser.add_argument("--drain-seconds", type=float, default=120.0)
    parser.add_argument("--home", default="", help="where the services' homes and logs go")
    parser.add_argument("--out", default="soak_load", help="result name under results/")
    options = parser.parse_args()
    found = run(options)
    # the worker's memory bound is its state cache: say which one the services ran with
    cache = os.environ.get("CONCIERGE_STREAM_STATE_CACHE_PATIENTS")
    command = "python -m benchmarks.bench_soak " + " ".join(sys.argv[1:])
    if cache is not None:
        command = f"CONCIERGE_STREAM_STATE_CACHE_PATIENTS={cache} {command}"
    result = write_result(
        options.out,
        found["bounds"]["answer_p99"]["max_s"] or 0.0,
        "seconds (answer p99, worst 10 s interval)",
        options.max_answer_p99,  # the bound: ratio under 1 is within it
        {"minutes": options.minutes, "rate": options.rate, "interval_s": options.interval,
         "senders": options.senders,
         "worker_state_cache_patients": int(cache) if cache is not None else 50_000},
        command,
        found,
        higher_is_better=False,
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("name", "value", "unit")} | {"ok": found["ok"]}))
    return 0 if found["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
