"""FHIR ingest under faults, on a real broker: a resource is acknowledged only once it is on
Kafka, a failed publication leaves nothing in the resource index and is answered (413 or 503 +
Retry-After) in bounded time, oversize bodies are dead-lettered as bounded excerpts, and the
API keeps answering other routes while ingest works or waits for the broker."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from concierge.api import create_app
from core.auth import issue
from core.contracts.facts import decode_resource_facts, envelopes_of
from core.settings import Settings
from fhir_adapters.pipeline import EXCERPT_BYTES
from infra.topics import DEADLETTER, FACTS
from infra.topics_admin import ensure_topics
from tests.faults import PrivateBroker
from tests.integration.test_ingest_kafka import read_all

pytestmark = pytest.mark.integration

SOURCE = "urn:test:faults"
FHIR = {"Content-Type": "application/fhir+json"}
NHS = "https://fhir.nhs.uk/Id/nhs-number"


class Api:
    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def put(self, resource: dict[str, Any] | bytes) -> tuple[int, dict[str, Any], Any]:
        body = resource if isinstance(resource, bytes) else orjson.dumps(resource)
        rtype, rid = (orjson.loads(body)[k] for k in ("resourceType", "id"))
        response = self.client.put(f"/fhir/{rtype}/{rid}", content=body, headers=FHIR)
        return response.status_code, response.json(), response.headers

    def indexed(self, rtype: str, rid: str) -> bool:
        key = f"{SOURCE}|{rtype}|{rid}"
        vault = self.client.app.state.ingest.ingestor.vault  # type: ignore[attr-defined]
        return key in vault.get_index([key])

    def facts(self, expect_at_least: int = 0) -> list[Any]:
        topic = self.settings.topic(FACTS)
        messages = read_all(self.settings.kafka_bootstrap_servers, topic, expect_at_least)
        return [
            decode_resource_facts(orjson.dumps(e))
            for _, value in messages
            for e in envelopes_of(value)
        ]


@contextmanager
def serve(bootstrap: str, prefix: str, home: Path, **overrides: Any) -> Iterator[Api]:
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        home=home,
        source_system=SOURCE,
        feasibility_feed=False,
        recruitment_api=False,
        surveillance_monitor=False,
        **overrides,
    )
    app = create_app(settings)
    token = issue(
        settings.token_key.get_secret_value().encode(), "source", "test-ehr", source_system=SOURCE
    )
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield Api(client, settings)


def patient(rid: str = "pat1") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": rid, "identifier": [{"system": NHS, "value": rid}]}


def observation(rid: str, value: float = 5.5) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": "Patient/pat1"},
        "effectiveDateTime": "2024-01-01T09:00:00Z",
        "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    }


def heavy_condition(rid: str, codings: int) -> dict[str, Any]:
    """A valid Condition whose envelope is large and does not compress (random codes)."""
    codes = [
        {"system": "http://snomed.info/sct", "code": os.urandom(16).hex()} for _ in range(codings)
    ]
    return {
        "resourceType": "Condition",
        "id": rid,
        "subject": {"reference": "Patient/pat1"},
        "code": {"coding": codes},
    }


def set_max_message_bytes(bootstrap: str, topic: str, value: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    entry = ConfigEntry(
        "max.message.bytes", str(value), incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the broker applies topic configs asynchronously
        described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        configs = next(iter(described.values())).result(timeout=30)
        if configs["max.message.bytes"].value == str(value):
            return
        time.sleep(0.2)
    raise AssertionError(f"{topic}: max.message.bytes not applied")


def test_envelope_too_large_for_the_topic_is_413_indexes_nothing_and_a_retry_publishes(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Seen: a PUT whose envelope exceeded the topic's max.message.bytes answered 500, the
    next PUT's commit indexed it anyway, and re-sending it answered "same content already
    ingested": the resource never reached Kafka."""
    facts_topic = topic_prefix + FACTS
    set_max_message_bytes(kafka_bootstrap, facts_topic, 4096)
    condition = heavy_condition("big", codings=300)
    with serve(kafka_bootstrap, topic_prefix, tmp_path / "home") as api:
        assert api.put(patient())[0] == 201
        status, outcome, _ = api.put(condition)
        assert status == 413, outcome
        assert "max.message.bytes" in outcome["issue"][0]["diagnostics"]
        assert not api.indexed("Condition", "big")
        assert api.put(observation("next"))[0] == 201  # its commit must not index "big"
        assert not api.indexed("Condition", "big")
        status, outcome, _ = api.put(condition)
        assert status == 413, outcome  # not "same content already ingested"

        set_max_message_bytes(kafka_bootstrap, facts_topic, 2 * 1024 * 1024)
        status, outcome, headers = api.put(condition)
        assert status == 201, outcome
        assert api.indexed("Condition", "big")
        seq = int(headers["location"].rsplit("/", 1)[1])
        facts = api.facts(expect_at_least=3)
    big = [e for e in facts if e.key == f"{SOURCE}|Condition|big"]
    assert [e.seq for e in big] == [seq]
    assert len(big[0].facts[0].codes) == 300
    letters = [orjson.loads(v) for _, v in read_all(kafka_bootstrap, topic_prefix + DEADLETTER, 2)]
    assert [letter["resource_id"] for letter in letters] == ["big", "big"]
    assert all(len(letter["payload"].encode()) <= EXCERPT_BYTES for letter in letters)


