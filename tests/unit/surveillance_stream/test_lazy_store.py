"""Patient state read lazily from the local checkpoint (surveillance_stream/store.py over
surveillance_stream/checkpoint.py, real RocksDB): a store that keeps only a few patients in
memory and reads the others from its checkpoint agrees with a store that holds everything,
through checkpoints, evictions and restarts from the checkpoint plus the tail after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surveillance_stream.checkpoint import Checkpoints, Identity, key_fingerprint
from surveillance_stream.store import PatientStore

IDENTITY = Identity("t.facts", 6, key_fingerprint(b"key-one"), "topic-id-1")


def envelope(patient: str, key: str, seq: int) -> dict[str, Any]:
    return {
        "patient": patient,
        "key": key,
        "seq": seq,
        "retracted": seq % 5 == 0,
        "facts": [] if seq % 5 == 0 else [{"kind": "condition", "code": f"C{seq}"}],
        "provenance": {"source": "s"},
    }


def checkpoint(store: PatientStore, checkpoints: Checkpoints, partition: int, offset: int) -> int:
    """What the worker does (StreamApp.maybe_checkpoint), without Kafka: the changed patients
    and the offset in one batch, then the store may drop patients."""
    changed = store.begin_checkpoint(partition)
    batch = checkpoints.encode(partition, offset, store.patients(partition), changed)
    checkpoints.write(partition, batch)
    store.end_checkpoint(partition, written=True)
    return len(changed)


def restart(directory: Path, log: list[dict[str, Any]], cache: int) -> PatientStore:
    """A new process: open the checkpoint (its metadata only), fold the log after its offset
    over it, install the result backed by it (StreamApp._load_partition without Kafka)."""
    checkpoints = Checkpoints(directory, IDENTITY)
    opened = checkpoints.open(0)
    tail = PatientStore()
    tail.install(0, {}, changed=set(), backing=opened.reader)
    for item in log[opened.offset :]:
        tail.apply(0, item)
    store = PatientStore(cache)
    store.install(0, tail.partitions[0], tail.changed[0], opened.reader)
    store.checkpoints = checkpoints  # type: ignore[attr-defined]  # kept open for the test
    return store


STEP = st.tuples(
    st.sampled_from("abcdefgh"), st.sampled_from(["k1", "k2", "k3"]), st.integers(1, 12)
)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(STEP, max_size=8), min_size=1, max_size=8),
    restarts=st.sets(st.integers(0, 7)),
    cache=st.integers(1, 4),
)
def test_a_lazily_read_store_agrees_with_one_held_in_memory(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[tuple[str, str, int]]],
    restarts: set[int],
    cache: int,
) -> None:
    directory = tmp_path_factory.mktemp("cp")
    whole = PatientStore()  # the reference: every patient in memory, never checkpointed
    whole.install(0, {})
    checkpoints = Checkpoints(directory, IDENTITY)
    lazy = PatientStore(cache)
    lazy.install(0, {}, backing=checkpoints.reader(0))
    log: list[dict[str, Any]] = []
    for number, batch in enumerate(batches):
        for patient, key, seq in batch:
            item = envelope(patient, key, seq)
            log.append(item)
            want = whole.apply(0, item)
            got = lazy.apply(0, item)
            # the change the hooks see (old entry, applied) is the same
            assert (got.old, got.applied) == (want.old, want.applied)
            assert lazy.patient(0, patient) == whole.patient(0, patient)
        # memory holds the changed patients and at most `cache` others
        held = lazy.partitions[0]
        assert lazy.changed[0] <= set(held)
        checkpoint(lazy, checkpoints, 0, len(log))
        assert len(lazy.partitions[0]) <= cache, "a checkpoint lets the store drop patients"
        assert dict(lazy.patients(0)) == dict(whole.patients(0))
        if number in restarts:
            checkpoints.close_all()
            lazy = restart(directory, log, cache)
            checkpoints = lazy.checkpoints  # type: ignore[attr-defined]
            assert dict(lazy.patients(0)) == dict(whole.patients(0))
    assert lazy.digest() == whole.digest()
    assert lazy.counts() == whole.counts()
    checkpoints.close_all()


def test_a_restart_reads_only_the_patients_the_tail_touches(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path / "cp", IDENTITY)
    store = PatientStore(10)
    store.install(0, {}, backing=checkpoints.reader(0))
    log = [envelope(f"p{i}", "k1", 1) for i in range(500)]
    for item in log:
        store.apply(0, item)
    # nothing can be dropped before a checkpoint holds it (write-behind)
    assert len(store.partitions[0]) == 500
    assert checkpoint(store, checkpoints, 0, len(log)) == 500
    assert len(store.partitions[0]) <= 10
    # the tail after the checkpoint: two patients known, one new
    log += [envelope("p7", "k1", 2), envelope("p8", "k2", 1), envelope("new", "k1", 1)]
    checkpoints.close_all()
    restarted = restart(tmp_path / "cp", log, 10)
    assert set(restarted.partitions[0]) == {"p7", "p8", "new"}
    assert restarted.changed[0] == {"p7", "p8", "new"}
    assert restarted.patient(0, "p7")["k1"]["seq"] == 2
    assert restarted.patient(0, "p300")["k1"]["seq"] == 1  # read from the checkpoint
    assert len(restarted.patients(0)) == 501
    restarted.checkpoints.close_all()  # type: ignore[attr-defined]


def test_a_failed_checkpoint_keeps_its_patients_in_memory(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path / "cp", IDENTITY)
    store = PatientStore(1)
    store.install(0, {}, backing=checkpoints.reader(0))
    for i in range(5):
        store.apply(0, envelope(f"p{i}", "k1", 1))
    changed = store.begin_checkpoint(0)
    assert changed == {f"p{i}" for i in range(5)}
    store.trim(0)  # while the batch is being written its patients are not dropped
    assert set(store.partitions[0]) == changed
    store.end_checkpoint(0, written=False)
    assert store.changed[0] == changed
    store.trim(0)
    assert set(store.partitions[0]) == changed  # still changed: nothing on disk holds them
    checkpoints.close_all()
