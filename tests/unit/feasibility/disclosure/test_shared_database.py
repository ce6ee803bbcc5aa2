"""The stores API processes share, on SQLite and on PostgreSQL: each test opens two instances
on one database, as two API processes do (a ``ProcessLock`` takes a PostgreSQL session lock or
an ``flock`` per instance, so two instances in one process contend as two processes would).

Disclosure control (registry, patient numbers, budget, lockout), the sponsor workspace's
histories and the token revocation list hold across them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroaring import FrozenBitMap

from core.db import ProcessLock
from core.revocation import RevocationList
from feasibility.disclosure.budget import BudgetExceeded, LockedOut, QueryBudget
from feasibility.disclosure.registry import NewPublication, PublicationRegistry
from feasibility.workspace.history import AnswerHistory, CohortHistory
from tests.recruitment_helpers import BACKENDS, fresh_database


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, migrate=False) as found:
        yield found


def test_process_lock_excludes_another_holder_on_the_same_database(url: str) -> None:
    first = PublicationRegistry(url)
    second = PublicationRegistry(url)
    got: list[float] = []
    with first.lock:
        with first.lock:  # re-entrant for its holder
            pass

        def wait() -> None:
            with second.lock:
                got.append(1.0)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        assert got == []  # the other "process" waits
    waiter.join(10)
    assert got == [1.0]
    # a lock of another name is independent
    other = ProcessLock(second.engine, "something-else")
    with first.lock, other:
        pass
    first.close()
    second.close()


def test_registry_publications_and_patient_numbers_are_shared(url: str) -> None:
    a, b = PublicationRegistry(url), PublicationRegistry(url)
    numbers_a = a.numbers(["p1", "p2", "p3"])
    numbers_b = b.numbers(["p3", "p4", "p1"])
    assert numbers_b[0] == numbers_a[2] and numbers_b[2] == numbers_a[0]
    assert len({*numbers_a, *numbers_b}) == 4  # p4 got a number of its own
    assert b.numbers(["p2"]) == [numbers_a[1]]

    bits = FrozenBitMap(range(100, 130))
    a.record([NewPublication(bits, 30, "30", False, None)], "Org A", "q1", overlap_hits=0)
    # b records after a without refreshing by hand: record() refreshes under the lock
    near = FrozenBitMap(range(100, 133))
    b.record([NewPublication(near, 35, "35", False, None)], "Org B", "q2", overlap_hits=0)
    a.refresh()
    assert len(a) == len(b) == 2
    ids = sorted(a.entry(i).id for i in (1, 2))
    assert ids == [1, 2]
    match = b.match(FrozenBitMap(range(100, 131)), threshold=10)
    assert match is not None and match.entry.value in (30, 35)
    a.close()
    b.close()


def test_budget_and_lockout_hold_across_instances(url: str) -> None:
    registry = PublicationRegistry(url)
    one = QueryBudget(url, max_queries=3, lockout_after=0)
    two = QueryBudget(url, max_queries=3, lockout_after=0)
    one.charge("Org A")
    two.charge("Org A")
    one.charge("Org A")
    with pytest.raises(BudgetExceeded):
        two.charge("Org A")  # the budget counts what the other instance charged
    # an overlap hit recorded through the registry locks Org B out, seen by both budgets
    bits = FrozenBitMap(range(10))
    registry.record([NewPublication(bits, None, "<10", True, None)], "Org B", "q", overlap_hits=1)
    with pytest.raises(LockedOut):
        one.charge("Org B")
    with pytest.raises(LockedOut):
        two.charge("Org B")
    assert two.status("Org B").locked
    one.unlock("Org B")
    assert two.charge("Org B").used == 1
    for store in (registry, one, two):
        store.close()


def test_concurrent_charges_never_exceed_the_budget(url: str) -> None:
    budgets = [QueryBudget(url, max_queries=10) for _ in range(4)]
    granted: list[int] = []
    refused: list[int] = []

    def ask(budget: QueryBudget) -> None:
        for _ in range(5):
            try:
                budget.charge("Org C")
                granted.append(1)
            except BudgetExceeded:
                refused.append(1)

    threads = [threading.Thread(target=ask, args=(b,)) for b in budgets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(granted) == 10 and len(refused) == 10
    for budget in budgets:
        budget.close()


def test_workspace_histories_are_shared(url: str) -> None:
    a, b = AnswerHistory(url), AnswerHistory(url)
    answer_id = a.record("Org A", "ad hoc", "fp", {"title": "q"}, {"total": {"display": "10"}})
    found = b.get("Org A", answer_id)
    assert found is not None
    assert b.get("Org B", answer_id) is None  # only its own
    cohorts_a, cohorts_b = CohortHistory(url), CohortHistory(url)
    record = {"trial": "t1", "patient": "p1", "change": 1, "member": True, "at": 1_700_000_000}
    cohorts_a.absorb([record])
    cohorts_b.absorb([record])  # the other process read the same record: kept once
    assert len(cohorts_b.changes("t1")) == 1
    assert cohorts_a.set_baseline("t1", 5.0) == cohorts_b.set_baseline("t1", 9.0)
    for store in (a, b, cohorts_a, cohorts_b):
        store.close()


def test_revocations_are_shared(url: str) -> None:
    a, b = RevocationList(url), RevocationList(url)
    a.revoke("jti-1", reason="lost", revoked_by="ops")
    assert b.is_revoked("jti-1")
    assert b.revoke("jti-1", reason="again").reason == "lost"  # the first revocation stands
    assert [r.jti for r in a.entries()] == ["jti-1"]
    a.close()
    b.close()