def test_a_50_mb_body_is_413_with_a_bounded_dead_letter(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Seen: a 50 MB body at POST /fhir answered 500 with nothing dead-lettered (the whole
    payload was put in the letter, too large for Kafka)."""
    body = orjson.dumps({**patient(), "text": {"status": "generated", "div": "x" * 50_000_000}})
    with serve(kafka_bootstrap, topic_prefix, tmp_path / "home") as api:
        response = api.client.post("/fhir", content=body, headers=FHIR)
        assert response.status_code == 413, response.text
        assert response.json()["issue"][0]["code"] == "too-long"
    [(_, value)] = read_all(kafka_bootstrap, topic_prefix + DEADLETTER, 1)
    letter = orjson.loads(value)
    assert len(value) < 16_000
    assert letter["origin"] == "http:POST /fhir"
    assert letter["payload"].encode() == body[:EXCERPT_BYTES]
    assert (letter["payload_truncated"], letter["payload_bytes"]) == (True, len(body))
    assert letter["payload_sha256"] == hashlib.sha256(body).hexdigest()


def p99(timings: list[float]) -> float:
    ordered = sorted(timings)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_healthz_stays_responsive_while_a_10000_entry_bundle_is_ingested(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """Seen: ingest ran on the event loop, so a 10,000-entry Bundle blocked every request."""
    entries = [{"resource": patient()}]
    entries += [{"resource": observation(f"o{i}", float(i))} for i in range(9_999)]
    bundle = orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries})
    with serve(kafka_bootstrap, topic_prefix, tmp_path / "home") as api:
        results: list[Any] = []
        started = threading.Event()

        def ingest() -> None:
            started.set()
            results.append(api.client.post("/fhir", content=bundle, headers=FHIR))

        thread = threading.Thread(target=ingest)
        bundle_started = time.perf_counter()
        thread.start()
        started.wait()
        timings = []
        while thread.is_alive():
            begin = time.perf_counter()
            assert api.client.get("/healthz").status_code == 200
            timings.append(time.perf_counter() - begin)
            time.sleep(0.01)
        thread.join()
        bundle_seconds = time.perf_counter() - bundle_started
        [response] = results
        assert response.status_code == 200
        statuses = {e["response"]["status"] for e in response.json()["entry"]}
        assert statuses == {"201 Created"}
        # A blocked event loop would hold one /healthz for about the whole Bundle: few samples,
        # one of them as long as the ingest. No absolute bound (a shared machine's noise is
        # not the property): every answer came in well under the Bundle's time.
        assert len(timings) >= 10, timings  # the Bundle took a while: healthz was sampled
        assert max(timings) < bundle_seconds / 3, (bundle_seconds, sorted(timings)[-5:])
        print(f"bundle: {bundle_seconds:.2f} s, {len(timings)} healthz, p99 {p99(timings):.3f} s")


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker().start()
    try:
        yield broker
    finally:
        # SIGKILL, not stop(): its data is thrown away, and a graceful stop takes 30 s here.
        broker.kill()
        shutil.rmtree(broker.config.data_dir, ignore_errors=True)


def test_broker_outage_answers_503_in_bounded_time_and_a_retry_publishes_once(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """Seen: during a broker outage the API froze (``/healthz`` took 19.9 s) and then
    answered 201 to every ingest PUT. Now: 503 + Retry-After within the ingest timeout, other
    routes keep answering, nothing of a 503 is indexed, and a retry after the broker is back
    publishes it exactly once."""
    timeout = 2.0
    prefix = "t-outage."
    ensure_topics(private_broker.bootstrap, prefix)
    with serve(
        private_broker.bootstrap, prefix, tmp_path / "home", ingest_timeout_seconds=timeout
    ) as api:
        assert api.put(patient())[0] == 201
        private_broker.kill()

        results: list[tuple[float, tuple[int, dict[str, Any], Any]]] = []

        def put_during_outage() -> None:
            begin = time.perf_counter()
            answer = api.put(observation("obs1"))
            results.append((time.perf_counter() - begin, answer))

        thread = threading.Thread(target=put_during_outage)
        thread.start()
        timings = []
        while thread.is_alive():
            begin = time.perf_counter()
            assert api.client.get("/healthz").status_code == 200
            timings.append(time.perf_counter() - begin)
            time.sleep(0.05)
        thread.join()
        [(took, (status, outcome, headers))] = results
        assert status == 503, outcome
        assert headers["retry-after"] == "2"
        # the issue's bound is 5 s; a loaded machine (two test workers and the chaos suite)
        # took 3.3 s with a 2 s ingest timeout
        assert took < timeout + 3.0, took
        print(f"outage: 503 after {took:.2f} s; healthz max {max(timings):.3f} s")
        # Blocked behind the failing publish, a /healthz would take about the whole timeout
        # (the report: 19.9 s); well under half of it shows the loop stayed free. Not an
        # absolute bound: the first call once took 0.54 s on this shared machine.
        assert len(timings) >= 5 and max(timings) < timeout / 2, timings
        assert not api.indexed("Observation", "obs1")
        # A second try while the broker is still down: the same, nothing half-stored.
        status, _, _ = api.put(observation("obs1"))
        assert status == 503
        assert not api.indexed("Observation", "obs1")

        private_broker.restart()
        deadline = time.monotonic() + 30
        while True:
            status, outcome, headers = api.put(observation("obs1"))
            if status != 503 or time.monotonic() > deadline:
                break
            time.sleep(float(headers["retry-after"]))
        assert status == 201, outcome
        assert api.indexed("Observation", "obs1")
        seq = int(headers["location"].rsplit("/", 1)[1])
        assert api.put(observation("obs1"))[0] == 200  # now the same content is unchanged
        facts = api.facts(expect_at_least=2)
    by_key: dict[str, list[Any]] = {}
    for envelope in facts:
        by_key.setdefault(envelope.key, []).append(envelope)
    assert [e.seq for e in by_key[f"{SOURCE}|Observation|obs1"]] == [seq]
    assert len(by_key) == 2  # the Patient (by pseudonym) and the Observation, once each
    assert all(len(envelopes) == 1 for envelopes in by_key.values())
