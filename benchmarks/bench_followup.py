"""Safety-event latency: from a serious AdverseEvent accepted at ``/fhir`` to its notification
queued in the outbox for the trial's safety contact, under a sustained background load.

Set-up: a real API process and a real ``concierge followup`` process on the broker, sharing the
recruitment database (SQLite under the run's home). Probe patients are enrolled in a trial with
a follow-up plan (a serious adverse event notifies its safety contact by e-mail) and have a
follow-up Consent. Background senders POST whole generated patients (Bundles) at ``--rate``
resources/s. Every ``--interval`` seconds a probe PUTs one serious AdverseEvent of one probe
patient; its latency is the time from the 2xx answer to the outbox row of its notification
being committed (the whole chain: adapter, facts topic, follow-up consumer, consent and
enrolment check, outcome evaluation, outbox). Delivery of the row (SMTP or webhook) is the
recruitment dispatcher's, every ``CONCIERGE_RECRUITMENT_DISPATCH_INTERVAL_SECONDS``, and is not
in the figure.

Baseline, same run: the time from the same answer to the probe's envelope reaching a plain
Kafka consumer of the facts topic.

``--load fhir`` (the default) sends the background through the API's ``/fhir``; ``--load bulk``
sends it as Bulk Data NDJSON through the same adapters (validation, pseudonyms, the facts
topic) in a process of its own, as ``concierge ingest`` does for a bulk export. The follow-up
service sees the same facts stream either way; on this 2-core machine the API with every other
process beside it cannot take 1,000 resources/s, so the bulk path is how the issue's load is
reached here (``achieved_rate`` says what was).

    python -m benchmarks.bench_followup --rate 1000 --probes 200 --load bulk
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from benchmarks.bench_freshness import BackgroundLoad, KafkaWatch, percentile, spawn, wait
from benchmarks.bench_stream import free_port
from benchmarks.common import write_result
from concierge.commands.generate import bundle
from core.auth import issue
from core.db import make_engine, make_sessionmaker
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from followup.db import upgrade
from followup.plans import Plan
from followup.service import FollowupService
from followup.tables import FollowupConsent
from infra.topics import FACTS
from infra.topics_admin import ensure_topics
from recruitment.models import Candidate, Invitation, OutboxMessage, Trial

KEY = "bench-token-key-0123456789abcdef"
SECRET = "bench-follow-up-secret-0123456789abcdef"
SOURCE = "urn:bench:ehr"
TRIAL = "BENCH-FU"
FHIR = {
    "Content-Type": "application/fhir+json",
    "Authorization": f"Bearer {issue(KEY.encode(), 'source', 'bench-ehr', source_system=SOURCE)}",
}
PLAN = Plan.model_validate(
    {
        "scope": ["condition", "observation", "adverse_event", "death"],
        "outcomes": [{"name": "SAE", "kind": "serious_adverse_event"}],
        "safety_contact": {"channel": "email", "address": "safety@bench.example"},
    }
)


def consent(pid: str) -> dict[str, object]:
    return {
        "resourceType": "Consent",
        "id": f"fu-{pid}",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2026-01-02T00:00:00Z",
        "provision": {
            "type": "permit",
            "data": [{"meaning": "related", "reference": {"reference": f"ResearchStudy/{TRIAL}"}}],
        },
    }


def serious(i: int, pid: str) -> dict[str, object]:
    return {
        "resourceType": "AdverseEvent",
        "id": f"probe-{i}",
        "actuality": "actual",
        "event": {"coding": [{"system": "http://snomed.info/sct", "code": "62315008"}]},
        "seriousness": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                    "code": "serious",
                }
            ]
        },
        "subject": {"reference": f"Patient/{pid}"},
        "date": datetime.now(UTC).isoformat(),
    }


def enrol(sessions: sa.orm.sessionmaker[sa.orm.Session], patients: list[str]) -> None:
    now = datetime.now(UTC)
    with sessions.begin() as session:
        session.add(Trial(id=TRIAL, version=1, title=TRIAL, sponsor="bench", status="active",
                          target=None, registered_at=now, updated_at=now))  # fmt: skip
        session.flush()
        for n, patient in enumerate(patients):
            candidate = Candidate(id=str(uuid.uuid4()), trial_id=TRIAL, patient=patient,
                                  site="RA3", status="closed", routed_to=None, routing_via=None,
                                  routing_reason=None, held_reasons=[], arrival=n,
                                  created_at=now, updated_at=now)  # fmt: skip
            session.add(candidate)
            session.flush()
            session.add(Invitation(id=str(uuid.uuid4()), candidate_id=candidate.id,
                                   trial_id=TRIAL, patient=patient, site="RA3",
                                   practitioner=f"{SOURCE}|Practitioner|bench", state="enrolled",
                                   active=False, created_at=now, state_changed_at=now,
                                   contacted_at=now, closed_at=now))  # fmt: skip


def bulk_load(rate: float, stop: Any, sent: Any, env: dict[str, str]) -> None:
    """Background patients as Bulk NDJSON through the adapters at ``rate`` resources/s until
    ``stop`` is set (a process of its own, its own vault: the API's SQLite vault is not shared);
    ``sent`` counts the resources published."""
    os.environ.update(env)
    from core.settings import Settings
    from fhir_adapters.service import build_ingestor

    settings = Settings()
    ingestor = build_ingestor(settings, source="urn:bench:bulk")
    config = GeneratorConfig(patients=200_000, seed=6, as_of=date.today())
    started, published, batch = time.monotonic(), 0, 0
    for record in iter_patients(config):
        if stop.is_set():
            break
        lines = [orjson.dumps(resource) for resource in record]
        # the outcomes are not looked at: reading the generator is what ingests
        collections.deque(ingestor.ingest_ndjson_lines(lines, "bulk.ndjson"), maxlen=0)
        published += len(lines)
        batch += len(lines)
        if batch >= 200:  # durable in batches, as a bulk import commits
            ingestor.commit()
            sent.value, batch = published, 0
        ahead = published / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    ingestor.commit()
    sent.value = published


class BulkLoad:
    """:func:`bulk_load` in a process of its own; :meth:`stop` returns the rate achieved."""

    def __init__(self, rate: float, env: dict[str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop_event = context.Event()
        self.sent = context.Value("q", 0)
        self.process = context.Process(
            target=bulk_load, args=(rate, self.stop_event, self.sent, env), daemon=True
        )
        self.started = 0.0

    def start(self) -> BulkLoad:
        self.process.start()
        self.started = time.monotonic()
        return self

    def stop(self) -> float:
        elapsed = time.monotonic() - self.started
        sent = self.sent.value
        self.stop_event.set()
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
        return float(sent / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="background resources/s")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument(
        "--load", choices=["fhir", "bulk"], default="fhir", help="the background's path in"
    )
    options = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    prefix = f"bench-followup-{uuid.uuid4().hex[:6]}."
    ensure_topics(bootstrap, prefix)
    home = Path(tempfile.mkdtemp(prefix="bench-followup-"))
    url = f"sqlite:///{home / 'recruitment.sqlite'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    FollowupService(sessions).put_plan(TRIAL, PLAN, "bench")
    api_port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "CONCIERGE_TOPIC_PREFIX": prefix,
           "CONCIERGE_HOME": str(home), "CONCIERGE_API_PORT": str(api_port),
           "CONCIERGE_TOKEN_KEY": KEY, "CONCIERGE_RECRUITMENT_URL": url,
           "CONCIERGE_FEASIBILITY_FEED": "false", "CONCIERGE_FOLLOWUP_SECRET": SECRET,
           "CONCIERGE_FOLLOWUP_STATUS_PORT": "0"}  # fmt: skip
    api = spawn([sys.executable, "-m", "concierge", "api"], env, home / "api.log")
    followup = spawn([sys.executable, "-m", "concierge", "followup"], env, home / "followup.log")
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 300, "API")
        config = GeneratorConfig(patients=200_000, seed=5, as_of=date.today())
        reference = bundle(list(iter_reference_resources(config)))
        httpx.post(f"{base}/fhir", content=orjson.dumps(reference), headers=FHIR, timeout=60)
        probe_config = GeneratorConfig(patients=options.probes, seed=11, as_of=date.today())
        probes = []
        for resources in iter_patients(probe_config):
            person = next(r for r in resources if r["resourceType"] == "Patient")
            person = {**person, "id": f"probe-patient-{len(probes)}"}
            probes.append(person["id"])
            body = bundle([person, consent(person["id"])])
            httpx.post(f"{base}/fhir", content=orjson.dumps(body), headers=FHIR,
                       timeout=60).raise_for_status()  # fmt: skip

        def consents() -> dict[str, str]:
            with sessions() as session:
                rows = session.execute(sa.select(FollowupConsent.key, FollowupConsent.patient))
                return {k.rsplit("|", 1)[1].removeprefix("fu-"): p for k, p in rows}

        wait(lambda: len(consents()) >= len(probes), 300, "probe consents read by follow-up")
        pseudonyms = consents()
        enrol(sessions, [pseudonyms[p] for p in probes])
        watch = KafkaWatch(bootstrap, prefix + FACTS)
        watch.start()
        people = iter_patients(config)
        load: BackgroundLoad | BulkLoad
        if options.load == "bulk":
            bulk_env = {**env, "CONCIERGE_HOME": str(home / "bulk")}
            load = BulkLoad(options.rate, bulk_env).start()
        else:
            load = BackgroundLoad(base, people, options.rate, options.senders, FHIR).start()
        time.sleep(3)  # let the load settle
        ours: list[float] = []
        floor: list[float] = []
        retried = 0
        with httpx.Client(base_url=base, timeout=30) as client:
            for i in range(options.probes):
                pid = probes[i % len(probes)]
                body = orjson.dumps(serious(i, pid))
                for _attempt in range(10):  # a loaded ingestor answers 503: the probe retries
                    response = client.put(
                        f"/fhir/AdverseEvent/probe-{i}", content=body, headers=FHIR
                    )
                    if response.status_code != 503:
                        break
                    retried += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                accepted = time.monotonic()
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"probe rejected: {response.status_code} {response.text}")
                wanted = f"safety:{TRIAL}|SAE|{SOURCE}|AdverseEvent|probe-{i}"
                while True:
                    with sessions() as session:
                        found = session.scalar(
                            sa.select(OutboxMessage.id).where(OutboxMessage.dedupe_key == wanted)
                        )
                    if found is not None:
                        break
                    if time.monotonic() - accepted > 60:
                        raise TimeoutError(f"probe {i} was never notified")
                    time.sleep(0.005)
                ours.append(time.monotonic() - accepted)
                arrived = watch.seen.get(f"probe-{i}")
                if arrived is not None:
                    floor.append(max(0.0, arrived - accepted))
                time.sleep(options.interval)
        achieved = load.stop()
        watch.stop.set()
        with sessions() as session:
            queued = session.scalar(
                sa.select(sa.func.count()).select_from(OutboxMessage)
                .where(OutboxMessage.kind == "safety")
            )  # fmt: skip
        p99, base99 = percentile(ours, 0.99), percentile(floor, 0.99)
        load_average = os.getloadavg()
        parameters = {"target_rate": options.rate, "achieved_rate": round(achieved, 1),
                      "load_path": options.load,
                      "probes": len(ours), "senders": options.senders,
                      "notifications_queued": queued, "probe_retries_503": retried,
                      "load_average_1_5_15": [round(x, 2) for x in load_average]}  # fmt: skip
        extra = {"p50": statistics.median(ours), "p95": percentile(ours, 0.95), "p99": p99,
                 "max": max(ours), "baseline_p50": statistics.median(floor),
                 "baseline_p99": base99, "baseline_samples": len(floor)}  # fmt: skip
        command = "python -m benchmarks.bench_followup " + " ".join(sys.argv[1:])
        # one figure per load path: the bulk path reaches the issue's 1,000 resources/s here
        name = "followup_safety_event_p99" + ("" if options.load == "bulk" else "_fhir")
        result = write_result(name, p99, "seconds", base99,
                              parameters, command, extra, higher_is_better=False)  # fmt: skip
        print(json.dumps({k: result[k] for k in ("name", "value", "unit", "baseline", "ratio")}
                         | {"achieved_rate": round(achieved, 1), "p50": extra["p50"],
                            "load_average": load_average}))  # fmt: skip
    finally:
        for proc in (api, followup):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
