"""The audit chain (core.audit): HMAC per record under a key outside the database, key rotation,
adoption of unkeyed records as a legacy prefix, the head row, and the comparison with anchors.

What each attack looks like to the two checks:

* a record changed (or the chain rebuilt) *without* the key: ``verify`` finds the first record
  whose HMAC does not hold;
* the chain rebuilt *with* the key, or the newest records cut off with the head row moved back:
  ``verify`` cannot tell, the anchors can (``check_anchors``).

The anchors here are made in memory (``sign_anchor``); ``tests/integration/test_audit_anchors.py``
publishes and reads them on the real broker.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from core import db
from core.audit import (
    GENESIS,
    SCHEMA,
    AuditError,
    AuditKeys,
    AuditLog,
    Head,
    audit_table,
    head_table,
    key_id,
    legacy_digest,
    record_mac,
)
from core.contracts.audit import AuditAnchor
from core.settings import ConfigurationError, Settings, get_settings
from tests.audit_helpers import FIELDS, rebuild, truncate
from tests.recruitment_helpers import BACKENDS, fresh_database

KEY = AuditKeys(b"a" * 32)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, migrate=False) as fresh:
        yield fresh


def _fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(f"user{i % 3}", "clinician", "Org", f"GET /v1/r/{i}", {"i": i})


def _anchor(log: AuditLog, published_at: str = "2026-12-07T10:00:00+00:00") -> AuditAnchor:
    return log.sign_anchor(log.head(), published_at, "test:1")


# ------------------------------------------------------------------------------ the chain


def test_records_carry_an_hmac_under_the_key_and_its_id(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 5)
    result = log.verify()
    assert (result.ok, result.records, result.legacy_records, result.head_seq) == (True, 5, 0, 5)
    rows = list(log.records())
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert {r["key_id"] for r in rows} == {key_id(KEY.current)}
    assert rows[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    first = rows[0]
    assert first["hash"] == record_mac(
        KEY.current, GENESIS, 1, *(first[f] for f in FIELDS), identifier=first["key_id"]
    )
    # not the unkeyed hash: whoever lacks the key cannot compute it
    assert first["hash"] != legacy_digest(GENESIS, 1, *(first[f] for f in FIELDS))
    head = log.head()
    assert (head.seq, head.hash, head.at) == (5, rows[-1]["hash"], rows[-1]["at"])
    # the same database under another key: every record is foreign to it
    other = AuditLog(url, AuditKeys(b"b" * 32)).verify()
    assert not other.ok and other.first_bad_seq == 1 and "unknown key" in (other.reason or "")


@hypothesis_settings(max_examples=30)
@given(
    n=st.integers(1, 8),
    data=st.data(),
    field=st.sampled_from(FIELDS),
    value=st.text(min_size=1, max_size=20),
)
def test_any_change_without_the_key_is_found_at_its_record(
    n: int, data: st.DataObject, field: str, value: str
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        log = AuditLog(f"sqlite:///{folder}/audit.sqlite", KEY)
        _fill(log, n)
        seq = data.draw(st.integers(1, n))
        before = next(r for r in log.records() if r["seq"] == seq)
        if before[field] == value:
            value += "x"
        with log.engine.begin() as conn:
            conn.execute(
                sa.update(audit_table).where(audit_table.c.seq == seq).values({field: value})
            )
        result = log.verify()
        assert not result.ok and result.first_bad_seq == seq
        assert "altered" in (result.reason or "")
        log.engine.dispose()


def test_a_chain_rebuilt_without_the_key_is_found(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 6)
    rebuild(log, b"guessed-key-guessed-key-guessed!", {3: {"detail": '{"i":99}'}})
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3 and "unknown key" in (result.reason or "")


def test_a_chain_rebuilt_as_unkeyed_records_is_found(url: str) -> None:
    """Downgrading to the old unkeyed format is no way round the key."""
    log = AuditLog(url, KEY)
    _fill(log, 4)
    rows = list(log.records())
    prev = GENESIS
    with log.engine.begin() as conn:
        for row in rows:
            digest = legacy_digest(prev, row["seq"], *(row[f] for f in FIELDS))
            conn.execute(
                sa.update(audit_table)
                .where(audit_table.c.seq == row["seq"])
                .values(prev_hash=prev, hash=digest, key_id=None)
            )
            prev = digest
        conn.execute(sa.update(head_table).values(hash=prev))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 1 and "legacy" in (result.reason or "")


def test_records_removed_reordered_or_added_past_the_head_are_found(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 6)
    with log.engine.begin() as conn:  # the newest two cut off, the head row left as it was
        conn.execute(sa.delete(audit_table).where(audit_table.c.seq > 4))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 5 and "removed" in (result.reason or "")
    with log.engine.begin() as conn:  # one from the middle
        conn.execute(sa.delete(audit_table).where(audit_table.c.seq == 2))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3 and "missing" in (result.reason or "")


def test_a_missing_head_row_stops_appends_and_fails_verification(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 2)
    with log.engine.begin() as conn:
        conn.execute(sa.delete(head_table))
    with pytest.raises(AuditError, match="head row"):
        log.append("x", "admin", "O", "GET /v1/x")
    result = log.verify()
    assert not result.ok and "head row" in (result.reason or "")


def test_keys_rotate_old_records_verify_with_a_retired_key(url: str) -> None:
    old, new = b"o" * 32, b"n" * 32
    _fill(AuditLog(url, AuditKeys(old)), 3)
    rotated = AuditLog(url, AuditKeys(new, retired=(old,)))
    _fill(rotated, 2, start=3)
    assert [r["key_id"] for r in rotated.records()] == [key_id(old)] * 3 + [key_id(new)] * 2
    assert rotated.verify().ok and rotated.verify().records == 5
    forgotten = AuditLog(url, AuditKeys(new)).verify()
    assert not forgotten.ok and forgotten.first_bad_seq == 1
    assert key_id(old) in (forgotten.reason or "") and "RETIRED" in (forgotten.reason or "")


def test_key_ids_name_keys_without_revealing_them() -> None:
    assert key_id(b"k" * 32) == key_id(b"k" * 32) != key_id(b"j" * 32)
    assert key_id(b"k" * 32).startswith("k-") and len(key_id(b"k" * 32)) == 18
    with pytest.raises(ValueError, match="32 bytes"):
        AuditKeys(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        AuditKeys(b"k" * 32, retired=(b"short",))


# ------------------------------------------------------------------- adopting an old chain


def _legacy_records(url: str, n: int) -> None:
    """Records as revision 0001's code wrote them: unkeyed SHA-256."""
    db.upgrade(SCHEMA, url, "0001")
    engine = db.make_engine(url)
    prev = GENESIS
    try:
        with engine.begin() as conn:
            for seq in range(1, n + 1):
                values = {
                    "seq": seq,
                    "at": f"2026-11-0{seq}T09:00:00+00:00",
                    "actor": "sponsor:Acme",
                    "role": "sponsor",
                    "org": "Acme",
                    "action": "POST /v1/feasibility/ask",
                    "detail": json.dumps({"status": 200}),
                }
                digest = legacy_digest(prev, *values.values())  # type: ignore[arg-type]
                conn.execute(
                    sa.table("audit_log", *(sa.column(c) for c in [*values, "prev_hash", "hash"]))
                    .insert()
                    .values(**values, prev_hash=prev, hash=digest)
                )
                prev = digest
    finally:
        engine.dispose()


