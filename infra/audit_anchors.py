"""Audit anchors on Kafka: the audit chain's head published to an append-only topic, and read back.

:class:`AnchorPublisher` runs in the API process. Every ``interval`` seconds (and once more when
it stops) it reads the audit log's head (:meth:`core.audit.AuditLog.head`) and, if the head has
moved since the last anchor it published, signs it (:meth:`core.audit.AuditLog.sign_anchor`)
and publishes it to ``concierge.audit-anchors.v1`` (:data:`infra.topics.AUDIT_ANCHORS`: deleted
never, compacted never), waiting for the broker's acknowledgement. Publishing runs on its own
thread and never blocks a request: when the broker is down the failure is logged (a warning
when it starts, then once a minute while it lasts), shown by :meth:`AnchorPublisher.status`
(the API's ``/readyz`` body, ``audit_anchors``), and the next tick tries again with the head as
it is then.

:func:`read_anchors` reads every anchor on the topic for ``concierge audit verify
--against-anchors``; :func:`topic_problems` says what is wrong with the topic's own
configuration (compaction, a finite retention, anchors already deleted from its start).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource
from pydantic import ValidationError

from core.audit import AuditLog
from core.contracts.audit import AuditAnchor
from infra.kafka_log import routed

from .topics import AUDIT_ANCHORS, TOPICS
from .topics_admin import ensure_topics

log = logging.getLogger(__name__)

#: The verifier reports an unreachable broker itself, once, instead of librdkafka's log lines.
_QUIET = {"log_level": 0}

#: While publishing keeps failing, the warning is repeated this often (seconds).
WARN_EVERY_SECONDS = 60.0


class AnchorsUnavailable(RuntimeError):
    """The anchors cannot be read (the broker does not answer, or stopped answering)."""


class AnchorTopicMissing(AnchorsUnavailable):
    """The anchors topic does not exist: nothing was ever anchored there, or it was deleted."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


