"""Standby checkpoints and failover on the real broker (issue 15, item 1).

Two workers with ``CONCIERGE_STREAM_STANDBY`` on share the six partitions; each keeps standby
checkpoints of the other's. Under load one is killed with SIGKILL: the survivor takes its
partitions and recovers each from its standby checkpoint (``/readyz`` says the recovery started
from a checkpoint at an offset above 0, the one the standby wrote), and after catch-up the live
cohort and the device contributions equal the batch fold of the facts topic.
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
from .test_worker_group import held, ready, wait_for
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "criteria"
TRIAL = "standby-t2dm"


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
    for name in "ab":
        proc = WorkerProcess(
            settings.kafka_bootstrap_servers,
            settings.topic_prefix,
            tmp_path / f"worker-{name}",
            tmp_path / f"worker-{name}.log",
        )
        proc.env["CONCIERGE_STREAM_TRIAL_SYNC_SECONDS"] = "0.5"
        proc.env["CONCIERGE_STREAM_CHECKPOINT_SECONDS"] = "1"
        proc.env["CONCIERGE_STREAM_STANDBY"] = "true"
        made.append(proc)
    yield made
    for proc in made:
        proc.stop()


def standby_of(worker: WorkerProcess) -> dict[str, Any]:
    standby = worker.get("/health")["standby"]
    assert standby is not None, "standby is on but /health shows none"
    partitions: dict[str, Any] = standby["partitions"]
    return partitions


def test_failover_recovers_from_standby_checkpoints(
    settings: Settings, workers: list[WorkerProcess]
) -> None:
    criteria = json.loads((EXAMPLES / "t2dm-sglt2.json").read_text())
    criteria["index_date"] = "2026-01-01"
    question = parse_question(criteria)
    generator = config(patients=1200, seed=5)
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
        saved.register(
            TrialCreate(id=TRIAL, title="standby test", criteria=question), "Acme Pharma"
        )
    finally:
        saved.stop()

    a, b = workers
    a.start()
    b.start()

    def shared() -> Any:
        holdings = [held(w) for w in (a, b)]
        if any(not h for h in holdings):
            return holdings
        flat = sorted(p for h in holdings for p in h or [])
        return True if flat == list(range(6)) else holdings

    wait_for(shared, 120, "two workers to share six partitions", workers)
    wait_for(lambda: all(ready(w) for w in (a, b)) or None, 120, "both ready", workers)
    owned_by_b = set(held(b) or [])

    def a_has_standbys() -> Any:
        # a keeps a written standby checkpoint of every partition b owns
        standby = standby_of(a)
        have = {int(p) for p, s in standby.items() if s["checkpoint"]}
        return True if owned_by_b <= have else standby

    wait_for(a_has_standbys, 90, "standby checkpoints of b's partitions on a", workers)
    # /metrics has the standby lag of each followed partition
    scraped = httpx.get(f"{a.url}/metrics", timeout=5).text
    for partition in owned_by_b:
        assert f'concierge_standby_lag_messages{{partition="{partition}",service="worker"}}' in (
            scraped
        ), scraped
    # a follows exactly the partitions it does not own
    assert {int(p) for p in standby_of(a)} == owned_by_b
    assert not set(standby_of(b)) & {str(p) for p in held(b) or []}

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
    messages = b.get("/health")["messages"]
    b.wait_until(lambda h: h["messages"] > messages + 50, timeout=60, path="/health")
    # the standby kept up under load: a checkpoint of b's partitions past where they stood
    before_kill = {int(p): s["checkpoint"] for p, s in standby_of(a).items()}
    b.kill()
    assert not done.is_set(), "the load finished before the kill: not under load"
    wait_for(lambda: held(a) == list(range(6)) or held(a), 90, "a to hold all partitions", workers)
    thread.join(240)
    assert done.is_set()
    ingestor.vault.close()
    body = a.wait_until(lambda r: r.get("ready") is True, 180, path="/readyz")

    # each partition a took over was recovered from its standby checkpoint, not from offset 0
    latest: dict[int, dict[str, Any]] = {}
    for rebuild in body["rebuilds"]:
        latest[rebuild["partition"]] = rebuild
    for partition in owned_by_b:
        rebuild = latest[partition]
        assert rebuild["checkpoint"] == "loaded", rebuild
        assert rebuild["standby"] is not None and rebuild["standby"] > 0, rebuild
        assert rebuild["from"] == rebuild["standby"], rebuild
        assert rebuild["from"] >= before_kill[partition], (rebuild, before_kill)
        assert rebuild["to"] >= rebuild["from"], rebuild
    # a owns every partition now, so it follows none
    assert standby_of(a) == {}

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

    # the state a recovered from standbys equals the state folded from the topic
    digest = a.get("/state/digest")
    assert digest == truth_digest(settings), "the survivor's state differs from the batch fold"


def truth_digest(settings: Settings) -> dict[str, Any]:
    """The digest of the whole facts topic folded from offset 0 (the worker's own fold)."""
    from surveillance_stream import patient_state
    from surveillance_stream.store import PatientStore, canonical, read_partition

    store = PatientStore()
    for partition in range(6):
        patients, _read, _end = read_partition(
            settings.kafka_bootstrap_servers, settings.topic(FACTS), partition
        )
        store.install(partition, patients)
    items = (
        (patient_state.state_key(patient, key), canonical(entry))
        for partition in store.partitions
        for patient, entries in store.partitions[partition].items()
        for key, entry in entries.items()
    )
    return patient_state.digest(items)
