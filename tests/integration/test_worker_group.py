"""Several workers in one consumer group on the real broker (issue 15, item 2).

Three workers share the six partitions; under load one is killed with SIGKILL and later
restarted, and a fourth joins. After catch-up the live cohort on the cohort topic and the device
contributions on their topic equal the batch fold of the facts topic (the chaos suite's oracle,
``tests/chaos/oracle.py``), every partition is held by exactly one worker, and every worker says
ready. Checkpoints are written every second, so restarts and rebalances load them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from concierge.commands.generate import bundle
from core.settings import Settings
from feasibility.criteria import parse_question
from feasibility.saved import SavedQuestions, TrialCreate
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import KafkaSink
from fhir_adapters.synthetic.generator import iter_patients, iter_reference_resources
from infra.topics import COHORT, DEVICES, FACTS, TRIALS
from tests.chaos.oracle import (
    Truth,
    cohort_on_topic,
    device_contributions_on_topic,
    device_counters_on_topic,
)

from .surveillance_stack import config
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "criteria"
TRIAL = "group-t2dm"


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:ehr",
    )


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    made: list[WorkerProcess] = []
    for name in "abcd":
        proc = WorkerProcess(
            settings.kafka_bootstrap_servers,
            settings.topic_prefix,
            tmp_path / f"worker-{name}",
            tmp_path / f"worker-{name}.log",
        )
        proc.env["CONCIERGE_STREAM_TRIAL_SYNC_SECONDS"] = "0.5"
        proc.env["CONCIERGE_STREAM_CHECKPOINT_SECONDS"] = "1"
        made.append(proc)
    yield made
    for proc in made:
        proc.stop()


def held(worker: WorkerProcess) -> list[int] | None:
    try:
        return list(worker.get("/health")["partitions"])
    except httpx.HTTPError:
        return None


def ready(worker: WorkerProcess) -> bool:
    try:
        return httpx.get(f"{worker.url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(predicate: Any, timeout: float, what: str, workers: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last is True:
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {w.log_path.name}\n{w.tail(15)}" for w in workers if w.proc)
    raise AssertionError(f"timed out waiting for {what}; last: {last}\n{tails}")


def test_three_workers_share_partitions_through_a_sigkill_and_a_join(
    settings: Settings, workers: list[WorkerProcess]
) -> None:
    criteria = json.loads((EXAMPLES / "t2dm-sglt2.json").read_text())
    criteria["index_date"] = "2026-01-01"
    question = parse_question(criteria)
    generator = config(patients=1500, seed=3)
    patients = list(iter_patients(generator))
    ingestor = build_ingestor(
        settings, sink=KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix)
    )
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(generator))), "reference")
    for record in patients[:500]:
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()
    saved = SavedQuestions(settings.kafka_bootstrap_servers, settings.topic(TRIALS)).start()
    try:
        saved.register(TrialCreate(id=TRIAL, title="group test", criteria=question), "Acme Pharma")
    finally:
        saved.stop()

    a, b, c, d = workers
    for worker in (a, b, c):
        worker.start()

    def shared_by(members: list[WorkerProcess]) -> Any:
        holdings = [held(w) for w in members]
        if any(h is None for h in holdings):
            return holdings
        flat = sorted(p for h in holdings for p in h or [])
        return True if flat == list(range(6)) and all(holdings) else holdings

    wait_for(lambda: shared_by([a, b, c]), 120, "three workers to share six partitions", workers)

    done = threading.Event()

    def produce() -> None:
        for index, record in enumerate(patients[500:]):
            ingestor.ingest_bundle(bundle(record), "test")
            if index % 40 == 0:
                ingestor.commit()
                time.sleep(0.1)
        ingestor.commit()
        done.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    b.wait_until(lambda h: h["messages"] > 50, timeout=60, path="/health")
    b.kill()
    assert not done.is_set(), "the load finished before the kill: not under load"
    # the survivors take the dead worker's partitions when its session ends
    wait_for(lambda: shared_by([a, c]), 90, "two survivors to hold all partitions", workers)
    b.start()
    d.start()
    thread.join(240)
    assert done.is_set()
    ingestor.vault.close()

    everyone = [a, b, c, d]
    wait_for(lambda: shared_by(everyone), 120, "four workers to share the partitions", workers)
    wait_for(lambda: all(ready(w) for w in everyone) or None, 180, "all ready", workers)

    truth = Truth.read(settings.kafka_bootstrap_servers, settings.topic(FACTS))
    members = truth.cohort(question, datetime.now(UTC))
    assert members, "an empty cohort proves nothing"
    contributions = truth.contributions()
    assert contributions, "no device contributions prove nothing"

    def cohort_equals_batch() -> Any:
        got = cohort_on_topic(settings.kafka_bootstrap_servers, settings.topic(COHORT), TRIAL, 1)
        return True if got == set(members) else (len(got), len(members))

    def devices_equal_batch() -> Any:
        topic = settings.topic(DEVICES)
        published = {
            p: c
            for p, c in device_contributions_on_topic(
                settings.kafka_bootstrap_servers, topic
            ).items()
            if c
        }
        if published != contributions:
            differ = sorted(set(published) ^ set(contributions))
            return (len(published), len(contributions), differ[:5])
        counters = device_counters_on_topic(settings.kafka_bootstrap_servers, topic)
        return True if counters == truth.counters() else "counters differ"

    wait_for(cohort_equals_batch, 120, "the live cohort to equal the batch fold", workers)
    wait_for(devices_equal_batch, 120, "device contributions to equal the batch fold", workers)

    # each worker's state covers exactly its partitions, folded to the topic's end
    for worker in everyone:
        body = worker.wait_until(lambda b: b.get("ready") is True, 60, path="/readyz")
        assert body["ready"] is True, body
    # the restarted and the added worker took partitions over from others' processing; what
    # each recovery read (from a checkpoint or from offset 0) is on /readyz
    recoveries = [
        r
        for w in (b, d)
        for r in w.wait_until(lambda b: b.get("ready") is True, 60, path="/readyz")["rebuilds"]
    ]
    assert recoveries, "the restarted and the added worker recovered no partition"
    assert all(r["checkpoint"] in ("loaded", "no checkpoint") for r in recoveries), recoveries
