"""Signal freshness: from a FHIR AdverseEvent accepted at the REST endpoint to the updated
statistic of its device visible in the regulator API, under a sustained background load.

Set-up: a real worker and a real API process (with the signal monitor) on the broker. Probe
patients carry a hip implant of a model no generated patient has ("BenchCo ProbeModel"), and no
adverse events. Background senders POST whole generated patients (Bundles) at ``--rate``
resources/s. Every ``--interval`` seconds a probe PUTs one AdverseEvent naming one probe
patient's implant; its latency is the time from the 2xx answer to
``GET /v1/surveillance/signals/{id}`` showing the model's adverse-event count one higher (the
whole chain: adapter, facts topic, worker, device-contribution topic, monitor, assessment).

Baseline, same run: the time from the same answer to the probe's envelope reaching a plain Kafka
consumer of the facts topic (the floor set by the adapter's publish and the broker).

    python -m benchmarks.bench_signal_freshness --rate 1000 --probes 200
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_freshness import BackgroundLoad, KafkaWatch, percentile, spawn, wait
from benchmarks.bench_stream import free_port
from benchmarks.common import write_result
from concierge.commands.generate import bundle
from core.auth import issue
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from infra.topics import FACTS
from infra.topics_admin import ensure_topics
from surveillance_stream.devices import node_path
from surveillance_stream.signals import signal_id

KEY = "bench-token-key-0123456789abcdef"
MODEL, MANUFACTURER = "ProbeModel", "BenchCo"
NODE = node_path("hip", MANUFACTURER, MODEL)
SIGNAL = signal_id(NODE, "adverse event")
FHIR = {
    "Content-Type": "application/fhir+json",
    "Authorization": f"Bearer {issue(KEY.encode(), 'source', 'bench-ehr', source_system='urn:bench:ehr')}",  # noqa: E501
}


def probe_patients(n: int, seed: int) -> list[tuple[list[dict[str, Any]], str, str]]:
    """``n`` generated patients with one hip implant, rebadged as the probe model, stripped of
    adverse events and conditions: (resources, device id, implant date)."""
    config = GeneratorConfig(
        patients=50 * n + 1000,
        seed=seed,
        history_years=5,
        implant_rates={"hip": 1.0, "knee": 0.0, "pacemaker": 0.0, "insulin_pump": 0.0},
    )
    found: list[tuple[list[dict[str, Any]], str, str]] = []
    for resources in iter_patients(config):
        devices = [r for r in resources if r["resourceType"] == "Device"]
        if len(devices) != 1:
            continue
        kept = [
            copy.deepcopy(r)
            for r in resources
            if r["resourceType"] in ("Patient", "Device", "Procedure", "DeviceUseStatement")
        ]
        device = next(r for r in kept if r["resourceType"] == "Device")
        device["manufacturer"] = MANUFACTURER
        device["modelNumber"] = MODEL
        device["deviceName"] = [{"name": MODEL, "type": "model-name"}]
        # only the implant: a revision would end the exposure and move other counts
        kept = [r for r in kept if r["resourceType"] != "Procedure" or "performedPeriod" in r]
        implants = [r for r in kept if r["resourceType"] == "Procedure"]
        if not implants:
            continue
        started = implants[0]["performedPeriod"]["start"]
        found.append((kept, device["id"], started))
        if len(found) == n:
            return found
    raise RuntimeError(f"only {len(found)} probe patients found")


def adverse_event(i: int, patient: str, device: str, implanted: str) -> dict[str, Any]:
    day = datetime.fromisoformat(implanted) + timedelta(days=30)
    return {
        "resourceType": "AdverseEvent",
        "id": f"probe-{i}",
        "actuality": "actual",
        "event": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "T84.0"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "date": day.isoformat(),
        "suspectEntity": [{"instance": {"reference": f"Device/{device}"}}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="background resources/s")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--senders", type=int, default=3)
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    prefix = f"bench-signal-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    home = Path(tempfile.mkdtemp(prefix="bench-signal-freshness-"))
    api_port, worker_port = free_port(), free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
           "CONCIERGE_HOME": str(home), "CONCIERGE_API_PORT": str(api_port),
           "CONCIERGE_WORKER_WEB_PORT": str(worker_port), "CONCIERGE_TOKEN_KEY": KEY}  # fmt: skip
    print(f"preparing {options.probes} probe patients", file=sys.stderr)
    probes = probe_patients(options.probes, seed=7)
    worker = spawn([sys.executable, "-m", "concierge", "worker"], env, home / "worker.log")
    # the monitor inside the API, as in the demo (a cluster runs `concierge monitor`)
    api_env = {**env, "CONCIERGE_SURVEILLANCE_MONITOR": "true"}
    api = spawn([sys.executable, "-m", "concierge", "api"], api_env, home / "api.log")
    base = f"http://127.0.0.1:{api_port}"
    regulator = {"Authorization": f"Bearer {issue(KEY.encode(), 'regulator', 'bench')}"}
    # the monitor's exact patient count is for site admins (regulators see it rounded)
    admin = {"Authorization": f"Bearer {issue(KEY.encode(), 'admin', 'bench')}"}
    try:
        wait(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 120, "API")
        config = GeneratorConfig(patients=200_000, seed=5, as_of=date.today())
        reference = bundle(list(iter_reference_resources(config)))
        httpx.post(f"{base}/fhir", content=orjson.dumps(reference), headers=FHIR, timeout=60)
        everyone = [r for resources, _, _ in probes for r in resources]
        httpx.post(f"{base}/fhir", content=orjson.dumps(bundle(everyone)), headers=FHIR,
                   timeout=300).raise_for_status()  # fmt: skip
        status = f"{base}/v1/surveillance/status"
        wait(lambda: httpx.get(status, headers=admin, timeout=5).json()["patients"]
             >= len(probes), 180, "probe implants counted")  # fmt: skip
        watch = KafkaWatch(bootstrap, prefix + FACTS)
        watch.start()
        people = iter_patients(config)
        load = BackgroundLoad(base, people, options.rate, options.senders, FHIR).start()
        time.sleep(3)  # let the load settle
        ours: list[float] = []
        floor: list[float] = []
        detail = f"/v1/surveillance/signals/{SIGNAL}"
        with httpx.Client(base_url=base, timeout=30) as client:

            def observed() -> int:
                response = client.get(detail, headers=regulator)
                if response.status_code != 200:
                    return 0
                return int(response.json()["signal"].get("observed") or 0)

            for i, (resources, device, implanted) in enumerate(probes):
                patient = next(r["id"] for r in resources if r["resourceType"] == "Patient")
                body = orjson.dumps(adverse_event(i, patient, device, implanted))
                response = client.put(f"/fhir/AdverseEvent/probe-{i}", content=body, headers=FHIR)
                accepted = time.monotonic()
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"probe rejected: {response.status_code} {response.text}")
                while observed() < i + 1:
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
        monitor = httpx.get(status, headers=admin, timeout=10).json()
        p99, base99 = percentile(ours, 0.99), percentile(floor, 0.99)
        parameters = {"target_rate": options.rate, "achieved_rate": round(achieved, 1),
                      "probes": len(ours), "senders": options.senders,
                      "monitor_patients": monitor["patients"],
                      "monitor_signals": monitor["signals"]}  # fmt: skip
        extra = {"p50": statistics.median(ours), "p95": percentile(ours, 0.95), "p99": p99,
                 "max": max(ours), "baseline_p50": statistics.median(floor),
                 "baseline_p99": base99, "target_p99": 1.0,
                 "last_assessment_seconds": monitor["assessment_seconds"]}  # fmt: skip
        command = "python -m benchmarks.bench_signal_freshness " + " ".join(sys.argv[1:])
        result = write_result("freshness_signal_statistic_p99", p99, "seconds", base99,
                              parameters, command, extra, higher_is_better=False)  # fmt: skip
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
