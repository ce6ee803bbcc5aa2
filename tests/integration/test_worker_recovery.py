"""How a worker's patient state is recovered on assignment, against a real broker.

The reported failure: a worker restarted under load logged ``partition N rebuilt: 0 patients
from 0 envelopes (to offset 0)`` while the group's committed offsets were ~1,000 per partition,
then resumed from those offsets with an empty state. The rebuild read Faust's private map of
committed offsets, which is empty before the assignment's seek and after every revocation, and
took "missing" for 0. These tests drive the recovery with exactly that map empty: the state must
reflect every facts message before the stream's position, whatever Faust's internals hold.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from core.contracts.facts import ResourceFacts
from core.settings import Settings
from infra.topics import COHORT, FACTS
from infra.topics_admin import ensure_topics
from surveillance_stream import patient_state
from surveillance_stream.app import StreamApp, create_app

from .test_worker import synthetic_envelopes

pytestmark = [pytest.mark.integration]

PARTITION = 2


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        stream_tick_seconds=0,
    )


def produce(
    settings: Settings, envelopes: list[ResourceFacts], partition: int = PARTITION
) -> list[int]:
    """Each envelope as one message on ``partition``, in order; returns the offsets. Idempotent:
    CI once saw a state that matched no prefix of the envelopes, which a retried batch
    reordering or repeating messages would explain (the tests fold the list's prefixes)."""
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.idempotence": True}
    )
    offsets: list[int] = []

    def delivered(err: object, msg: object) -> None:
        assert err is None, err
        offsets.append(msg.offset())  # type: ignore[attr-defined]

    for envelope in envelopes:
        producer.produce(
            settings.topic(FACTS),
            key=envelope.patient.encode(),
            value=envelope.to_json(),
            partition=partition,
            on_delivery=delivered,
        )
    assert producer.flush(30) == 0
    # the partition holds exactly these messages, in this order
    assert offsets == sorted(offsets) and len(set(offsets)) == len(envelopes), offsets
    return offsets


def fold(envelopes: list[ResourceFacts]) -> dict[str, object]:
    return patient_state.digest(patient_state.fold(envelopes).items())


def state_digest(stream: StreamApp) -> dict[str, object]:
    return stream.digest()


def commit(settings: Settings, stream: StreamApp, offset: int) -> None:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": stream.app.conf.id}
    )
    try:
        consumer.commit(
            offsets=[TopicPartition(settings.topic(FACTS), PARTITION, offset)], asynchronous=False
        )
    finally:
        consumer.close()


def test_state_reaches_the_first_message_with_fausts_map_empty(settings: Settings) -> None:
    """The group committed 600; the stream's first message is 900 (the client delivered past
    the committed offset). The state folds 0..600 from the log and handles 600..900 with their
    effects, whatever Faust's private map holds (empty here, as in the report)."""
    envelopes = synthetic_envelopes(1_200, seed=3)
    offsets = produce(settings, envelopes)
    stream = create_app(settings)
    assert not getattr(stream.app.consumer, "_committed_offset", {})  # the reported condition
    commit(settings, stream, offsets[600])
    handled: list[int] = []
    stream.on_change.append(lambda partition, patient, changes: handled.append(len(changes)))
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=offsets[900]))
    assert stream.folded_to[PARTITION] == offsets[900]
    assert state_digest(stream) == fold(envelopes[:900])
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in stream.rebuilds] == [
        {"partition": PARTITION, "patients": len({e.patient for e in envelopes[:600]}),
         "envelopes": 600, "to": offsets[600], "from": 0, "checkpoint": "no checkpoint"}
    ]  # fmt: skip
    assert stream.gaps == [{"partition": PARTITION, "from": offsets[600], "to": offsets[900]}]
    assert sum(handled) == 300  # the gap's messages had their effects (hooks), one each


def test_a_control_message_first_rebuilds_to_the_committed_offset(settings: Settings) -> None:
    envelopes = synthetic_envelopes(800, seed=4)
    offsets = produce(settings, envelopes)
    stream = create_app(settings)
    commit(settings, stream, offsets[500])
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=None))
    assert stream.folded_to[PARTITION] == offsets[500]
    assert state_digest(stream) == fold(envelopes[:500])


def test_never_committed_means_the_stream_reads_everything(settings: Settings) -> None:
    produce(settings, synthetic_envelopes(50, seed=5))
    stream = create_app(settings)
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=None))
    assert stream.folded_to[PARTITION] == 0
    assert stream.store.counts()["resources"] == 0


def test_after_a_rebalance_the_gap_another_member_processed_is_folded(
    settings: Settings,
) -> None:
    envelopes = synthetic_envelopes(1_000, seed=6)
    offsets = produce(settings, envelopes)
    stream = create_app(settings)

    async def scenario() -> None:
        await stream.ensure_partition(PARTITION, facts_offset=offsets[300])
        # the partition goes to another member, which processes 300..700, and comes back
        stream.on_assigned({PARTITION})
        await stream.ensure_partition(PARTITION, facts_offset=offsets[700])

    asyncio.run(scenario())
    assert stream.folded_to[PARTITION] == offsets[699] + 1
    assert state_digest(stream) == fold(envelopes[:700])


