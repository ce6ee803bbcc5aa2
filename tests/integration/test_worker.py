"""The Faust worker on the real broker: state from facts, updates, retractions, SIGKILL, and
who may read its status pages."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from core.audit import AuditLog
from core.auth import issue
from core.contracts.facts import (
    ObservationFact,
    Provenance,
    ResourceFacts,
    decode_resource_facts,
    envelopes_of,
)
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.sources import expand, ingest_file
from infra.topics import FACTS
from surveillance_stream import patient_state
from tests.faults import listening_addresses

from .test_ingest_kafka import SAMPLES, read_all
from .worker_proc import TOKEN_KEY, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:synthea",
    )


@pytest.fixture
def worker(settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = WorkerProcess(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        tmp_path / "worker-home",
        tmp_path / "worker.log",
    )
    yield proc
    proc.stop()


def expected_digest(settings: Settings) -> dict[str, object]:
    envelopes = [
        decode_resource_facts(orjson.dumps(e))
        for _, v in read_all(settings.kafka_bootstrap_servers, settings.topic(FACTS))
        for e in envelopes_of(v)
    ]
    return patient_state.digest(patient_state.fold(envelopes).items())


def test_worker_state_follows_updates_and_retractions(
    settings: Settings, worker: WorkerProcess, tmp_path: Path
) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)
    worker.start()
    ingestor = build_ingestor(settings)
    for path in expand([samples]):
        list(ingest_file(ingestor, path))
    ingestor.commit()
    want = expected_digest(settings)
    assert want["patients"] == 18
    worker.wait_until(lambda d: d == want, timeout=120)

    # A new version of an observation, an entered-in-error condition and a DELETE.
    bundle = orjson.loads((samples / "patient-p017.json").read_bytes())
    patient_ref = next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    patient_id = patient_ref.removeprefix("urn:uuid:")
    observation = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation" and "valueQuantity" in e["resource"]
    )
    condition = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition"
    )
    procedure = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Procedure"
    )
    updated = {
        **observation,
        "subject": {"reference": f"Patient/{patient_id}"},
        "meta": {"versionId": "2", "lastUpdated": "2026-01-01T00:00:00Z"},
        "valueQuantity": {**observation["valueQuantity"], "value": 999.5},
    }
    in_error = {
        **condition,
        "subject": {"reference": f"Patient/{patient_id}"},
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "entered-in-error",
                }
            ]
        },
    }
    outcomes = [
        ingestor.ingest_resource(updated, "test"),
        ingestor.ingest_resource(in_error, "test"),
        ingestor.delete("Procedure", procedure["id"], "test"),
    ]
    ingestor.commit()
    assert [o.status for o in outcomes] == ["accepted"] * 3
    assert [o.seq for o in outcomes] == [2, 2, 2]
    pseudonym = ingestor.patient_by_key(f"urn:test:synthea|Patient|{patient_id}")
    ingestor.vault.close()
    want = expected_digest(settings)
    worker.wait_until(lambda d: d == want, timeout=60)
    resources = worker.get(f"/state/patients/{pseudonym}")["resources"]
    obs = resources[f"urn:test:synthea|Observation|{observation['id']}"]
    assert obs["seq"] == 2 and obs["facts"][0]["value"] == 999.5
    cond = resources[f"urn:test:synthea|Condition|{condition['id']}"]
    assert cond["retracted"] is True and cond["facts"] == []
    proc = resources[f"urn:test:synthea|Procedure|{procedure['id']}"]
    assert proc["retracted"] is True and proc["facts"] == []


def synthetic_envelopes(count: int, seed: int) -> list[ResourceFacts]:
    """Envelopes with duplicates and out-of-order versions; content is a function of key+seq."""
    rng = random.Random(seed)
    keys = [f"urn:test|Observation|o{i}" for i in range(count // 4)]
    owner = {key: f"p-{rng.randrange(400):032x}" for key in keys}
    out = []
    for _ in range(count):
        key = rng.choice(keys)
        seq = rng.randint(1, 4)
        retracted = seq == 4 and rng.random() < 0.5
        value = (zlib.crc32(f"{key}:{seq}".encode()) % 10_000) / 10
        out.append(
            ResourceFacts(
                key=key,
                patient=owner[key],
                seq=seq,
                retracted=retracted,
                provenance=Provenance(
                    source="urn:test",
                    resource_type="Observation",
                    resource_id=key.rsplit("|", 1)[1],
                    version=str(seq),
                    ingested_at=datetime.now(UTC),
                ),
                facts=()
                if retracted
                else (ObservationFact(codes=(), status="final", value=value, unit="mmol/L"),),
            )
        )
    return out


@pytest.mark.parametrize("checkpoint_seconds", ["0", "0.2"], ids=["no-checkpoints", "checkpoints"])
def test_sigkill_mid_stream_loses_and_doubles_nothing(
    settings: Settings, worker: WorkerProcess, checkpoint_seconds: str
) -> None:
    """With checkpoints every 0.2 s per partition the kill lands among checkpoint writes
    (commit, offset check, batch write), and the restart loads what the last one left."""
    worker.env["CONCIERGE_STREAM_CHECKPOINT_SECONDS"] = checkpoint_seconds
    # a few patients per partition in memory beyond the changed ones: the others are read
    # from the checkpoint, before and after the kill
    worker.env["CONCIERGE_STREAM_STATE_CACHE_PATIENTS"] = "60"
    envelopes = synthetic_envelopes(24_000, seed=7)
    want = patient_state.digest(patient_state.fold(envelopes).items())
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    topic = settings.topic(FACTS)
    done = threading.Event()

    def produce() -> None:
        for index, envelope in enumerate(envelopes):
            producer.produce(topic, key=envelope.patient.encode(), value=envelope.to_json())
            if index % 500 == 0:
                producer.poll(0)
                # ~5k/s (~1.7k/s with a checkpoint every 0.2 s, which slows the worker): the
                # stream is still flowing when the worker dies
                time.sleep(0.1 if checkpoint_seconds == "0" else 0.3)
        producer.flush(30)
        done.set()

    worker.start()
    worker.wait_until(lambda h: h.get("ok") is True, timeout=90, path="/health")
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    worker.wait_until(lambda h: h["applied"] > 2_000, timeout=90, path="/health")
    worker.kill()
    assert not done.is_set(), "the producer finished before the kill: not mid-stream"
    worker.start()
    thread.join(60)
    assert done.is_set()
    got = worker.wait_until(lambda d: d == want, timeout=180)
    # the restarted worker committed its offsets, each after a complete flush of its
    # changelog writes, and measured that flush on its own (/health's commit_flush)
    flushed = worker.wait_until(
        lambda h: h["commit_flush"]["flushes"] > 0, timeout=30, path="/health"
    )["commit_flush"]
    assert flushed["seconds"] > 0 and flushed["longest_ms"] > 0
    assert got["entries"] == len({e.key for e in envelopes})
    if checkpoint_seconds != "0":
        rebuilds = worker.wait_until(lambda b: b.get("ready") is True, 60, path="/readyz")[
            "rebuilds"
        ]
        assert any(r["checkpoint"] == "loaded" for r in rebuilds), rebuilds


def produce_envelopes(settings: Settings, envelopes: list[ResourceFacts], pace: float) -> None:
    # idempotent: a retried batch is neither reordered nor repeated (the expected digests fold
    # the envelopes in list order)
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "linger.ms": 5,
            "enable.idempotence": True,
        }
    )
    for index, envelope in enumerate(envelopes):
        producer.produce(
            settings.topic(FACTS), key=envelope.patient.encode(), value=envelope.to_json()
        )
        if pace and index % 100 == 0:
            producer.poll(0)
            time.sleep(pace)
    producer.flush(30)


def test_a_restart_loads_the_checkpoint_and_a_foreign_one_is_refused_loudly(
    settings: Settings, worker: WorkerProcess, tmp_path: Path
) -> None:
    worker.env["CONCIERGE_STREAM_CHECKPOINT_SECONDS"] = "1"
    worker.env["CONCIERGE_STREAM_STATE_CACHE_PATIENTS"] = "60"  # most patients read lazily
    envelopes = synthetic_envelopes(12_000, seed=21)
    produce_envelopes(settings, envelopes[:6000], 0)
    worker.start()
    want = patient_state.digest(patient_state.fold(envelopes[:6000]).items())
    worker.wait_until(lambda d: d == want, timeout=120)
    # facts keep coming for a few seconds: every partition writes checkpoints
    produce_envelopes(settings, envelopes[6000:9000], 0.15)
    want = patient_state.digest(patient_state.fold(envelopes[:9000]).items())
    worker.wait_until(lambda d: d == want, timeout=120)
    written = worker.wait_until(lambda b: b.get("ready") is True, 60, path="/readyz")["checkpoints"]
    assert {c["partition"] for c in written} == set(range(6)), written

    worker.stop()
    produce_envelopes(settings, envelopes[9000:], 0)  # the tail, while the worker is down
    worker.start()
    want = patient_state.digest(patient_state.fold(envelopes).items())
    worker.wait_until(lambda d: d == want, timeout=120)
    rebuilds = worker.wait_until(lambda b: b.get("ready") is True, 60, path="/readyz")["rebuilds"]
    assert [r["checkpoint"] for r in rebuilds] == ["loaded"] * 6, rebuilds
    assert all(r["from"] > 0 for r in rebuilds), rebuilds
    # only what came after each checkpoint was read, not the whole history
    assert sum(r["envelopes"] for r in rebuilds) < 6000, rebuilds

    # a checkpoint made under another pseudonym key is refused, loudly, and the state is
    # rebuilt from offset 0
    worker.stop()
    worker.env["CONCIERGE_PSEUDONYM_KEY"] = "another-pseudonym-key-0123456789abcdef0123"
    worker.start()
    worker.wait_until(lambda d: d == want, timeout=120)
    rebuilds = worker.wait_until(lambda b: b.get("ready") is True, 60, path="/readyz")["rebuilds"]
    assert all("pseudonym key" in r["checkpoint"] and r["from"] == 0 for r in rebuilds), rebuilds
    assert "local checkpoint refused (made with another pseudonym key)" in worker.tail(200)
    # the worker runs at --loglevel warning, yet says (at INFO) what each rebuild read: Faust's
    # terminal spinner used to raise the log handler to the worker's level and swallow these
    log = worker.log_path.read_text(errors="replace")
    assert re.search(r" INFO surveillance_stream\.app: partition \d rebuilt: .* \(loaded\)", log), (
        worker.tail(60)
    )
    assert "\x1b[?25" not in log  # and no spinner escape codes in a log file


def test_no_stuck_stream_errors_for_the_changelog_topics(
    settings: Settings, worker: WorkerProcess, tmp_path: Path
) -> None:
    """Reported by the 60-minute soak: Faust's stuck-stream detector logged an ERROR for every
    cohort and device-contribution partition every few seconds from minute 5 on (15,552 lines),
    because the tables' changelog topics were declared with acks. Here its timeout is 6 s."""
    worker.env["STREAM_PROCESSING_TIMEOUT"] = "6"
    worker.start()
    ingestor = build_ingestor(settings)
    samples = tmp_path / "samples"
    shutil.copytree(SAMPLES, samples)
    for path in expand([samples]):
        list(ingest_file(ingestor, path))
    ingestor.commit()
    ingestor.vault.close()
    worker.wait_until(lambda h: h.get("applied", 0) > 0, timeout=90, path="/health")
    time.sleep(20)
    log = worker.log_path.read_text(errors="replace")
    assert "Stream has not started processing" not in log, worker.tail()
    # The trials table's changelog (Faust's own topic) exists, with the partitions of the
    # topics it is co-partitioned with, before Faust subscribes. Found in the federated demo:
    # three workers started at once on fresh prefixes, Faust created the changelog only after
    # subscribing ("Ignoring missing topic"), its consumer's metadata said 0 partitions for the
    # next minutes and the first saved question crashed the agent with PartitionsMismatch,
    # again at every control message: that node never became current.
    assert "Ignoring missing topic" not in log, worker.tail()
    assert "not found in cluster metadata" not in log, worker.tail()
    changelog = f"{settings.topic_prefix}{settings.worker_id}-trials-changelog"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = admin.list_topics(changelog, timeout=10).topics[changelog]
    assert topic.error is None and len(topic.partitions) == 6


