"""The standby's fold (surveillance_stream/standby.py) on real RocksDB, without Kafka: messages
are handed to it as its consumer would, and the group's committed offsets as its refresh reads
them. A standby checkpoint is written only at a committed offset, and what it holds there equals
the fold of every message before that offset (the recovery path's own fold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surveillance_stream.checkpoint import Checkpoints, Identity, key_fingerprint
from surveillance_stream.standby import Standby
from surveillance_stream.store import PatientStore

IDENTITY = Identity("t.facts", 6, key_fingerprint(b"key-one"), "topic-id-1")
PARTITION = 3


def envelope(patient: str, resource: int, seq: int) -> dict[str, Any]:
    return {
        "patient": patient,
        "key": f"Condition/{resource}",
        "seq": seq,
        "retracted": False,
        "facts": [{"kind": "condition", "code": f"E{seq}"}],
        "provenance": {"source": "s"},
    }


def standby_over(directory: Path) -> tuple[Standby, Checkpoints]:
    checkpoints = Checkpoints(directory, IDENTITY)
    standby = Standby("unused:9092", "t.facts", "group", lambda: checkpoints, 0.0)
    standby.follow({PARTITION})
    return standby, checkpoints


messages_strategy = st.lists(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(1, 3), st.integers(1, 50)),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=messages_strategy, data=st.data())
def test_a_standby_checkpoint_is_the_fold_up_to_a_committed_offset(
    tmp_path_factory: Any, batches: list[list[tuple[str, int, int]]], data: st.DataObject
) -> None:
    directory = tmp_path_factory.mktemp("standby")
    messages = [
        # a batch message holds one patient's envelopes; plain lists of envelopes here are
        # encoded as the batch schema would carry them
        orjson.dumps({"schema": "concierge.factbatch/1", "envelopes": [envelope(*e) for e in b]})
        for b in batches
    ]
    standby, checkpoints = standby_over(directory)
    assert standby._open(PARTITION, 0, len(messages), 0) == 0
    # the group commits in steps, never backwards; the consumer reads ahead of it in chunks
    commits = sorted(data.draw(st.lists(st.integers(0, len(messages)), max_size=6)))
    read = 0
    written: list[int] = []
    for committed in [*commits, len(messages)]:
        standby._targets({PARTITION: committed}, {PARTITION: len(messages)})
        ahead = data.draw(st.integers(read, len(messages)))
        standby._take((PARTITION, offset, messages[offset]) for offset in range(read, ahead))
        read = ahead
        status = standby.status()["partitions"][str(PARTITION)]
        # never folded past, never written past, the committed offset
        assert status["folded_to"] <= committed
        if status["checkpoint"] is not None:
            assert status["checkpoint"] <= committed
            written.append(status["checkpoint"])
    standby._take((PARTITION, offset, messages[offset]) for offset in range(read, len(messages)))
    assert standby.release(PARTITION) == len(messages)
    assert written == sorted(written)
    loaded = checkpoints.load(PARTITION)
    assert loaded.offset == len(messages)
    assert loaded.patients == batch_fold_batches(messages)
    checkpoints.close_all()


def batch_fold_batches(messages: list[bytes]) -> dict[str, dict[str, Any]]:
    store = PatientStore()
    for value in messages:
        for item in orjson.loads(value)["envelopes"]:
            store.apply(PARTITION, item)
    return store.partitions.get(PARTITION, {})


def test_a_standby_resumes_from_the_checkpoint_and_writes_nothing_uncommitted(
    tmp_path: Path,
) -> None:
    messages = [orjson.dumps(envelope("a", 1, seq)) for seq in range(1, 11)]
    standby, checkpoints = standby_over(tmp_path / "cp")
    standby._open(PARTITION, 0, 10, 4)
    standby._take((PARTITION, offset, messages[offset]) for offset in range(10))
    # folded and written up to the committed offset only; the rest is held back
    assert standby.status()["partitions"][str(PARTITION)]["checkpoint"] == 4
    assert standby.release(PARTITION) == 4
    assert checkpoints.load(PARTITION).patients["a"]["Condition/1"]["seq"] == 4
    # followed again (revoked from the worker): from its checkpoint, not from offset 0
    standby.follow({PARTITION})
    assert standby._open(PARTITION, 0, 10, 7) == 4
    standby._take((PARTITION, offset, messages[offset]) for offset in range(4, 10))
    status = standby.status()["partitions"][str(PARTITION)]
    assert status["checkpoint"] == 7
    assert (status["behind_committed"], status["behind_end"]) == (0, 3)
    assert standby.release(PARTITION) == 7
    # a hole in the offsets delivered is not folded over: followed again from the checkpoint
    standby.follow({PARTITION})
    assert standby._open(PARTITION, 0, 10, 9) == 7
    standby._take((PARTITION, offset, messages[offset]) for offset in (7, 9))
    status = standby.status()
    assert status["partitions"] == {} and status["waiting"] == [PARTITION]
    assert "offsets 8 to 8 not delivered" in status["errors"][-1]
    assert checkpoints.load(PARTITION).offset == 7
    assert standby._open(PARTITION, 0, 10, 9) == 7
    standby._take((PARTITION, offset, messages[offset]) for offset in range(7, 10))
    assert standby.release(PARTITION) == 9
    assert checkpoints.load(PARTITION).patients["a"]["Condition/1"]["seq"] == 9
    # a checkpoint past the group's committed offset is refused and followed from the start
    standby.follow({PARTITION})
    assert standby._open(PARTITION, 0, 10, 5) == 0
    assert standby.status()["partitions"][str(PARTITION)]["checkpoint"] is None
    checkpoints.close_all()
