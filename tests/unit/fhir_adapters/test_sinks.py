"""KafkaSink's delivery reports, without a broker (nothing here needs one to be reached)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from fhir_adapters.sinks import DeliveryFailed, KafkaSink


class _Message:
    def topic(self) -> str:
        return "t.concierge.facts.v1"


def _sink() -> KafkaSink:
    # a port nothing listens on: the producer is built, never used to send
    return KafkaSink("127.0.0.1:1", "t.", timeout_seconds=0.5)


@pytest.mark.parametrize("code", [KafkaError._PURGE_INFLIGHT, KafkaError._PURGE_QUEUE])
def test_a_late_report_of_a_message_we_purged_does_not_fail_the_next_flush(code: Any) -> None:
    """Seen in CI: discard() purged a message in flight, its report came after discard() had
    returned, and the next flush (the API's shutdown commit, nothing pending) raised
    ``Local: Purged in flight``."""
    sink = _sink()
    sink._on_delivery(KafkaError(code), _Message())  # type: ignore[arg-type]
    sink.flush()  # nothing pending, nothing failed


def test_any_other_failed_report_still_fails_the_flush() -> None:
    sink = _sink()
    sink._on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), _Message())  # type: ignore[arg-type]
    with pytest.raises(DeliveryFailed) as failed:
        sink.flush()
    assert failed.value.kind == "unavailable"