def test_the_state_pages_need_an_admin_token_bind_loopback_and_are_audited(
    settings: Settings, worker: WorkerProcess
) -> None:
    envelopes = synthetic_envelopes(400, seed=3)
    want = patient_state.digest(patient_state.fold(envelopes).items())
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.idempotence": True}
    )
    for envelope in envelopes:
        producer.produce(
            settings.topic(FACTS), key=envelope.patient.encode(), value=envelope.to_json()
        )
    assert producer.flush(30) == 0
    worker.start()
    worker.wait_until(lambda d: d == want, timeout=120)

    # the probes answer anyone, and say nothing about patients
    health = httpx.get(f"{worker.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["ok"] is True
    ready = httpx.get(f"{worker.url}/readyz", timeout=5)
    assert ready.status_code in (200, 503)
    for probe in (health.text, ready.text):
        assert '"patients"' not in probe and "p-" not in probe

    patient = envelopes[0].patient
    key = TOKEN_KEY.encode()
    wrong_key = b"not-the-worker-s-key-0123456789abcdefghij"
    callers = {
        "anonymous": ({}, 401),
        "sponsor": ({"Authorization": f"Bearer {issue(key, 'sponsor', 'Acme')}"}, 403),
        "regulator": ({"Authorization": f"Bearer {issue(key, 'regulator', 'MHRA')}"}, 403),
        "forged admin": ({"Authorization": f"Bearer {issue(wrong_key, 'admin', 'x')}"}, 401),
    }
    pages = ["/state/digest", f"/state/patients/{patient}", "/state/cohorts", "/state/devices"]
    for page in pages:
        for caller, (headers, status) in callers.items():
            refused = httpx.get(f"{worker.url}{page}", headers=headers, timeout=5)
            assert refused.status_code == status, (page, caller, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert patient not in refused.text and "resources" not in refused.text
        assert httpx.get(f"{worker.url}{page}", headers=worker.admin, timeout=5).is_success
    # Faust's own pages, which would serve table values and the cluster's addresses, are off;
    # its index says only that it runs
    for page in ("/table/cohort/", "/router/", "/stats/", "/assignment/", "/graph/"):
        assert httpx.get(f"{worker.url}{page}", headers=worker.admin, timeout=5).status_code == 404
    assert httpx.get(f"{worker.url}/", timeout=5).json() == {"status": "OK"}

    resources = worker.get(f"/state/patients/{patient}")["resources"]
    assert resources and all(key.startswith("urn:test|Observation|") for key in resources)

    audit = AuditLog(f"sqlite:///{worker.home / 'audit.sqlite'}")
    records = [
        {**r, "detail": json.loads(r["detail"])}
        for r in audit.records()
        if r["action"] == f"GET /state/patients/{patient}"
    ]
    assert [(r["role"], r["detail"]["status"]) for r in records] == [
        ("anonymous", 401),
        ("sponsor", 403),
        ("regulator", 403),
        ("anonymous", 401),
        ("admin", 200),
        ("admin", 200),
    ]
    assert [r["detail"].get("pseudonyms_read") for r in records if r["role"] == "admin"] == [
        [patient],
        [patient],
    ]
    assert all(r["detail"]["service"] == "worker" for r in records)
    assert audit.verify().ok

    # the pages listen on loopback only (CONCIERGE_WORKER_WEB_BIND's default)
    assert listening_addresses(worker.port) == {"127.0.0.1"}