def test_a_partition_not_assigned_back_is_dropped(settings: Settings) -> None:
    envelopes = synthetic_envelopes(200, seed=8)
    offsets = produce(settings, envelopes)
    stream = create_app(settings)
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=offsets[-1] + 1))
    assert stream.store.counts()["resources"] > 0
    stream.on_assigned({0, 1})
    assert stream.store.counts()["resources"] == 0
    assert PARTITION not in stream.folded_to


def test_a_rebuild_puts_back_what_the_cohort_table_lacks_of_its_topic(
    settings: Settings,
) -> None:
    """The chaos suite saw a restarted worker write a cohort record with ``change`` 1 over one
    with ``change`` 2 that its topic held: its table lacked what Faust had reported restored,
    and every reader ignored the new record (a silent stale cohort). A rebuild now checks each
    published table against its topic for the partition: missing or different values are put
    back, deleted ones removed, before anything is evaluated there."""
    topic = settings.topic(COHORT)
    ensure_topics(settings.kafka_bootstrap_servers, settings.topic_prefix)
    records = {
        f"t1|p-{i}": {"schema": "concierge.cohort/1", "trial": "t1", "patient": f"p-{i}",
                      "member": i % 2 == 0, "steps": "P", "partition": PARTITION, "change": 2}
        for i in range(5)
    }  # fmt: skip
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all"})
    for key, value in records.items():
        producer.produce(topic, key=key.encode(), value=orjson.dumps(value), partition=PARTITION)
    producer.produce(
        topic, key=b"t1|p-gone", value=orjson.dumps({"change": 1}), partition=PARTITION
    )
    producer.produce(topic, key=b"t1|p-gone", value=None, partition=PARTITION)
    assert producer.flush(30) == 0
    stream = create_app(settings)
    store = stream.cohort_table.data
    store["t1|p-0"] = {**records["t1|p-0"], "change": 1}  # stale: an older record
    store["t1|p-gone"] = {"change": 1}  # deleted on the topic
    # p-1 .. p-4 missing, as after the reported restart
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=None))
    assert {k: store.get(k) for k in [*records, "t1|p-gone"]} == {**records, "t1|p-gone": None}


def checkpoint_at(settings: Settings, envelopes: list[ResourceFacts], offset: int) -> None:
    """A worker's checkpoint of PARTITION reflecting the messages before ``offset`` (written
    as the worker writes it, from a state folded to there)."""
    stream = create_app(settings)
    stream._load_partition(PARTITION, 0)  # opens the checkpoints with the worker's identity
    assert stream.checkpoints is not None
    state = patient_state.fold(envelopes)
    patients: dict[str, dict[str, object]] = {}
    for key, entry in state.items():
        patient, resource = patient_state.split_key(key)
        patients.setdefault(patient, {})[resource] = entry
    batch = stream.checkpoints.encode(PARTITION, offset, patients, set(patients))
    stream.checkpoints.write(PARTITION, batch)
    stream.checkpoints.close_all()


def test_a_checkpoint_is_loaded_and_only_the_tail_is_read(settings: Settings) -> None:
    envelopes = synthetic_envelopes(1_000, seed=9)
    offsets = produce(settings, envelopes)
    checkpoint_at(settings, envelopes[:400], offsets[400])
    stream = create_app(settings)
    commit(settings, stream, offsets[700])
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=offsets[700]))
    assert state_digest(stream) == fold(envelopes[:700])
    (record,) = stream.rebuilds
    assert record["checkpoint"] == "loaded" and record["from"] == offsets[400]
    assert record["envelopes"] == 300 and record["to"] == offsets[700]
    # the patients changed in the tail are the ones the next checkpoint writes
    before, after = patient_state.fold(envelopes[:400]), patient_state.fold(envelopes[:700])
    moved = {patient_state.split_key(k)[0] for k in after if before.get(k) != after[k]}
    assert moved and stream.store.changed[PARTITION] == moved


@pytest.mark.parametrize(
    ("checkpoint", "committed", "reason"),
    [
        (1_500, 700, "past the topic's end"),  # the topic was deleted and created again
        (800, 700, "past the group's committed offset"),
    ],
)
def test_a_checkpoint_past_the_topic_or_the_group_is_refused_and_rebuilt_from_0(
    settings: Settings, checkpoint: int, committed: int, reason: str
) -> None:
    envelopes = synthetic_envelopes(1_000, seed=10)
    offsets = produce(settings, envelopes)
    checkpoint_at(settings, envelopes, offsets[0] + checkpoint)
    stream = create_app(settings)
    commit(settings, stream, offsets[committed])
    asyncio.run(stream.ensure_partition(PARTITION, facts_offset=offsets[committed]))
    assert state_digest(stream) == fold(envelopes[:committed])
    (record,) = stream.rebuilds
    assert reason in record["checkpoint"] and record["from"] == 0
    assert record["envelopes"] == committed
    # the refused checkpoint is gone; every patient goes into the next one
    assert stream.store.changed[PARTITION] == set(stream.store.patients(PARTITION))
