"""Creating the product's topics, idempotently, on any Kafka-protocol cluster."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from .kafka_log import routed
from .topics import TOPICS, TopicSpec


def ensure_topics(
    bootstrap: str,
    prefix: str = "",
    specs: Iterable[TopicSpec] = TOPICS,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create every topic that does not exist yet; return the names created."""
    admin = AdminClient(routed({"bootstrap.servers": bootstrap}))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [s for s in specs if prefix + s.name not in existing]
    created: list[str] = []
    if wanted:
        futures = admin.create_topics(
            [
                NewTopic(
                    prefix + s.name,
                    num_partitions=s.partitions,
                    replication_factor=replication_factor,
                    config=dict(s.config),
                )
                for s in wanted
            ],
            operation_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    deadline = time.monotonic() + timeout
    names = {prefix + s.name for s in specs}
    while time.monotonic() < deadline:
        if names <= set(admin.list_topics(timeout=timeout).topics):
            return created
        time.sleep(0.2)
    raise TimeoutError(f"topics not visible after {timeout} s: {sorted(names)}")
