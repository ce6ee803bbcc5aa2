"""The patient view: per-event fold equals batch build, and every consumer reads the view.

The consumer tests change the view a consumer is given (or spy on the builder it calls) and
check that the consumer's output follows: a consumer that read the raw facts itself would not.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import core.patient_view as patient_view
import feasibility.engines.incremental as incremental_module
import feasibility.engines.reference as reference_module
import feasibility.snapshot as snapshot_module
import surveillance_stream.devices as devices_module
from core.patient_view import PatientFold, PatientView, build_view, view_of_envelopes
from feasibility.criteria import parse_question
from feasibility.engines.incremental import IncrementalEngine
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.engines.reference import ReferenceEngine, evaluate_patient
from feasibility.snapshot import ColumnarSnapshot
from surveillance_stream.devices import contribution
from surveillance_stream.store import PatientStore
from tests.spec.feasibility_helpers import (
    AT,
    ICD10,
    condition,
    device,
    observation,
    patient,
    procedure,
)

P = "pat"
SITE_QUESTION = parse_question({"inclusion": [{"type": "site", "sites": ["RA1"]}]})


# --------------------------------------------------------------------------- fold == batch

FACTS = st.sampled_from(
    [
        patient(site="RA1"),
        patient(site="RB2", region="Unknown"),
        patient(birth="2030-01-01"),
        condition(ICD10, "E11.9"),
        condition(ICD10, "I10", onset=None, recorded="2024-01-01"),
        observation("4548-4", value=7.0, unit="%"),
        procedure("W37.1", system="https://fhir.nhs.uk/Id/opcs-4"),
        device(),
        {"kind": "consent", "status": "active", "research_opt_out": True, "date": None},
    ]
)


@st.composite
def envelope_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 25))):
        rid = draw(st.sampled_from("abcde"))
        kind = draw(st.sampled_from(["Patient", "Condition", "Observation"]))
        retracted = draw(st.integers(0, 5)) == 0
        updated = draw(st.sampled_from([None, "2025-01-01T00:00:00Z", "2025-06-01T00:00:00Z"]))
        out.append(
            {
                "key": f"urn:t|{kind}|{rid}",
                "patient": P,
                "seq": draw(st.integers(1, 4)),
                "retracted": retracted,
                "facts": [] if retracted else draw(st.lists(FACTS, min_size=1, max_size=2)),
                "provenance": {"version": "1", "last_updated": updated},
            }
        )
    return out


def _final(envelopes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per key the first envelope with the highest seq (what the stream's state keeps)."""
    state: dict[str, dict[str, Any]] = {}
    for e in envelopes:
        if e["key"] not in state or e["seq"] > state[e["key"]]["seq"]:
            state[e["key"]] = e
    return state


