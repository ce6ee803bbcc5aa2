"""A patient's site whatever the order its Patient and Organization arrive in.

A stream may deliver a Patient before its managing Organization. The fact then holds the
organisation's key and no ODS code; every engine reads that the same way (site unknown, never
"not at that site"), and answers name the site by ODS code and name as soon as the Organization
is on the reference topic, without the Patient being sent again.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from feasibility.criteria import parse_question
from feasibility.disclosure.budget import QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.service import FeasibilityService
from feasibility.sites import UNRESOLVED, SiteDirectory
from feasibility.snapshot import ColumnarSnapshot
from fhir_adapters.pipeline import Ingestor
from surveillance_stream import patient_state
from tests.spec.test_adapter_spec import (
    NHS_SYSTEM,
    ODS,
    ORGANIZATION,
    PATIENT,
    SOURCE,
    accept,
    make_ingestor,
    sink_of,
)

AT = datetime(2026, 1, 1, 12, tzinfo=UTC)
ORG_KEY = f"{SOURCE}|Organization|org1"
AT_SITE = {"type": "site", "sites": [ODS]}


def ingested(order: str, patients: int = 1) -> Ingestor:
    """An ingestor that took ``patients`` Patients of org1 and org1, in ``order``."""
    ingestor = make_ingestor()
    if order == "organization first":
        accept(ingestor, ORGANIZATION)
    for i in range(patients):
        nhs = str(9000000000 + i)
        accept(ingestor, {**PATIENT, "id": f"pat{i}", "identifier": [
            {"system": NHS_SYSTEM, "value": nhs}]})  # fmt: skip
    if order == "patient first":
        accept(ingestor, ORGANIZATION)
    return ingestor


def population(ingestor: Ingestor) -> dict[str, dict[str, Any]]:
    table = patient_state.fold(sink_of(ingestor).published_facts)
    out: dict[str, dict[str, Any]] = {}
    for key, entry in table.items():
        patient, resource = patient_state.split_key(key)
        out.setdefault(patient, {})[resource] = entry
    return out


def legacy(pop: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The same population as facts written before ``site_key``: the key in ``site``."""
    out: dict[str, dict[str, Any]] = {}
    for patient, entries in pop.items():
        out[patient] = {}
        for key, entry in entries.items():
            facts = []
            for fact in entry["facts"]:
                if fact.get("kind") == "patient":
                    fact = {k: v for k, v in fact.items() if k != "site_key"}
                    fact["site"] = fact["site"] or ORG_KEY
                facts.append(fact)
            out[patient][key] = {**entry, "facts": facts}
    return out


def results(engine: Any, pop: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    q = parse_question({"inclusion": [AT_SITE]})
    return [(r.site, r.steps[0]) for r in engine.evaluate(q, pop, AT).values()]


def test_every_engine_reads_a_patient_before_its_organization_as_site_unknown(
    engine: Any,
) -> None:
    early = population(ingested("patient first"))
    # not "not at B86001": unknown, so the funnel shows the patient as missing data
    assert results(engine, early) == [(None, None)]
    # facts already in the log with the key in ``site`` are read the same way
    assert results(engine, legacy(early)) == [(None, None)]
    late = population(ingested("organization first"))
    assert results(engine, late) == [(ODS, True)]


def directory_of(ingestor: Ingestor) -> SiteDirectory:
    sites = SiteDirectory()
    for record in sink_of(ingestor).published_references:
        sites.apply(record)
    return sites


def service(ingestor: Ingestor, sites: SiteDirectory) -> FeasibilityService:
    snapshot = ColumnarSnapshot()
    for envelope in sink_of(ingestor).published_facts:
        snapshot.apply(orjson.loads(envelope.to_json()))
    return FeasibilityService(
        snapshot=snapshot,
        lock=threading.Lock(),
        engine=PolarsEngine(),
        policy=DisclosurePolicy(
            threshold=1, rounding=1, suppress_zero=False, overlap_control=False
        ),
        registry=PublicationRegistry("sqlite://"),
        budget=QueryBudget("sqlite://"),
        sites=sites,
        clock=lambda: AT,
    )


ALL = parse_question({"inclusion": [{"type": "age", "min": 18}]})


@pytest.mark.parametrize("order", ["patient first", "organization first"])
def test_the_answer_names_the_site_by_ods_code_and_name_in_either_order(order: str) -> None:
    ingestor = ingested(order, patients=3)
    body, _ = service(ingestor, directory_of(ingestor)).answer(ALL, "Acme", charge=False)
    assert {k: c["value"] for k, c in body["by_site"].items()} == {ODS: 3}
    assert body["sites"] == {ODS: {"ods_code": ODS, "name": "Leeds Road Practice",
                                   "resolved": True}}  # fmt: skip
    assert SOURCE not in orjson.dumps(body).decode()


def test_a_late_organization_renames_every_answer_at_once() -> None:
    ingestor = ingested("patient first", patients=3)
    sites = SiteDirectory()  # the reference topic has not delivered the Organization yet
    feasibility = service(ingestor, sites)
    before, _ = feasibility.answer(ALL, "Acme", charge=False)
    assert {k: c["value"] for k, c in before["by_site"].items()} == {UNRESOLVED: 3}
    assert before["sites"][UNRESOLVED]["resolved"] is False
    assert before["by_region"]["Unknown"]["value"] == 3  # the site's region is not known
    assert SOURCE not in orjson.dumps(before).decode()
    for record in sink_of(ingestor).published_references:
        sites.apply(record)  # the Organization arrives; no Patient is sent again
    after, _ = feasibility.answer(ALL, "Acme", charge=False)
    assert {k: c["value"] for k, c in after["by_site"].items()} == {ODS: 3}
    assert after["sites"][ODS]["name"] == "Leeds Road Practice"
    assert after["by_region"] == {
        "North East and Yorkshire": {"value": 3, "display": "3", "suppressed": False}
    }


class StreamCohort:
    """The cohort view as the stream would fill it (members by pseudonym, the stream's site
    as the worker knew it at the time: none, since the Organization came later)."""

    def __init__(self, trial: str, patients: list[str]) -> None:
        self.trial = trial
        self.records = [
            {"trial": trial, "trial_version": 1, "patient": p, "site": None,
             "region": "North East and Yorkshire", "member": True, "change": 1}
            for p in patients
        ]  # fmt: skip

    def members(self, trial: str, version: int | None = None) -> list[dict[str, Any]]:
        return self.records if trial == self.trial else []

    def stream_time(self) -> datetime:
        return AT

    def pending_partitions(self, trial: str, version: int) -> list[int]:
        return []  # every member is given: nothing is still being evaluated

    def evaluated_version(self, trial: str) -> int:
        return 1

    def status(self) -> dict[str, Any]:
        return {"stream_time": AT.isoformat()}


def test_a_saved_answer_names_stream_members_by_their_site_now() -> None:
    from types import SimpleNamespace

    ingestor = ingested("patient first", patients=3)
    feasibility = service(ingestor, directory_of(ingestor))
    patients = sorted({e.patient for e in sink_of(ingestor).published_facts})
    feasibility.cohorts = StreamCohort("t1", patients)
    trial = SimpleNamespace(id="t1", version=1, criteria=ALL)
    body, _ = feasibility.answer_live(trial, "Acme")
    assert {k: c["value"] for k, c in body["by_site"].items()} == {ODS: 3}
    assert body["sites"][ODS]["name"] == "Leeds Road Practice"
    assert body["stream_and_snapshot_agree"] is True
    assert SOURCE not in orjson.dumps(body).decode()
