"""The broker the project starts: it answers, transactions work on one node, topics as defined."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from concierge.cli import main
from infra.topics import REFERENCE

pytestmark = pytest.mark.integration


def test_transactions_commit_and_abort_on_one_node(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = topic_prefix + "concierge.facts.v1"
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"test-{uuid.uuid4()}"}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"committed", partition=0)
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"aborted", partition=0)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"after", partition=0)
    producer.commit_transaction(30)

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": str(uuid.uuid4()),
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    seen = []
    for _ in range(40):
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            seen.append(msg.value())
        if len(seen) == 2:
            break
    consumer.close()
    assert seen == [b"committed", b"after"]


def test_reference_topic_is_compacted(kafka_bootstrap: str, topic_prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic_prefix + REFERENCE)
    config = admin.describe_configs([resource])[resource].result(30)
    assert config["cleanup.policy"].value == "compact"
    metadata = admin.list_topics(timeout=10).topics[topic_prefix + REFERENCE]
    assert len(metadata.partitions) == 3


def test_status_command_reports_the_running_broker(kafka_bootstrap: str) -> None:
    port = kafka_bootstrap.rsplit(":", 1)[1]
    result = CliRunner().invoke(main, ["broker", "status"], env={"CONCIERGE_BROKER_PORT": port})
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["running"] is True
    assert status["bootstrap"].endswith(f":{port}")
