"""Live-count freshness: from a FHIR resource accepted at the REST endpoint to the changed count
of a saved question visible in the API, under a sustained background load.

Set-up: a real worker and a real API process on the broker; a saved question that only probe
resources can satisfy (a diagnosis no generated patient has); background senders POST whole
generated patients (Bundles) at ``--rate`` resources/s. Every ``--interval`` seconds a probe
POSTs one Condition that brings one more probe patient into the cohort; its latency is the time
from the 201 answer to the API's live count (admin operations view) showing it.

Baseline, same run: the time from the same 201 to the probe's envelope reaching a plain Kafka
consumer of the facts topic, i.e. the floor set by the adapter's publish and the broker.

    python -m benchmarks.bench_freshness --rate 1000 --probes 200
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from benchmarks.bench_stream import free_port
from benchmarks.common import write_result
from concierge.commands.generate import bundle
from core.auth import issue
from core.contracts.facts import envelopes_of
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from infra.topics import FACTS
from infra.topics_admin import ensure_topics

PROBE_CODE = "Z99.9"
KEY = "bench-token-key-0123456789abcdef"


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(what)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class KafkaWatch(threading.Thread):
    """A plain consumer of the facts topic noting when each probe's envelope arrives."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        config = {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10}  # fmt: skip
        self.consumer = Consumer(config)
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in partitions])
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for message in self.consumer.consume(1000, timeout=0.05):
                if message.error() is not None or message.value() is None:
                    continue
                now = time.monotonic()
                for envelope in envelopes_of(message.value()):
                    rid = (envelope.get("provenance") or {}).get("resource_id", "")  # type: ignore[union-attr]
                    if isinstance(rid, str) and rid.startswith("probe-"):
                        self.seen.setdefault(rid, now)
        self.consumer.close()


class BackgroundLoad:
    """Senders POSTing whole generated patients (Bundles) to ``/fhir`` at ``rate`` resources/s
    in all, from ``senders`` threads; :meth:`stop` returns the rate achieved."""

    def __init__(
        self, base: str, people: Any, rate: float, senders: int, headers: dict[str, str]
    ) -> None:
        self.base, self.people, self.rate, self.headers = base, people, rate, headers
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(senders)]
        self.started = 0.0

    def start(self) -> BackgroundLoad:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _send(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self._stop.is_set():
                with self._lock:
                    record = next(self.people)
                client.post("/fhir", content=orjson.dumps(bundle(record)), headers=self.headers)
                with self._lock:
                    self.sent += len(record)
                    ahead = self.sent / self.rate - (time.monotonic() - self.started)
                if ahead > 0:
                    time.sleep(ahead)

    def stop(self) -> float:
        self._stop.set()
        return self.sent / (time.monotonic() - self.started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="background resources/s")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--senders", type=int, default=3)
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    prefix = f"bench-fresh-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    home = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    api_port, worker_port = free_port(), free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
           "CONCIERGE_HOME": str(home), "CONCIERGE_API_PORT": str(api_port),
           "CONCIERGE_WORKER_WEB_PORT": str(worker_port), "CONCIERGE_TOKEN_KEY": KEY}  # fmt: skip
    worker = spawn([sys.executable, "-m", "concierge", "worker"], env, home / "worker.log")
    api = spawn([sys.executable, "-m", "concierge", "api"], env, home / "api.log")
    base = f"http://127.0.0.1:{api_port}"
    admin = {"Authorization": f"Bearer {issue(KEY.encode(), 'admin', 'site')}"}
    sponsor = {"Authorization": f"Bearer {issue(KEY.encode(), 'sponsor', 'bench')}"}
    source = issue(KEY.encode(), "source", "bench-ehr", source_system="urn:bench:ehr")
    fhir = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {source}"}
    try:
        wait(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 120, "API")
        config = GeneratorConfig(patients=200_000, seed=5, as_of=date.today())
        reference = bundle(list(iter_reference_resources(config)))
        httpx.post(f"{base}/fhir", content=orjson.dumps(reference), headers=fhir, timeout=60)
        people = iter_patients(config)
        probes = [next(people)[0] for _ in range(options.probes)]  # adult or not: Patient only
        httpx.post(f"{base}/fhir", content=orjson.dumps(bundle(probes)), headers=fhir,
                   timeout=120).raise_for_status()  # fmt: skip
        trial = {"id": "bench-freshness", "title": "Probe cohort", "criteria": {
            "inclusion": [{"type": "condition",
                           "codes": [{"system": "icd10", "code": PROBE_CODE}]}]}}  # fmt: skip
        httpx.post(f"{base}/v1/feasibility/saved-questions", json=trial, headers=sponsor,
                   timeout=30).raise_for_status()  # fmt: skip
        worker_url = f"http://127.0.0.1:{worker_port}/health"
        wait(lambda: httpx.get(worker_url, timeout=2).json()["trials"] >= 6, 120, "trial")
        live = f"{base}/v1/admin/saved-questions/bench-freshness/live"
        watch = KafkaWatch(bootstrap, prefix + FACTS)
        watch.start()

        load = BackgroundLoad(base, people, options.rate, options.senders, fhir).start()
        time.sleep(3)  # let the load settle
        ours: list[float] = []
        floor: list[float] = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for i, patient in enumerate(probes):
                condition = {
                    "resourceType": "Condition", "id": f"probe-{i}",
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},  # noqa: E501
                    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": PROBE_CODE}]},  # noqa: E501
                    "subject": {"reference": f"Patient/{patient['id']}"},
                    "onsetDateTime": "2020-01-01T00:00:00+00:00",
                }  # fmt: skip
                response = client.put(f"/fhir/Condition/probe-{i}", content=orjson.dumps(condition),
                                      headers=fhir)  # fmt: skip
                accepted = time.monotonic()
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"probe rejected: {response.status_code} {response.text}")
                while client.get(live, headers=admin).json()["members"] < i + 1:
                    if time.monotonic() - accepted > 30:
                        raise TimeoutError(f"probe {i} never became visible")
                    time.sleep(0.005)
                ours.append(time.monotonic() - accepted)
                arrived = watch.seen.get(f"probe-{i}")
                if arrived is not None:
                    floor.append(max(0.0, arrived - accepted))
                time.sleep(options.interval)
        achieved = load.stop()
        watch.stop.set()
        p99, base99 = percentile(ours, 0.99), percentile(floor, 0.99)
        parameters = {"target_rate": options.rate, "achieved_rate": round(achieved, 1),
                      "probes": len(ours), "senders": options.senders}  # fmt: skip
        extra = {"p50": statistics.median(ours), "p95": percentile(ours, 0.95), "p99": p99,
                 "max": max(ours), "baseline_p50": statistics.median(floor),
                 "baseline_p99": base99, "target_p99": 1.0}  # fmt: skip
        result = write_result("freshness_live_count_p99", p99, "seconds", base99, parameters,
                              "python -m benchmarks.bench_freshness " + " ".join(sys.argv[1:]),
                              extra, higher_is_better=False)  # fmt: skip
        print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}
                         | {"achieved_rate": round(achieved, 1), "p50": extra["p50"]}))  # fmt: skip
    finally:
        for proc in (worker, api):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
