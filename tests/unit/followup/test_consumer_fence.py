"""Offsets are written compare-and-set: an instance that read a partition from an offset the
database no longer holds (another instance of the group moved it) commits nothing of its batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from followup import db
from followup.consumer import Fenced, FollowupConsumer
from followup.engine import FollowupEngine
from followup.tables import FollowupOffset
from recruitment.models import SkippedMessage, utcnow
from tests.followup_helpers import SECRET

TOPIC = "concierge.facts.v1"


class Read:
    """What the consumer reads of a Kafka message (an unreadable one: it is recorded)."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return b"not an envelope"

    def error(self) -> None:
        return None


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'followup.sqlite'}"
    db.upgrade(url)
    engine = make_engine(url, immediate_writes=True)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_a_batch_read_from_an_offset_another_instance_moved_is_rolled_back(
    sessions: sessionmaker[Session],
) -> None:
    consumer = FollowupConsumer(sessions, FollowupEngine(SECRET, "https://x.example"),
                                "127.0.0.1:1", name="a", group="g")  # fmt: skip
    with sessions.begin() as session:
        session.add(FollowupOffset(topic=TOPIC, kafka_partition=0, next_offset=7,
                                   committed_at=utcnow()))  # fmt: skip
    # it holds partition 0, read from 5, before another instance moved on to 7
    consumer._partitions, consumer._positions, consumer._stored = (
        [(TOPIC, 0)],
        {(TOPIC, 0): 5},
        {0: 5},
    )

    def state() -> tuple[int | None, int]:
        with sessions() as session:
            offset = session.scalar(sa.select(FollowupOffset.next_offset))
            skipped = session.scalar(sa.select(sa.func.count()).select_from(SkippedMessage))
        return offset, int(skipped or 0)

    with pytest.raises(Fenced):
        consumer.process([Read(0, 5), Read(0, 6)])  # type: ignore[list-item]
    assert state() == (7, 0), "nothing of the batch, and the offset untouched"

    consumer._rewind()  # as poll does after a failed batch: the database's offsets again
    assert consumer._stored == {0: 7} and consumer._positions == {(TOPIC, 0): 7}
    consumer.process([Read(0, 7)])  # type: ignore[list-item]
    assert state() == (8, 1)
    consumer.consumer.close()
