"""The adapters on the real broker: Synthea samples in, facts and dead letters out."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from core.contracts.facts import decode_reference, decode_resource_facts, envelopes_of
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.sources import expand, ingest_file
from infra.topics import DEADLETTER, FACTS, REFERENCE
from tests.samples import synthea_r4

pytestmark = pytest.mark.integration

SAMPLES = synthea_r4()


def read_all(bootstrap: str, topic: str, expect_at_least: int = 0) -> list[tuple[bytes, bytes]]:
    """Every message now in a topic: partitions assigned directly and read to their high
    watermarks (no consumer group, so no rebalance to wait for)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    out: list[tuple[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            ends = {}
            for partition in metadata.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10
                )
                if high > low:
                    ends[partition] = (low, high)
            total = sum(high - low for low, high in ends.values())
            if total >= expect_at_least or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in ends.items()])
        remaining = {p: high for p, (_, high) in ends.items()}
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            out.append((msg.key() or b"", msg.value() or b""))
            if msg.offset() + 1 >= remaining.get(msg.partition(), 0):
                remaining.pop(msg.partition(), None)
    finally:
        consumer.close()
    return out


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:synthea",
    )


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    target = tmp_path / "samples"
    shutil.copytree(SAMPLES, target)
    return target


def test_synthea_samples_every_resource_accounted_for(settings: Settings, samples: Path) -> None:
    entries = sum(len(orjson.loads(p.read_bytes())["entry"]) for p in samples.glob("*.json"))
    ingestor = build_ingestor(settings)
    for path in expand([samples]):
        list(ingest_file(ingestor, path))
    ingestor.commit()
    first = ingestor.stats.to_dict()
    ingestor.vault.close()

    assert first["total"] == entries
    assert (
        first["accepted"] + first["unchanged"] + first["skipped"] + first["dead_lettered"]
        == entries
    )
    assert first["dead_lettered"] == 0
    assert first["by_resource_type"]["Claim"]["skipped"] > 0
    assert first["by_resource_type"]["Observation"]["accepted"] > 0

    facts = read_all(settings.kafka_bootstrap_servers, settings.topic(FACTS))
    references = read_all(settings.kafka_bootstrap_servers, settings.topic(REFERENCE))
    envelopes = [
        decode_resource_facts(orjson.dumps(e)) for _, value in facts for e in envelopes_of(value)
    ]
    records = [decode_reference(value) for _, value in references]
    assert len(envelopes) + len(records) == first["accepted"]
    # Keyed by pseudonym, and nothing identifying travels.
    for key, value in facts:
        assert key.decode().startswith("p-")
        assert b"family" not in value and b"postalCode" not in value
    patients = {e.patient for e in envelopes}
    assert len(patients) == first["by_resource_type"]["Patient"]["accepted"]
    for envelope in envelopes:
        assert envelope.provenance.source == "urn:test:synthea"
        assert envelope.provenance.resource_id in envelope.key

    # Replaying every file changes nothing and publishes nothing.
    again = build_ingestor(settings)
    for path in expand([samples]):
        list(ingest_file(again, path))
    again.commit()
    second = again.stats.to_dict()
    again.vault.close()
    assert second["accepted"] == 0
    assert second["unchanged"] == first["accepted"] + first["unchanged"]
    assert len(read_all(settings.kafka_bootstrap_servers, settings.topic(FACTS))) == len(facts)
    # A patient's resources in one Bundle travel as one message.
    assert len(facts) < len(envelopes)


def test_bad_input_is_dead_lettered_with_reason_and_payload(
    settings: Settings, tmp_path: Path
) -> None:
    lines = [
        b'{"resourceType": "Patient", "id": "ok1", "birthDate": "1970-01-01"}',
        b"{not json",
        b'{"resourceType": "Observation", "id": "o1", "status": "final", '
        b'"code": {"text": "x"}, "subject": {"reference": "Patient/ok1"}, '
        b'"effectiveDateTime": "2020-02-30"}',
        b'{"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/nobody"}}',
        b'{"resourceType": "Banana", "id": "b1"}',
        b'{"resourceType": "Observation", "id": "o2", "status": "final", '
        b'"code": {"text": "x"}, "subject": {"reference": "Patient/ok1"}, '
        b'"valueQuantity": {"value": 5.4, "unit": "mmol/L", "system": '
        b'"http://unitsofmeasure.org", "code": "mmol/L"}}',
    ]
    path = tmp_path / "Mixed.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ingestor = build_ingestor(settings)
    outcomes = list(ingest_file(ingestor, path))
    ingestor.commit()
    ingestor.vault.close()
    assert [o.status for o in outcomes] == [
        "accepted",
        "dead_lettered",
        "dead_lettered",
        "dead_lettered",
        "dead_lettered",
        "accepted",
    ]
    letters = [
        orjson.loads(v)
        for _, v in read_all(settings.kafka_bootstrap_servers, settings.topic(DEADLETTER), 4)
    ]
    assert len(letters) == 4
    by_origin = {letter["origin"].rsplit(":", 1)[1]: letter for letter in letters}
    assert by_origin["2"]["payload"] == "{not json"
    date_issue = by_origin["3"]["operation_outcome"]["issue"]
    assert any("Observation.effectiveDateTime" in i.get("expression", [""])[0] for i in date_issue)
    ref_issue = by_origin["4"]["operation_outcome"]["issue"][-1]
    assert ref_issue["code"] == "not-found"
    assert by_origin["5"]["operation_outcome"]["issue"][0]["code"] == "not-supported"
    for letter in letters:
        assert letter["operation_outcome"]["resourceType"] == "OperationOutcome"
        assert letter["payload"]
