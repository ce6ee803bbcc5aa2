"""End-to-end tests use the same real broker and per-test topics as the integration tests."""

from tests.integration.conftest import kafka_bootstrap, topic_prefix

__all__ = ["kafka_bootstrap", "topic_prefix"]