class AnchorPublisher:
    """Publishes the head of ``audit`` to ``topic`` every ``interval`` seconds while it moves."""

    def __init__(
        self,
        audit: AuditLog,
        bootstrap: str,
        topic_prefix: str = "",
        interval: float = 10.0,
        *,
        timeout: float = 5.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("the anchor interval must be more than 0 seconds")
        self.audit = audit
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.topic = topic_prefix + AUDIT_ANCHORS
        self.interval = interval
        #: How long one attempt may wait for the broker (topic creation, acknowledgement).
        self.timeout = timeout
        self.publisher = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()  # one attempt at a time (the thread's, or stop()'s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-anchors", daemon=True)
        self._producer: Producer | None = None
        self._topic_ready = False
        self._last: AuditAnchor | None = None
        self._error: str | None = None
        self._failing_since: str | None = None
        self._failures = 0
        self._warned_at = 0.0
        self._last_attempt: str | None = None

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> AnchorPublisher:
        self._thread.start()
        return self

    def stop(self) -> bool:
        """Stop the thread and publish the head once more (bounded by ``timeout``); whether the
        head as it is now has been anchored."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout * 2 + 1)
        published = self.publish()
        if self._producer is not None:
            self._producer.flush(self.timeout)
            self._producer = None
        if not published:
            log.warning(
                "audit anchors: the final head was not published at shutdown (%s); "
                "`concierge audit verify --against-anchors` covers the records up to the last "
                "anchor published, the rest by their HMACs only",
                self._error,
            )
        return published

    def _run(self) -> None:
        while True:
            self.publish()
            if self._stop.wait(self.interval):
                return

    # ------------------------------------------------------------------------ publishing

    def publish(self) -> bool:
        """One attempt: anchor the head if it moved. True when the head is anchored (or there is
        nothing to anchor yet); on failure the error is recorded and logged, never raised."""
        with self._lock:
            self._last_attempt = _now()
            try:
                self._publish()
            except Exception as exc:  # any failure is reported and retried at the next tick
                self._failed(f"{type(exc).__name__}: {exc}")
                return False
            self._succeeded()
            return True

    def _publish(self) -> None:
        head = self.audit.head()
        if head.seq == 0:
            return  # nothing recorded yet
        last = self._last
        if last is not None and (last.seq, last.hmac) == (head.seq, head.hash):
            return
        if not self._topic_ready:
            specs = [spec for spec in TOPICS if spec.name == AUDIT_ANCHORS]
            ensure_topics(self.bootstrap, self.prefix, specs, timeout=self.timeout)
            self._topic_ready = True
        anchor = self.audit.sign_anchor(head, _now(), self.publisher)
        if self._producer is None:
            self._producer = Producer(
                routed(
                    {
                        "bootstrap.servers": self.bootstrap,
                        "acks": "all",
                        # a message not acknowledged within the timeout fails (and is retried at the
                        # next tick with the head as it is then) instead of waiting in librdkafka
                        "message.timeout.ms": max(1000, int(self.timeout * 1000)),
                        "linger.ms": 0,
                        "reconnect.backoff.ms": 100,
                        "reconnect.backoff.max.ms": 1000,
                    }
                )
            )
        errors: list[str] = []

        def delivered(err: KafkaError | None, _message: Any) -> None:
            if err is not None:
                errors.append(str(err))

        self._producer.produce(
            self.topic, key=anchor.chain.encode(), value=anchor.to_json(), on_delivery=delivered
        )
        remaining = self._producer.flush(self.timeout + 1)
        if errors:
            raise KafkaException(f"anchor not delivered: {errors[0]}")
        if remaining:
            raise TimeoutError(f"anchor not acknowledged within {self.timeout} s")
        self._last = anchor

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        first = self._failing_since is None
        self._error = error
        self._failures += 1
        if first:
            self._failing_since = _now()
        if first or now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning(
                "audit anchors not published to %s since %s (%s failed attempts): %s; "
                "retrying every %s s (requests are served meanwhile)",
                self.topic,
                self._failing_since,
                self._failures,
                error,
                self.interval,
            )

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.info(
                "audit anchors published again to %s (record %s), after failing since %s",
                self.topic,
                self._last.seq if self._last else "-",
                self._failing_since,
            )
        self._error = None
        self._failing_since = None
        self._failures = 0

    def status(self) -> dict[str, Any]:
        """Whether the head is anchored, the last anchor published, and the current failure."""
        last = self._last
        return {
            "ok": self._error is None,
            "topic": self.topic,
            "interval_seconds": self.interval,
            "last_anchor": (
                None
                if last is None
                else {"seq": last.seq, "at": last.at, "published_at": last.published_at}
            ),
            "last_attempt": self._last_attempt,
            "error": self._error,
            "failing_since": self._failing_since,
            "failed_attempts": self._failures,
        }


# ---------------------------------------------------------------------------- reading back


def read_anchors(bootstrap: str, topic: str, timeout: float = 10.0) -> Iterator[AuditAnchor | str]:
    """Every message on the anchors topic, from the start to the end it had when reading began:
    an :class:`AuditAnchor`, or a ``str`` saying where a message is that is not one.

    :class:`AnchorTopicMissing` when the topic does not exist; :class:`AnchorsUnavailable` when
    the broker does not answer, or no progress is made for ``timeout`` seconds."""
    consumer = Consumer(
        routed(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "concierge-audit-verify-unused",  # assigned, never joined or committed
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                **_QUIET,
            }
        )
    )
    try:
        try:
            metadata = consumer.list_topics(timeout=timeout)  # by name it might create it
        except KafkaException as exc:
            raise AnchorsUnavailable(f"the broker at {bootstrap} does not answer: {exc}") from exc
        found = metadata.topics.get(topic)
        if found is None or (
            found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            raise AnchorTopicMissing(f"the anchors topic {topic} does not exist at {bootstrap}")
        if found.error is not None:
            raise AnchorsUnavailable(f"the anchors topic {topic}: {found.error}")
        ends: dict[int, int] = {}
        for partition in sorted(found.partitions):
            try:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout, cached=False
                )
            except KafkaException as exc:
                raise AnchorsUnavailable(f"the anchors topic {topic}: {exc}") from exc
            if high > 0:
                ends[partition] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        positions = dict.fromkeys(ends, -1)
        last_progress = time.monotonic()
        while any(positions[p] + 1 < ends[p] for p in ends):
            messages = consumer.consume(500, timeout=0.5)
            if not messages:
                if time.monotonic() - last_progress > timeout:
                    behind = {p: ends[p] - positions[p] - 1 for p in ends}
                    raise AnchorsUnavailable(
                        f"reading {topic} made no progress for {timeout} s (left per "
                        f"partition: {behind})"
                    )
                continue
            last_progress = time.monotonic()
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AnchorsUnavailable(f"reading {topic}: {error}")
                partition, offset = message.partition(), message.offset()
                if partition is None or offset is None or partition not in ends:
                    continue
                positions[partition] = max(positions[partition], offset)
                if offset >= ends[partition]:
                    continue  # published after reading began: next time
                try:
                    yield AuditAnchor.model_validate_json(message.value() or b"")
                except ValidationError as exc:
                    yield (
                        f"partition {partition} offset {offset}: "
                        f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']}"
                    )
    finally:
        consumer.close()


def topic_problems(bootstrap: str, topic: str, timeout: float = 10.0) -> list[str]:
    """What about the anchors topic itself defeats the anchors: compaction (only each chain's
    latest anchor would be kept), a finite retention (old anchors vanish), or messages already
    gone from the start of a partition (deleted records)."""
    admin = AdminClient(routed({"bootstrap.servers": bootstrap, **_QUIET}))
    problems: list[str] = []
    try:
        # all topics: asking for one by name would create it on a broker that auto-creates
        metadata = admin.list_topics(timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise AnchorsUnavailable(f"the broker at {bootstrap} does not answer: {exc}") from exc
    if metadata is None or metadata.error is not None:
        return problems  # missing: read_anchors says so
    try:
        futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)])
        config = next(iter(futures.values())).result(timeout=timeout)
    except (KafkaException, TimeoutError) as exc:
        raise AnchorsUnavailable(f"the anchors topic {topic}: {exc!r}") from exc
    policy = config["cleanup.policy"].value if "cleanup.policy" in config else "delete"
    if "compact" in str(policy):
        problems.append(f"the anchors topic {topic} is compacted (cleanup.policy={policy})")
    for name in ("retention.ms", "retention.bytes"):
        value = config[name].value if name in config else "-1"
        if str(value) != "-1":
            problems.append(
                f"the anchors topic {topic} does not keep anchors forever ({name}={value})"
            )
    consumer = Consumer(
        routed(
            {"bootstrap.servers": bootstrap, "group.id": "concierge-audit-verify-unused", **_QUIET}
        )
    )
    try:
        for partition in sorted(metadata.partitions):
            low, _high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout, cached=False
            )
            if low > 0:
                problems.append(
                    f"the anchors topic {topic} partition {partition} starts at offset {low}: "
                    "earlier anchors were deleted"
                )
    except KafkaException as exc:
        raise AnchorsUnavailable(f"the anchors topic {topic}: {exc}") from exc
    finally:
        consumer.close()
    return problems


__all__ = [
    "AnchorPublisher",
    "AnchorTopicMissing",
    "AnchorsUnavailable",
    "read_anchors",
    "topic_problems",
]
