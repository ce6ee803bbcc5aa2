"""The audit log's group commit (core.audit): ``append_many`` chains a batch exactly as appends
one at a time would, and the ``AuditWriter`` thread answers each record's future only once the
record is committed, writing whatever queued meanwhile in one transaction."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.audit import AuditEntry, AuditError, AuditKeys, AuditLog, AuditWriter, head_table
from tests.recruitment_helpers import BACKENDS, fresh_database

KEY = AuditKeys(b"g" * 32)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, migrate=False) as fresh:
        yield fresh


def test_a_batch_is_chained_after_single_appends_and_verifies(url: str) -> None:
    log = AuditLog(url, KEY)
    assert log.append("a", "clinician", "Org", "GET /v1/x", {"i": 0}) == 1
    seqs = log.append_many(
        [AuditEntry(f"u{i}", "sponsor", "Org", f"GET /v1/y/{i}", {"i": i}) for i in range(1, 6)]
    )
    assert seqs == [2, 3, 4, 5, 6]
    assert log.append("b", "admin", "Site", "GET /v1/z") == 7
    assert log.append_many([]) == []
    rows = list(log.records())
    assert [r["seq"] for r in rows] == list(range(1, 8))
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    assert [r["actor"] for r in rows] == ["a", "u1", "u2", "u3", "u4", "u5", "b"]
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
    result = log.verify()
    assert result.ok and result.head_seq == 7


def test_the_writer_commits_queued_records_together_and_each_future_gets_its_seq(
    url: str,
) -> None:
    log = AuditLog(url, KEY)
    writer = AuditWriter(log)
    with log._lock:  # the writer waits here, so the records queue up behind it
        futures = [
            writer.submit(f"u{i}", "clinician", "Org", f"GET /v1/r/{i}", {"i": i})
            for i in range(40)
        ]
        assert not any(f.done() for f in futures)  # nothing answered before it is committed
    seqs = [f.result(timeout=30) for f in futures]
    assert seqs == list(range(1, 41))  # queue order is chain order
    assert writer.records == 40 and writer.batches <= 2
    rows = {r["seq"]: r for r in log.records()}
    assert all(rows[s]["action"] == f"GET /v1/r/{i}" for i, s in enumerate(seqs))
    assert log.verify().ok
    writer.close()


def test_many_threads_at_once_all_land_once_and_the_chain_verifies(url: str) -> None:
    log = AuditLog(url, KEY)
    writer = AuditWriter(log)

    def one(i: int) -> int:
        return writer.submit(f"u{i}", "clinician", "Org", f"GET /v1/t/{i}").result(timeout=60)

    with ThreadPoolExecutor(16) as pool:
        seqs = list(pool.map(one, range(200)))
    assert sorted(seqs) == list(range(1, 201))
    assert writer.batches <= writer.records == 200
    result = log.verify()
    assert result.ok and result.records == 200
    writer.close()


def test_a_failed_write_fails_every_waiter_and_close_writes_what_is_queued(url: str) -> None:
    log = AuditLog(url, KEY)
    writer = AuditWriter(log)
    assert writer.submit("a", "clinician", "Org", "GET /v1/a").result(timeout=30) == 1
    with log.engine.begin() as conn:  # the database altered under the writer
        saved = dict(conn.execute(sa.select(head_table)).mappings().one())
        conn.execute(head_table.delete())
    with log._lock:
        failing = [writer.submit("b", "clinician", "Org", f"GET /v1/b/{i}") for i in range(3)]
    for future in failing:
        with pytest.raises(AuditError):
            future.result(timeout=30)
    with log.engine.begin() as conn:
        conn.execute(sa.insert(head_table), [saved])  # put back as it was
    with log._lock:
        queued = [writer.submit("c", "clinician", "Org", f"GET /v1/c/{i}") for i in range(3)]
        closing = ThreadPoolExecutor(1).submit(writer.close)
    closing.result(timeout=30)
    assert [f.result(timeout=0) for f in queued] == [2, 3, 4]
    with pytest.raises(AuditError):
        writer.submit("d", "clinician", "Org", "GET /v1/d")
    assert log.verify().ok