def test_unkeyed_records_are_adopted_as_a_legacy_prefix_sealed_by_the_first_keyed_one(
    url: str,
) -> None:
    _legacy_records(url, 3)
    log = AuditLog(url, KEY)  # migrates to 0002
    result = log.verify()
    assert (result.ok, result.records, result.legacy_records) == (True, 3, 3)
    assert log.head().legacy_records == 3 and log.head().seq == 3
    _fill(log, 2)
    rows = list(log.records())
    assert [r["key_id"] is None for r in rows] == [True, True, True, False, False]
    assert rows[3]["prev_hash"] == rows[2]["hash"]  # the first keyed record seals the prefix
    assert log.verify().ok and log.verify().legacy_records == 3
    # a legacy record changed and the unkeyed prefix rebuilt: the seal no longer fits
    prev = rows[0]["hash"]
    with log.engine.begin() as conn:
        for row in rows[1:3]:
            row["org"] = "Someone else"
            digest = legacy_digest(prev, row["seq"], *(row[f] for f in FIELDS))
            conn.execute(
                sa.update(audit_table)
                .where(audit_table.c.seq == row["seq"])
                .values(org=row["org"], prev_hash=prev, hash=digest)
            )
            prev = digest
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 4 and "prev_hash" in (result.reason or "")


def test_a_keyed_record_turned_unkeyed_after_the_prefix_is_found(url: str) -> None:
    _legacy_records(url, 2)
    log = AuditLog(url, KEY)
    _fill(log, 2)
    rows = list(log.records())
    row = rows[2]
    digest = legacy_digest(row["prev_hash"], row["seq"], *(row[f] for f in FIELDS))
    with log.engine.begin() as conn:
        conn.execute(
            sa.update(audit_table).where(audit_table.c.seq == 3).values(hash=digest, key_id=None)
        )
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3 and "legacy" in (result.reason or "")


# ------------------------------------------------------------------------------- anchors


