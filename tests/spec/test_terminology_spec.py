"""ECL and ValueSet specs: code entries expanded against the hand-made RF2 release
(``tests/terminology_fixtures.py`` draws its hierarchy), then evaluated by every engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from feasibility.criteria import NotExpanded, parse_question
from feasibility.expansion import compile_question
from terminology.expand import Terminology
from terminology.store import TerminologyStore

from ..terminology_fixtures import (
    RELEASE_2025,
    VALUESETS,
    VS_COMPLICATIONS,
    VS_ECL,
    VS_HBA1C,
    VS_NESTED,
    VS_NOT_TYPE_1,
)
from .feasibility_helpers import AT, SNOMED, condition, medication, observation, patient, population


@pytest.fixture(scope="module")
def terminology(tmp_path_factory: pytest.TempPathFactory) -> Terminology:
    path: Path = tmp_path_factory.mktemp("terminology") / "terminology.db"
    store = TerminologyStore(f"sqlite:///{path}")
    store.load(RELEASE_2025)
    store.load(VALUESETS)
    return Terminology(store)


#: one patient per diagnosis, named by it
DIAGNOSES = {
    "dm": "73211009",
    "t1": "46635009",
    "t2": "44054006",
    "t2_plain": "313436004",
    "dm_kidney": "127013003",
    "t2_kidney": "420279001",
    "gestational": "11687002",
    "kidney": "90708001",
    "hypertension": "38341003",
}
PATIENTS = {
    **{name: [patient(), condition(SNOMED, code)] for name, code in DIAGNOSES.items()},
    "inactive_code": [patient(), condition(SNOMED, "190330002")],
    "nothing": [patient()],
}


def run(
    engine: Any,
    terminology: Terminology,
    entry: dict[str, Any],
    patients: dict[str, list[dict[str, Any]]] | None = None,
    kind: str = "condition",
) -> tuple[set[str], dict[str, Any]]:
    question = parse_question({"inclusion": [{"type": kind, "codes": [entry]}]})
    compiled = compile_question(question, terminology)
    results = engine.evaluate(compiled.question, population(**(patients or PATIENTS)), AT)
    return {p for p, r in results.items() if r.steps[0] is True}, compiled.report


@pytest.mark.parametrize(
    ("ecl", "expected"),
    [
        ("73211009", {"dm"}),
        ("< 73211009", {"t1", "t2", "t2_plain", "dm_kidney", "t2_kidney", "gestational"}),
        ("<< 73211009", {"dm", "t1", "t2", "t2_plain", "dm_kidney", "t2_kidney", "gestational"}),
        ("<! 73211009", {"t1", "t2", "dm_kidney", "gestational"}),
        ("<<! 73211009", {"dm", "t1", "t2", "dm_kidney", "gestational"}),
        ("> 420279001", {"dm", "t2", "dm_kidney", "kidney"}),
        (">> 420279001", {"dm", "t2", "dm_kidney", "kidney", "t2_kidney"}),
        (">! 420279001", {"t2", "dm_kidney"}),
        (">>! 420279001", {"t2", "dm_kidney", "t2_kidney"}),
        # a concept with two parents is under both
        ("<< 73211009 AND << 90708001", {"dm_kidney", "t2_kidney"}),
        ("<< 73211009 , << 90708001", {"dm_kidney", "t2_kidney"}),
        ("<< 44054006 OR << 46635009", {"t1", "t2", "t2_plain", "t2_kidney"}),
        (
            "<< 73211009 MINUS << 46635009",
            {"dm", "t2", "t2_plain", "dm_kidney", "t2_kidney", "gestational"},
        ),
        ("(<< 73211009 MINUS << 44054006) AND < 90708001", {"dm_kidney"}),
        ("< (44054006 OR 90708001)", {"t2_plain", "dm_kidney", "t2_kidney"}),
        (
            "<< 73211009 |Diabetes mellitus| minus (<< 44054006 or 46635009)",
            {"dm", "dm_kidney", "gestational"},
        ),
        ("/* any disorder */ < 64572001 MINUS << 73211009", {"kidney", "hypertension"}),
        ("*", set(DIAGNOSES)),
        ("< *", set(DIAGNOSES)),
    ],
)
def test_ecl_operators(engine: Any, terminology: Terminology, ecl: str, expected: set[str]) -> None:
    found, report = run(engine, terminology, {"system": "snomed", "ecl": ecl})
    assert found == expected
    [expansion] = report["expansions"]
    assert expansion["release"].endswith("/version/20250401")
    assert expansion["warnings"] == []


def test_ecl_over_dmd_medicines(engine: Any, terminology: Terminology) -> None:
    patients = {
        "amp_dmd": [patient(), medication("39113611000001102")],
        "vmp_snomed": [patient(), medication("325278007", system=SNOMED)],
        "other": [patient(), medication("38341003")],
    }
    found, _ = run(
        engine, terminology, {"system": "dmd", "ecl": "<< 109081006"}, patients, "medication"
    )
    assert found == {"amp_dmd", "vmp_snomed"}
    found, _ = run(engine, terminology, {"ecl": "< 325278007"}, patients, "medication")
    assert found == {"amp_dmd"}


def test_an_expression_matching_nothing_is_a_warning_not_a_silent_zero(
    engine: Any, terminology: Terminology
) -> None:
    found, report = run(engine, terminology, {"ecl": "<< 190330002 OR 12345678"})
    assert found == set()
    warnings = report["warnings"]
    assert any("190330002 is not an active concept" in w for w in warnings)
    assert any("12345678 is not an active concept" in w for w in warnings)
    assert any("matches no concept" in w for w in warnings)
    assert all(w.startswith("/inclusion/0/any_of/0/codes/0: ") for w in warnings)


@pytest.mark.parametrize(
    ("url", "version", "expected"),
    [
        # is-a include, is-a exclude
        (VS_NOT_TYPE_1, "1.0.0", {"dm", "t2", "t2_plain", "dm_kidney", "t2_kidney", "gestational"}),
        # descendent-of (proper descendants) and =
        (VS_COMPLICATIONS, None, {"t2_kidney", "kidney"}),
        # constraint = ECL, and a concept list
        (VS_ECL, "1", {"t2", "t2_kidney", "t1"}),
        # valueSet include intersected with an is-not-a filter
        (VS_NESTED, None, {"dm", "dm_kidney", "gestational"}),
    ],
)
def test_valueset_compose_filters(
    engine: Any, terminology: Terminology, url: str, version: str | None, expected: set[str]
) -> None:
    entry = {"valueset": url, **({"version": version} if version else {})}
    found, report = run(engine, terminology, entry)
    assert found == expected
    [expansion] = report["expansions"]
    assert expansion["method"] == "compose"
    assert expansion["release"].endswith("/version/20250401")
    assert expansion["valueset"].startswith(url + "|")


def test_valueset_expansion_is_used_as_it_is(engine: Any, terminology: Terminology) -> None:
    patients = {
        "ifcc": [patient(), observation("59261-8", value=60, unit="mmol/mol")],
        "ngsp": [patient(), observation("4548-4", value=7.5, unit="%")],
        "other": [patient(), observation("17856-6", value=7.5, unit="%")],
    }
    found, report = run(engine, terminology, {"valueset": VS_HBA1C}, patients, "observation")
    assert found == {"ifcc", "ngsp"}
    assert report["expansions"][0]["method"] == "expansion"
    assert report["expansions"][0]["release"] is None


def test_an_unexpanded_entry_is_refused_by_every_engine(engine: Any) -> None:
    question = parse_question(
        {"inclusion": [{"type": "condition", "codes": [{"ecl": "< 1234567"}]}]}
    )
    with pytest.raises(NotExpanded, match="was not expanded"):
        engine.evaluate(question, population(**PATIENTS), AT)
