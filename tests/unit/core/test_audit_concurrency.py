"""Concurrent writers keep one unbroken audit chain: several processes, each with several
threads, append to the same audit log at once, on SQLite and on the PostgreSQL that
``scripts/test.sh`` starts. Every record lands exactly once, numbers run 1..N without a gap or a
duplicate, no two records name the same predecessor (no fork), and the chain verifies.

The append holds the head row for its whole transaction (``SELECT ... FOR UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite); before that the numbering was a ``threading.Lock``,
which two processes do not share.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.audit import AuditKeys, AuditLog
from tests.recruitment_helpers import BACKENDS, fresh_database

PROCESSES = 4
THREADS = 3
APPENDS = 15
KEY = b"concurrency-test-key-0123456789abcdef"


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, migrate=False) as fresh:
        AuditLog(fresh, AuditKeys(KEY)).engine.dispose()  # migrated once, before the race
        yield fresh


def _writer(url: str, process: int, start: Any) -> None:
    log = AuditLog(url, AuditKeys(KEY))
    # every process imported and connected: they begin together (a spawned process takes
    # seconds to import; with an event set at once, the first one up could write all its
    # records before the last one started, and nothing would overlap)
    start.wait(120)

    errors: list[BaseException] = []

    def appends(thread: int) -> None:
        try:
            for i in range(APPENDS):
                log.append(f"p{process}", "source", "Org", "POST /v1/x", {"t": thread, "i": i})
        except BaseException as exc:  # reported by the exit status below
            errors.append(exc)
            raise

    threads = [threading.Thread(target=appends, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.engine.dispose()
    if errors:
        raise SystemExit(f"{len(errors)} appends failed: {errors[0]!r}")


@pytest.mark.slow
def test_processes_and_threads_appending_at_once_keep_one_chain(url: str) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    processes = [context.Process(target=_writer, args=(url, p, start)) for p in range(PROCESSES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [p.exitcode for p in processes] == [0] * PROCESSES

    log = AuditLog(url, AuditKeys(KEY))
    records = list(log.records())
    total = PROCESSES * THREADS * APPENDS
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    assert len({r["prev_hash"] for r in records}) == total  # no fork
    written = Counter((r["actor"], r["detail"]) for r in records)
    assert len(written) == total and set(written.values()) == {1}  # each exactly once
    result = log.verify()
    assert result.ok and result.records == total, result
    assert log.head().seq == total
    # the processes really overlapped: each one's records are interleaved with the others'
    runs = sum(1 for a, b in itertools.pairwise(records) if a["actor"] != b["actor"])
    assert runs >= PROCESSES
