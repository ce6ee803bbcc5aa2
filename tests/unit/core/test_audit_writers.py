"""Two processes append to one audit log (the API and the stream worker's state pages share
``CONCIERGE_AUDIT_URL``): on SQLite every append must succeed and the chain stay whole.

Found while giving the worker's pages their audit records: two processes appending at once
read the same last record and one of them failed (39 and 53 of 300 appends each).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from core.audit import AuditLog

APPENDS = 150


def append_many(url: str, name: str, failures: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    log = AuditLog(url)
    failed = 0
    for i in range(APPENDS):
        try:
            log.append(name, "admin", "site-ops", "GET /state/digest", {"i": i})
        except Exception:  # counted: the test fails on any
            failed += 1
    failures.put((name, failed))


def test_appends_from_two_processes_all_land_in_one_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    AuditLog(url)  # migrated once, before the writers start
    context = multiprocessing.get_context("spawn")
    failures: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    writers = [
        context.Process(target=append_many, args=(url, f"writer-{k}", failures)) for k in range(2)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    assert sorted(failures.get(timeout=5) for _ in writers) == [("writer-0", 0), ("writer-1", 0)]
    verified = AuditLog(url).verify()
    assert verified.ok and verified.records == 2 * APPENDS
