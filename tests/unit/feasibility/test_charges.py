"""One query budget for every answer a sponsor reads (:meth:`FeasibilityService.charged`).

Ad hoc answers, saved answers and saved-question registrations are each charged to the
organisation before anything is read; the charge is given back when nothing was given (a view
was not current, the registration was refused) and when the answer is a republication (the
organisation's last answer to the same question again, recorded nothing). A locked-out or spent
organisation is refused before the data is read, so the refusal does not depend on whether its
answer changed. Over real stores (SQLite in memory) and a real snapshot; no broker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from concierge.commands.generate import bundle
from core.settings import Settings
from feasibility.criteria import parse_question
from feasibility.disclosure.budget import BudgetExceeded, LockedOut, QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.saved import TrialCreate
from feasibility.service import FeasibilityService, NotCurrent
from feasibility.sites import SiteDirectory
from feasibility.snapshot import ColumnarSnapshot
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import MemorySink
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from infra.mirror import ReaderStatus
from tests.api_world import MemorySavedQuestions

AT = datetime(2026, 1, 1, 12, tzinfo=UTC)
ADULTS = parse_question({"title": "Adults", "inclusion": [{"type": "age", "min": 18}]})
OLDER = parse_question({"title": "Over 40", "inclusion": [{"type": "age", "min": 40}]})


class LaggingSites(SiteDirectory):
    """A site view that is behind its topic: answers must wait (503), and cost nothing."""

    def readiness(self) -> ReaderStatus:
        return ReaderStatus(
            name="sites",
            ready=False,
            connected=True,
            caught_up=False,
            lag=3,
            staleness_seconds=None,
            positions={},
            waiting_for="3 messages behind",
            error=None,
        )

    def stop(self) -> None:
        return None


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    home = tmp_path_factory.mktemp("charges")
    sink = MemorySink()
    ingestor = build_ingestor(Settings(home=home, kafka_bootstrap_servers="127.0.0.1:1"), sink=sink)
    config = GeneratorConfig(patients=120, seed=3, as_of=AT.date())
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in iter_patients(config):
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()
    ingestor.vault.close()
    return [orjson.loads(e.to_json()) for e in sink.published_facts]


@pytest.fixture
def service(facts: list[Any]) -> Iterator[FeasibilityService]:
    snapshot = ColumnarSnapshot()
    for envelope in facts:
        snapshot.apply(envelope)
    registry = PublicationRegistry("sqlite://")
    yield FeasibilityService(
        snapshot=snapshot,
        lock=threading.Lock(),
        engine=PolarsEngine(),
        policy=DisclosurePolicy(),
        registry=registry,
        # one database, as the API's: overlap control's fires count towards the lockout
        budget=QueryBudget(registry.engine, max_queries=5, lockout_after=50),
        saved=MemorySavedQuestions(),
        clock=lambda: AT,
    )


def used(service: FeasibilityService, org: str = "Acme") -> int:
    return service.budget.status(org).used


def test_a_new_answer_is_charged_and_its_republication_is_free(
    service: FeasibilityService,
) -> None:
    body, audit = service.answer(ADULTS, "Acme")
    assert audit["budget"] == {"charged": True, "used": 1} and not audit["republished"]
    for _ in range(3):
        again, audit = service.answer(ADULTS, "Acme")
        assert audit["republished"] and audit["overlap_hits"] == 0
        assert audit["budget"] == {"charged": False, "used": 1}
        assert again["total"] == body["total"]
    assert used(service) == 1
    _, audit = service.answer(OLDER, "Acme")  # another question: news, charged
    assert audit["budget"] == {"charged": True, "used": 2}


def test_an_answer_that_waits_for_a_view_costs_nothing(service: FeasibilityService) -> None:
    service.sites = LaggingSites()
    with pytest.raises(NotCurrent):
        service.answer(ADULTS, "Acme")
    assert used(service) == 0


def test_a_registration_is_charged_and_a_refused_one_is_not(
    service: FeasibilityService,
) -> None:
    create = TrialCreate(id="t-adults", title="Adults", criteria=ADULTS)
    record, audit = service.register(create, "Acme")
    assert (record.version, audit["budget"]) == (1, {"charged": True, "used": 1})
    record, audit = service.register(create, "Acme")  # a new version: a new question
    assert (record.version, audit["budget"]) == (2, {"charged": True, "used": 2})
    from feasibility.saved import NotYours

    with pytest.raises(NotYours):  # another sponsor's trial: refused, not charged
        service.register(create, "Rival")
    assert used(service, "Rival") == 0


def test_a_spent_budget_refuses_before_anything_is_read(service: FeasibilityService) -> None:
    for question in (ADULTS, OLDER):
        service.answer(question, "Acme")
    service.budget.max_queries = 2
    before = len(service.registry)
    for attempt in (
        lambda: service.answer(ADULTS, "Acme"),  # unchanged: refused all the same
        lambda: service.answer(parse_question({"inclusion": [{"type": "age", "min": 60}]}), "Acme"),
        lambda: service.register(TrialCreate(id="t-new", title="New", criteria=OLDER), "Acme"),
    ):
        with pytest.raises(BudgetExceeded) as refused:
            attempt()
        assert not isinstance(refused.value, LockedOut)
    assert len(service.registry) == before and used(service) == 2
    assert service.saved is not None and "t-new" not in service.saved.trials


def test_a_locked_out_organisation_is_refused_everything_charged(
    service: FeasibilityService,
) -> None:
    service.budget.lockout_after = 0
    service.answer(ADULTS, "Acme")
    service.registry.record([], "Acme", "a differencing question", overlap_hits=2)
    create = TrialCreate(id="t-adults", title="Adults", criteria=ADULTS)
    for attempt in (
        lambda: service.answer(ADULTS, "Acme"),
        lambda: service.answer(OLDER, "Acme"),
        lambda: service.register(create, "Acme"),
    ):
        with pytest.raises(LockedOut):
            attempt()
    assert used(service) == 1 and service.budget.status("Acme").locked
    assert service.saved is not None and not service.saved.trials
    service.budget.unlock("Acme")
    assert service.register(create, "Acme")[0].version == 1


def test_reserve_and_refund() -> None:
    budget = QueryBudget("sqlite://", max_queries=2)
    first, status = budget.reserve("Acme")
    assert status.used == 1
    second, status = budget.reserve("Acme")
    assert status.used == 2 and second != first
    with pytest.raises(BudgetExceeded):
        budget.reserve("Acme")
    budget.refund(first)
    assert budget.status("Acme").used == 1
    assert budget.charge("Acme").used == 2