@given(envelope_lists(), st.randoms(use_true_random=False))
def test_the_per_event_fold_equals_the_batch_build(
    envelopes: list[dict[str, Any]], rng: Any
) -> None:
    fold = PatientFold(P)
    for number, envelope in enumerate(envelopes):
        fold.apply(envelope["key"], envelope)
        if number % 3 == 0:
            fold.view()  # assembled part-way, then kept current
    batch = build_view(P, _final(envelopes))
    assert fold.view() == batch
    # any order and any replays of the same envelopes: the same view (where no two versions of
    # one resource share a seq with different facts, which the adapters never send)
    distinct = {(e["key"], e["seq"]): e for e in reversed(envelopes)}
    if len(distinct) == len({(e["key"], e["seq"], str(e["facts"])) for e in envelopes}):
        shuffled = envelopes + envelopes[: len(envelopes) // 2]
        rng.shuffle(shuffled)
        assert view_of_envelopes(P, shuffled) == batch


def test_the_fold_parses_only_the_changed_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = patient_view.parse_resource

    def spy(key: str, entry: Any) -> Any:
        calls.append(key)
        return real(key, entry)

    monkeypatch.setattr(patient_view, "parse_resource", spy)
    fold = PatientFold.from_entries(
        P, {f"urn:t|Condition|{i}": {"seq": 1, "facts": [condition(ICD10, "I10")]} for i in "ab"}
    )
    first = fold.view()
    calls.clear()
    assert fold.apply("urn:t|Condition|a", {"seq": 2, "facts": [condition(ICD10, "E11")]})
    assert not fold.apply("urn:t|Condition|b", {"seq": 1, "facts": []})  # stale
    assert calls == ["urn:t|Condition|a"]
    assert fold.view() is fold.view() and fold.view() != first


# --------------------------------------------------------------------------- consumers


def _at_site(view: PatientView, site: str) -> PatientView:
    assert view.demographics is not None
    return dataclasses.replace(view, demographics=dataclasses.replace(view.demographics, site=site))


POPULATION = {
    P: {"urn:t|Patient|a": {"seq": 1, "retracted": False, "facts": [patient(site="RZ9")]}}
}


def _relocating(real: Any) -> Any:
    """A view builder that moves the patient to RA1: consumers that read the view follow."""

    def build(patient: str, entries: Any) -> PatientView:
        return _at_site(real(patient, entries), "RA1")

    return build


def test_the_reference_engine_evaluates_the_view() -> None:
    view = build_view(P, POPULATION[P])
    assert evaluate_patient(SITE_QUESTION, view, AT).steps == (False,)
    assert evaluate_patient(SITE_QUESTION, _at_site(view, "RA1"), AT).steps == (True,)


def test_the_reference_engine_builds_the_view(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ReferenceEngine().evaluate(SITE_QUESTION, POPULATION, AT)[P].steps == (False,)
    monkeypatch.setattr(reference_module, "digest", _relocating(reference_module.digest))
    assert ReferenceEngine().evaluate(SITE_QUESTION, POPULATION, AT)[P].steps == (True,)


def test_the_incremental_engine_builds_the_view(monkeypatch: pytest.MonkeyPatch) -> None:
    assert IncrementalEngine().evaluate(SITE_QUESTION, POPULATION, AT)[P].steps == (False,)
    monkeypatch.setattr(incremental_module, "digest", _relocating(incremental_module.digest))
    assert IncrementalEngine().evaluate(SITE_QUESTION, POPULATION, AT)[P].steps == (True,)


def test_the_snapshot_and_polars_engine_read_view_items(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PolarsEngine().evaluate(SITE_QUESTION, POPULATION, AT)[P].steps == (False,)
    real = snapshot_module.read_resource

    def relocated(key: str, entry: Any) -> Any:
        version = real(key, entry)
        moved = tuple(dataclasses.replace(d, site="RA1") for d in version.patients)
        return dataclasses.replace(version, patients=moved)

    monkeypatch.setattr(snapshot_module, "read_resource", relocated)
    snap = ColumnarSnapshot()
    snap.apply_entries(POPULATION)
    assert snap.frames().patients.get_column("site").to_list() == ["RA1"]
    assert PolarsEngine().evaluate(SITE_QUESTION, POPULATION, AT)[P].steps == (True,)


HIP = {
    "urn:t|Patient|a": {"seq": 1, "facts": [patient(site="RZ9")]},
    "urn:t|DeviceUseStatement|d": {"seq": 1, "facts": [device()]},
}


def test_device_contributions_read_the_view(monkeypatch: pytest.MonkeyPatch) -> None:
    sites = {k[4] for k in contribution(P, HIP).keys}
    assert sites == {"RZ9"}
    # given a view, the contribution is the view's
    moved = _at_site(build_view(P, HIP), "RA1")
    assert {k[4] for k in contribution(P, moved).keys} == {"RA1"}
    # given entries, it builds the view
    monkeypatch.setattr(devices_module, "build_view", _relocating(devices_module.build_view))
    assert {k[4] for k in contribution(P, HIP).keys} == {"RA1"}


def test_the_stream_store_keeps_the_view_per_event() -> None:
    store = PatientStore()
    envelope = {"patient": P, "key": "urn:t|Patient|a", "seq": 1, "facts": [patient(site="RZ9")]}
    store.apply(0, envelope)
    first = store.view(0, P)
    assert first.site == "RZ9" and store.view(0, P) is first
    store.apply(0, {**envelope, "seq": 2, "facts": [patient(site="RA1")]})
    assert store.view(0, P).site == "RA1"
    store.apply(0, {**envelope, "seq": 1, "facts": [patient(site="RX0")]})  # stale: nothing
    assert store.view(0, P).site == "RA1"
    # a rebuilt partition starts from its entries again
    store.install(0, {P: {"urn:t|Patient|a": {"seq": 3, "facts": [patient(site="RB2")]}}})
    assert store.view(0, P).site == "RB2"


def test_the_live_cohorts_and_device_contributions_read_the_store_view(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from surveillance_stream.cohorts import LiveCohorts
    from surveillance_stream.device_stream import DeviceContributions

    store = PatientStore()
    for key, entry in HIP.items():
        store.apply(0, {"patient": P, "key": key, **entry})
    real = PatientStore.view
    monkeypatch.setattr(PatientStore, "view", lambda self, p, q: _at_site(real(self, p, q), "RA1"))
    assert LiveCohorts(store, {}, {}).data(0, P).site == "RA1"
    value = DeviceContributions(store, {}).value(0, P)
    assert value is not None and {k[4] for k in value["keys"]} == {"RA1"}


def test_a_future_birth_is_a_timer_for_a_saved_question() -> None:
    """Born after today: not in the population now, in it from the start of the birth day (the
    stream's timer fires then)."""
    from feasibility.engines.incremental import CompiledQuestion

    entries = {"urn:t|Patient|a": {"seq": 1, "facts": [patient(birth="2026-03-01")]}}
    compiled = CompiledQuestion(
        parse_question({"inclusion": [{"type": "sex", "values": ["female"]}]})
    )
    result, next_check = compiled.evaluate_entries(P, entries, AT)
    assert not result.in_population
    assert next_check == datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    later, _ = compiled.evaluate_entries(P, entries, datetime(2026, 3, 1, tzinfo=UTC))
    assert later.in_population
