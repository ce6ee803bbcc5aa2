"""The relay: each trial's feed (``followup_feed``) onto the trial's own Kafka topic, exactly once.

The feed rows are written by the consumer in its transactions; the relay publishes them in
order with a **transactional** producer (one ``transactional.id`` per deployment). Where it
resumes is read from the topic itself, never from a bookmark that could disagree with it: at
start, ``init_transactions`` fences any earlier instance and aborts its unfinished transaction,
then the last *committed* record of every trial topic (read ``read_committed``) gives the last
feed ``seq`` published. A SIGKILL between Kafka's commit and the bookkeeping row therefore
repeats nothing, and one before the commit loses nothing (the aborted records are invisible).

Each trial topic has one partition (the feed's order is the trial's cursor), records are keyed
by the trial pseudonym, and each carries its feed ``seq`` in the ``seq`` header.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.orm import Session, sessionmaker

from infra.kafka_log import routed

from .tables import FeedEntry, TrialCursor

log = logging.getLogger(__name__)

#: Characters a trial id keeps in its topic's name; every other one (``_`` included, the escape)
#: becomes ``_`` and its code point in six hex digits.
_KEPT = re.compile(r"[A-Za-z0-9.-]")
#: Kafka's limit is 249 characters; the prefix and the fixed parts need some of them.
_LONGEST = 180


def trial_topic(trial_id: str, prefix: str = "") -> str:
    """``<prefix>concierge.followup.<trial>.v1``. One trial, one topic, and never two trials on
    one topic (their feeds would mix): the name is an injective escape of the id (``A:B`` and
    ``A_B`` differ), and a long one is cut and completed by ``_h`` and a digest of the whole id
    (an escape is ``_`` and six hex digits, so ``_h`` marks a cut name and nothing else)."""
    escaped = "".join(c if _KEPT.fullmatch(c) else f"_{ord(c):06x}" for c in trial_id)
    if len(escaped) > _LONGEST:
        digest = hashlib.sha256(trial_id.encode()).hexdigest()[:32]
        escaped = f"{escaped[: _LONGEST - 34]}_h{digest}"
    return f"{prefix}concierge.followup.{escaped}.v1"


def seq_of(message: Message) -> int:
    """The feed seq a record carries in its ``seq`` header (0 when it has none)."""
    for header in message.headers() or []:
        if header[0] == "seq" and header[1] is not None:
            return int(header[1])
    return 0


class Relay:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        bootstrap: str,
        prefix: str = "",
        *,
        transactional_id: str = "concierge-followup-relay",
        batch: int = 1000,
        replication_factor: int = 1,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.sessions = sessions
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.batch = batch
        self.replication_factor = replication_factor
        self.config = dict(config or {})
        self.producer = Producer(routed({
            "bootstrap.servers": bootstrap,
            "transactional.id": transactional_id,
            "enable.idempotence": True,
            "linger.ms": 5,
            **self.config,
        }))  # fmt: skip
        self.admin = AdminClient(routed({"bootstrap.servers": bootstrap, **self.config}))
        #: last seq published per trial, as read from the topics
        self.published: dict[str, int] = {}
        self.sent = 0

    def start(self, timeout: float = 60.0) -> None:
        self.producer.init_transactions(timeout)

    # ------------------------------------------------------------------ topics

    def _ensure_topic(self, trial_id: str) -> str:
        name = trial_topic(trial_id, self.prefix)
        self.admin.poll(0)  # serves its librdkafka log lines (routed) so they do not pile up
        if name in self.admin.list_topics(timeout=10).topics:
            return name
        futures = self.admin.create_topics([NewTopic(
            name, num_partitions=1, replication_factor=self.replication_factor,
            config={"cleanup.policy": "delete", "retention.ms": "-1"})])  # fmt: skip
        for future in futures.values():
            try:
                future.result()
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
        return name

    def last_published(self, topic: str, timeout: float = 10.0) -> int:
        """The feed seq of the last committed record on ``topic`` (0 when it has none)."""
        reader = Consumer(routed({
            "bootstrap.servers": self.bootstrap,
            "group.id": "concierge-followup-relay-tail",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            **self.config,
        }))  # fmt: skip
        try:
            low, high = reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
            # read_committed: ``high`` is the last stable offset. Step back until a committed
            # record shows (transaction markers and aborted records take offsets too).
            step = 8
            while True:
                start = max(low, high - step)
                reader.assign([TopicPartition(topic, 0, start)])
                last = 0
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    message = reader.poll(0.5)
                    if message is None:
                        continue
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            break
                        raise KafkaException(error)
                    last = max(last, seq_of(message))
                else:
                    raise TimeoutError(f"could not read the tail of {topic}")
                if last or start == low:
                    return last
                step *= 4
        finally:
            reader.close()

    # ------------------------------------------------------------------ publishing

    def publish_once(self) -> int:
        """Publish every feed entry not on its topic yet; how many were sent."""
        with self.sessions() as session:
            pending = session.execute(sa.select(TrialCursor.trial_id, TrialCursor.written)).all()
        sent = 0
        for trial_id, written in pending:
            if trial_id not in self.published:
                topic = self._ensure_topic(trial_id)
                self.published[trial_id] = self.last_published(topic)
            if self.published[trial_id] >= written:
                continue
            sent += self._publish_trial(trial_id)
        self.sent += sent
        return sent

    def _publish_trial(self, trial_id: str) -> int:
        topic = trial_topic(trial_id, self.prefix)
        after = self.published[trial_id]
        with self.sessions() as session:
            rows = session.execute(
                sa.select(FeedEntry.seq, FeedEntry.participant, FeedEntry.body)
                .where(FeedEntry.trial_id == trial_id, FeedEntry.seq > after)
                .order_by(FeedEntry.seq)
                .limit(self.batch)
            ).all()
        if not rows:
            return 0
        self.producer.begin_transaction()
        try:
            for seq, participant, body in rows:
                self.producer.produce(topic, key=participant.encode(),
                                      value=json.dumps(body, separators=(",", ":")).encode(),
                                      headers=[("seq", str(seq).encode())])  # fmt: skip
            self.producer.commit_transaction(30)
        except KafkaException:
            self.producer.abort_transaction(30)
            raise
        last = int(rows[-1][0])
        self.published[trial_id] = last
        with self.sessions.begin() as session:  # bookkeeping only: the topic is the truth
            cursor = session.get(TrialCursor, trial_id)
            if cursor is not None and cursor.published < last:
                cursor.published = last
        return len(rows)

    def run(self, stop: threading.Event, interval: float = 0.2) -> None:
        while not stop.is_set():
            try:
                if self.publish_once() == 0:
                    stop.wait(interval)
            except KafkaException as exc:
                log.warning("relay: %s; retrying", exc)
                self.published.clear()  # read the tails again: the truth after a failure
                stop.wait(1.0)
            except sa.exc.OperationalError as exc:
                # the database busy or unreachable (SQLite's busy timeout passed while another
                # process held the write lock: seen in the demo, where it ended this thread and
                # the feed stopped while the service ran on): wait and read again
                log.warning("relay: database error (%s); retrying", exc.orig or exc)
                self.published.clear()
                stop.wait(1.0)

    def close(self) -> None:
        self.producer.flush(10)
