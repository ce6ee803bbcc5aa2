"""ATLAS (Circe) cohort definitions translated to criteria, against hand-checked cohorts.

The two definitions are ``docs/examples/atlas/``; the populations below were worked out by
hand from each definition's own rules (Circe's meaning), patient by patient, and every engine
must find exactly them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from feasibility.atlas import AtlasImportError, import_atlas
from feasibility.engines.results import cohort
from feasibility.expansion import compile_question
from terminology.expand import Terminology
from terminology.store import TerminologyStore

from ..terminology_fixtures import RELEASE_2025
from .feasibility_helpers import (
    AT,
    ICD10,
    OPCS4,
    SNOMED,
    condition,
    medication,
    observation,
    patient,
    population,
    procedure,
)

ATLAS = Path(__file__).resolve().parents[2] / "docs" / "examples" / "atlas"


@pytest.fixture(scope="module")
def terminology(tmp_path_factory: pytest.TempPathFactory) -> Terminology:
    store = TerminologyStore(f"sqlite:///{tmp_path_factory.mktemp('atlas') / 't.db'}")
    store.load(RELEASE_2025)
    return Terminology(store)


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((ATLAS / name).read_text())
    return document


def members(engine: Any, terminology: Terminology, question: Any, patients: Any) -> set[str]:
    compiled = compile_question(question, terminology).question
    return set(cohort(compiled, engine.evaluate(compiled, population(**patients), AT)))


def t2(onset: str = "2020-01-01", code: str = "44054006", system: str = SNOMED) -> Any:
    return condition(system, code, onset=onset)


def test_t2dm_on_metformin(engine: Any, terminology: Terminology) -> None:
    imported = import_atlas(load("t2dm-metformin.json"))
    assert imported.report.refusals == []
    metformin = medication("39113611000001102", start="2020-02-01")  # a dm+d AMP, < 109081006
    hba1c = observation("59261-8", when="2020-06-01", value=60, unit="mmol/mol")
    patients = {
        # in: diagnosed 2020-01-01, metformin a month later, HbA1c 60 five months later
        "a": [patient(), t2(), metformin, hba1c],
        # out: HbA1c under 58
        "b": [patient(), t2(), metformin, observation("59261-8", "2020-06-01", 55, "mmol/mol")],
        # out: the only HbA1c is more than 365 days after diagnosis
        "c": [patient(), t2(), metformin, observation("59261-8", "2021-06-01", 60, "mmol/mol")],
        # in: diagnosed in ICD-10 (E11 and below), metformin as a SNOMED CT clinical drug
        "d": [
            patient(),
            t2("2019-05-01", "E11.9", ICD10),
            medication("325278007", start="2019-06-01", system=SNOMED),
            observation("59261-8", "2019-08-01", 70, "mmol/mol"),
        ],
        # out: type 1 diabetes recorded (at any time)
        "e": [patient(), t2(), metformin, hba1c, condition(SNOMED, "46635009", "2024-01-01")],
        # out: metformin only before the diagnosis
        "f": [patient(), t2(), medication("109081006", start="2019-01-01"), hba1c],
        # out: only "in remission", which the concept set excludes
        "g": [patient(), t2(code="999001021000000105"), metformin, hba1c],
        # in: renal disorder due to type 2 diabetes, a descendant of 44054006
        "h": [
            patient(),
            t2(code="420279001"),
            metformin,
            observation("59261-8", "2020-04-01", 62, "mmol/mol"),
        ],
        # out: no diabetes
        "i": [patient(), metformin, hba1c],
    }
    assert members(engine, terminology, imported.question, patients) == {"a", "d", "h"}


def test_diabetic_kidney_disease_in_older_women(engine: Any, terminology: Terminology) -> None:
    document = load("dkd-older-women.json")
    with pytest.raises(AtlasImportError) as refused:
        import_atlas(document)
    kinds = {i.kind for i in refused.value.report.refusals}
    assert kinds == {"observation_window", "age_at_index"}
    assert "accept with observation_window" in str(refused.value)
    imported = import_atlas(document, accept=["observation_window", "age_at_index"])
    issues = {(i.path, i.kind, i.changes_meaning) for i in imported.report.issues}
    assert ("/CollapseSettings/EraPad", "collapse", False) in issues

    def older_woman(*facts: Any, birth: str = "1950-06-15", sex: str = "female") -> Any:
        return [patient(birth=birth, sex=sex), *facts]

    dkd = condition(SNOMED, "127013003", "2022-01-01")
    low = [observation("62238-1", "2022-03-01", 45), observation("62238-1", "2023-03-01", 50)]
    patients = {
        "w1": older_woman(dkd, *low),  # in
        # out: one result under 60 only
        "w2": older_woman(dkd, low[0], observation("62238-1", "2023-03-01", 65)),
        "w3": older_woman(dkd, *low, birth="1970-06-15"),  # out: 55 at the index date
        "m1": older_woman(dkd, *low, sex="male"),  # out: a man
        "w4": older_woman(dkd, *low, procedure("X40.1", "2023-05-01", system=OPCS4)),  # dialysis
        # in: renal disorder due to type 2 diabetes is under diabetic kidney disease
        "w5": older_woman(condition(SNOMED, "420279001", "2022-01-01"), *low),
        "w6": older_woman(condition(SNOMED, "90708001", "2022-01-01"), *low),  # out: not DKD
    }
    assert members(engine, terminology, imported.question, patients) == {"w1", "w5"}


@pytest.mark.parametrize(
    ("change", "path", "kind"),
    [
        (
            lambda e: e.update(
                EndStrategy={"DateOffset": {"DateField": "StartDate", "Offset": 30}}
            ),
            "/EndStrategy",
            "exit",
        ),
        (
            lambda e: e.update(CensoringCriteria=[{"ConditionOccurrence": {"CodesetId": 3}}]),
            "/CensoringCriteria",
            "exit",
        ),
        (
            lambda e: e["ConceptSets"][1]["expression"]["items"][0]["concept"].update(
                VOCABULARY_ID="RxNorm", CONCEPT_CODE="6809"
            ),
            "/ConceptSets/1/expression/items/0",
            "untranslatable",
        ),
        (
            lambda e: e["ConceptSets"][2]["expression"]["items"][0].update(includeDescendants=True),
            "/ConceptSets/2/expression/items/0",
            "untranslatable",
        ),
        (
            lambda e: e["InclusionRules"][0]["expression"]["CriteriaList"][0]["Occurrence"].update(
                IsDistinct=True
            ),
            "/InclusionRules/0/expression/CriteriaList/0/Occurrence/IsDistinct",
            "untranslatable",
        ),
        (
            lambda e: e["PrimaryCriteria"]["CriteriaList"][0]["ConditionOccurrence"].update(
                ConditionType=[{"CONCEPT_ID": 32020}]
            ),
            "/PrimaryCriteria/CriteriaList/0/ConditionOccurrence/ConditionType",
            "untranslatable",
        ),
        (
            lambda e: e["InclusionRules"][0]["expression"].update(
                Type="AT_LEAST",
                Count=2,
                CriteriaList=e["InclusionRules"][0]["expression"]["CriteriaList"] * 3,
            ),
            "/InclusionRules/0/expression",
            "untranslatable",
        ),
    ],
)
def test_what_changes_the_meaning_is_refused_and_named(change: Any, path: str, kind: str) -> None:
    document = load("t2dm-metformin.json")
    change(document["expression"])
    with pytest.raises(AtlasImportError) as refused:
        import_atlas(document)
    assert (path, kind) in {(i.path, i.kind) for i in refused.value.report.refusals}
    assert path in str(refused.value)


def test_occurrences_exactly_and_at_most(engine: Any, terminology: Terminology) -> None:
    document = load("t2dm-metformin.json")
    rule = document["expression"]["InclusionRules"][0]["expression"]["CriteriaList"][0]
    rule["StartWindow"] = {"Start": {"Coeff": -1}, "End": {"Coeff": 1}}
    prescriptions = {
        n: [patient(), t2(), *(medication("109081006", f"202{k}-02-01") for k in range(n))]
        for n in range(4)
    }
    document["expression"]["InclusionRules"] = document["expression"]["InclusionRules"][:1]
    named = {f"n{n}": facts for n, facts in prescriptions.items()}
    for occurrence, expected in (
        ({"Type": 0, "Count": 2}, {"n2"}),  # exactly 2
        ({"Type": 1, "Count": 1}, {"n0", "n1"}),  # at most 1
        ({"Type": 2, "Count": 2}, {"n2", "n3"}),  # at least 2
        ({"Type": 0, "Count": 0}, {"n0"}),  # none
    ):
        rule["Occurrence"] = occurrence
        question = import_atlas(document).question
        assert members(engine, terminology, question, named) == expected, occurrence


def test_not_a_cohort_definition() -> None:
    with pytest.raises(ValueError, match="no PrimaryCriteria"):
        import_atlas({"resourceType": "Group"})
    with pytest.raises(ValueError, match="unknown accept"):
        import_atlas(load("t2dm-metformin.json"), accept=["everything"])
