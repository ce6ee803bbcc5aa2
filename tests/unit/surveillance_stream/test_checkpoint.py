"""Local checkpoints of patient state (surveillance_stream/checkpoint.py) on real RocksDB: what
is written comes back, a checkpoint of something else is refused with its reason, a damaged one
is refused, and a SIGKILL in the middle of a checkpoint write leaves the previous checkpoint or
the new one, never a mixture."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surveillance_stream.checkpoint import (
    CheckpointRefused,
    Checkpoints,
    Identity,
    key_fingerprint,
)
from surveillance_stream.store import PatientStore

IDENTITY = Identity("t.facts", 6, key_fingerprint(b"key-one"), "topic-id-1")


def entry(seq: int, code: str) -> dict[str, object]:
    return {
        "patient": "x",
        "key": "Condition/1",
        "seq": seq,
        "retracted": False,
        "facts": [{"kind": "condition", "code": code}],
        "provenance": {"source": "s"},
    }


def test_a_checkpoint_comes_back_as_written(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path / "cp", IDENTITY)
    patients = {"a": {"Condition/1": entry(1, "E11")}, "b": {"Condition/2": entry(2, "I10")}}
    store.write(2, store.encode(2, 40, patients, {"a", "b"}))
    # a later checkpoint with one patient changed
    patients["a"]["Condition/1"] = entry(3, "E10")
    store.write(2, store.encode(2, 55, patients, {"a"}))
    store.close_all()
    loaded = Checkpoints(tmp_path / "cp", IDENTITY).load(2)
    assert loaded.offset == 55
    assert loaded.patients == patients
    assert time.time() - loaded.written_at < 60


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        (Identity("t.facts", 6, key_fingerprint(b"key-two"), "topic-id-1"), "pseudonym key"),
        (
            Identity("t.facts", 12, key_fingerprint(b"key-one"), "topic-id-1"),
            "6 partitions, not 12",
        ),
        (Identity("u.facts", 6, key_fingerprint(b"key-one"), "topic-id-1"), "made from t.facts"),
        (Identity("t.facts", 6, key_fingerprint(b"key-one"), "topic-id-2"), "created again"),
    ],
)
def test_a_checkpoint_of_something_else_is_refused(
    tmp_path: Path, other: Identity, reason: str
) -> None:
    store = Checkpoints(tmp_path / "cp", IDENTITY)
    store.write(0, store.encode(0, 9, {"a": {"k": entry(1, "E11")}}, {"a"}))
    store.close_all()
    with pytest.raises(CheckpointRefused, match=reason):
        Checkpoints(tmp_path / "cp", other).load(0)


def test_missing_and_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path / "cp", IDENTITY)
    with pytest.raises(CheckpointRefused, match="no checkpoint"):
        store.load(3)
    store.write(3, store.encode(3, 9, {"a": {"k": entry(1, "E11")}}, {"a"}))
    store.close_all()
    # every file of the database overwritten with garbage
    for path in (tmp_path / "cp" / "p3").iterdir():
        if path.is_file():
            path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointRefused, match="unreadable"):
        Checkpoints(tmp_path / "cp", IDENTITY).load(3)
    # discarding it leaves room for a new one
    again = Checkpoints(tmp_path / "cp", IDENTITY)
    again.discard(3)
    with pytest.raises(CheckpointRefused, match="no checkpoint"):
        again.load(3)
    again.write(3, again.encode(3, 1, {"b": {"k": entry(1, "E11")}}, {"b"}))
    assert again.load(3).patients == {"b": {"k": entry(1, "E11")}}


def test_undecodable_metadata_is_refused(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path / "cp", IDENTITY)
    store.write(1, store.encode(1, 9, {"a": {"k": entry(1, "E11")}}, {"a"}))
    store._db(1)[b"meta"] = b"{not json"
    store.close_all()
    with pytest.raises(CheckpointRefused, match="unreadable"):
        Checkpoints(tmp_path / "cp", IDENTITY).load(1)


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.lists(
            st.tuples(st.sampled_from("abcdef"), st.sampled_from(["k1", "k2"]), st.integers(0, 9)),
            max_size=6,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_checkpoint_plus_changes_equals_the_state(
    tmp_path_factory: pytest.TempPathFactory, steps: list[list[tuple[str, str, int]]]
) -> None:
    """Writing only the patients changed since the last checkpoint gives the whole state back:
    the incremental path agrees with a full copy."""
    directory = tmp_path_factory.mktemp("cp")
    store = PatientStore()
    store.install(0, {})
    checkpoints = Checkpoints(directory, IDENTITY)
    offset = 0
    for step in steps:
        for patient, key, seq in step:
            store.apply(0, {"patient": patient, "key": key, "seq": seq, "facts": []})
            offset += 1
        checkpoints.write(0, checkpoints.encode(0, offset, store.patients(0), store.changed[0]))
        store.changed[0] = set()
    checkpoints.close_all()
    loaded = Checkpoints(directory, IDENTITY).load(0)
    assert loaded.offset == offset
    assert loaded.patients == store.patients(0)


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from surveillance_stream.checkpoint import Checkpoints, Identity, key_fingerprint
    identity = Identity("t.facts", 6, key_fingerprint(b"key-one"), None)
    store = Checkpoints(Path(sys.argv[1]), identity)
    try:
        offset = store.load(0).offset
    except Exception:
        offset = 0
    patients = [f"patient-{i}" for i in range(4000)]
    print("ready", flush=True)
    while True:
        offset += 1
        # every patient rewritten in every checkpoint, each holding the checkpoint's offset:
        # a batch applied in part would show patients with two different offsets
        state = {p: {"k": {"seq": offset, "pad": "x" * 200}} for p in patients}
        store.write(0, store.encode(0, offset, state, patients))
    """
)


def test_a_sigkill_during_checkpoint_writes_leaves_one_whole_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "cp"
    rng = random.Random(15)
    offsets: list[int] = []
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.2, 1.2))  # a batch of 4,000 patients takes tens of ms
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        loaded = Checkpoints(directory, Identity("t.facts", 6, key_fingerprint(b"key-one"))).load(0)
        seqs = {entries["k"]["seq"] for entries in loaded.patients.values()}
        assert len(loaded.patients) == 4000
        assert seqs == {loaded.offset}, f"a partly applied checkpoint: {sorted(seqs)[:5]}"
        offsets.append(loaded.offset)
    assert offsets == sorted(offsets) and offsets[-1] > offsets[0]
    # the metadata names what it was folded from (and nothing of the key)
    db = Checkpoints(directory, IDENTITY)._db(0)
    meta = orjson.loads(db[b"meta"])
    assert meta["key"] == key_fingerprint(b"key-one") and "key-one" not in str(meta)