def test_anchors_find_a_chain_rebuilt_with_the_key(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 5)
    early = _anchor(log, "2026-12-07T10:00:00+00:00")
    _fill(log, 5, start=5)
    late = _anchor(log, "2026-12-07T10:00:10+00:00")
    check = log.check_anchors([early, late])
    assert check.ok and check.anchors == 2 and check.unanchored_records == 0, check.problems
    assert check.latest is not None and check.latest["seq"] == 10
    rebuild(log, KEY.current, {7: {"detail": '{"i":"rewritten"}'}})
    assert log.verify().ok  # the database alone cannot tell: the key was used
    check = log.check_anchors([early, late])
    assert not check.ok and check.first_bad_seq == 10
    assert check.problems == [
        "record 10 is not the record anchored at 2026-12-07T10:00:10+00:00: the chain was "
        "rewritten from there or before"
    ]


def test_anchors_find_the_newest_records_cut_off(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 8)
    anchor = _anchor(log)
    _fill(log, 2, start=8)  # not anchored yet: covered by their HMACs only
    assert log.check_anchors([anchor]).unanchored_records == 2
    truncate(log, 6)
    assert log.verify().ok  # consistent in itself, head row moved back
    check = log.check_anchors([anchor])
    assert not check.ok and check.first_bad_seq == 7 and check.database_seq == 6
    assert "the database ends at record 6: the newest records were removed" in check.problems[0]


def test_anchors_not_signed_with_the_key_or_not_anchors_at_all_are_problems(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 3)
    good = _anchor(log)
    forged = good.model_copy(update={"seq": 2})  # the signature no longer covers it
    unknown = AuditLog(url, AuditKeys(b"z" * 32)).sign_anchor(log.head(), "t", "p")
    check = log.check_anchors([good, forged, unknown, "partition 0 offset 7: not JSON"])
    assert not check.ok and check.anchors == 1
    assert len(check.problems) == 3
    assert "bad signature" in check.problems[0] and "unknown key" in check.problems[1]
    assert check.problems[2] == "not an anchor: partition 0 offset 7: not JSON"


def test_other_chains_anchors_are_not_ours_and_no_anchor_at_all_fails(
    url: str, tmp_path: Path
) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 2)
    theirs = _anchor(log).model_copy(update={"chain": "another-deployment"})
    check = log.check_anchors([theirs])
    assert not check.ok and check.other_chains == 1 and check.anchors == 0
    assert "no anchor of chain" in check.problems[0]
    empty = AuditLog(f"sqlite:///{tmp_path / 'empty.sqlite'}", KEY)
    assert empty.check_anchors([]).ok  # nothing recorded, nothing to anchor
    with pytest.raises(AuditError, match="nothing to anchor"):
        _anchor(empty)


def test_anchor_problems_are_listed_up_to_a_limit_then_counted(url: str) -> None:
    log = AuditLog(url, KEY)
    _fill(log, 30)
    anchors = []
    for seq in range(1, 31):
        with log.engine.begin() as conn:  # the head as it was at each record
            row = conn.execute(sa.select(audit_table).where(audit_table.c.seq == seq)).one()
        at_seq = Head(log.head().chain, seq, row.hash, 0, row.at)
        anchors.append(log.sign_anchor(at_seq, f"2026-12-07T10:{seq:02}", "p"))
    assert log.check_anchors(anchors, batch_size=7).ok
    rebuild(log, KEY.current, {1: {"actor": "nobody"}})
    check = log.check_anchors(anchors, batch_size=7)
    assert check.first_bad_seq == 1 and check.problems[-1] == "... and 10 more"
    assert len(check.problems) == 21


# ----------------------------------------------------------------------- configuration


def test_the_audit_key_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        audit_key="c" * 40,  # type: ignore[arg-type]
        audit_retired_keys=f"{'d' * 32}, {'e' * 33}",  # type: ignore[arg-type]
    )
    keys = AuditKeys.from_settings(settings)
    assert keys.current == b"c" * 40 and keys.retired == (b"d" * 32, b"e" * 33)
    assert not keys.development and AuditKeys.from_settings(Settings()).development
    for name, value, expected in [
        ("CONCIERGE_AUDIT_KEY", "short", "CONCIERGE_AUDIT_KEY: must be at least 32 bytes"),
        ("CONCIERGE_AUDIT_RETIRED_KEYS", "x" * 32 + ",short", "CONCIERGE_AUDIT_RETIRED_KEYS"),
        ("CONCIERGE_AUDIT_ANCHOR_SECONDS", "soon", "CONCIERGE_AUDIT_ANCHOR_SECONDS='soon'"),
        ("CONCIERGE_AUDIT_ANCHOR_SECONDS", "-1", "CONCIERGE_AUDIT_ANCHOR_SECONDS='-1'"),
    ]:
        get_settings.cache_clear()
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ConfigurationError) as error:
                get_settings()
        message = str(error.value)
        assert expected in message and "\n" not in message
        assert "short" not in message or name == "CONCIERGE_AUDIT_ANCHOR_SECONDS"  # secrets unsaid
    get_settings.cache_clear()
