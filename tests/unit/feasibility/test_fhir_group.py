"""A definitional FHIR R5 Group read as criteria: characteristics become funnel steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from feasibility.engines.reference import ReferenceEngine
from feasibility.engines.results import cohort
from feasibility.fhir_group import GroupError, question_from_group
from tests.spec.feasibility_helpers import AT, ICD10, medication, observation, patient, population
from tests.spec.feasibility_helpers import condition as condition_fact

EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "examples" / "fhir" / "t2dm-group.json"


def group() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(EXAMPLE.read_text())
    return document


def test_characteristics_become_steps_and_evaluate() -> None:
    question = question_from_group(group())
    assert [s.label for s in question.inclusion] == [
        "Type 2 diabetes", "Aged 18 to 80", "HbA1c 7.5% or more",
    ]  # fmt: skip
    assert [s.label for s in question.exclusion] == ["On insulin"]
    hba1c = question.inclusion[2].any_of[0]
    assert hba1c.type == "observation" and hba1c.value.ge == 7.5 and hba1c.value.unit == "%"
    pop = population(
        eligible=[patient(), condition_fact(ICD10, "E11.9"),
                  observation("59261-8", "2025-11-01", 64, "mmol/mol")],  # 8.0 %
        low=[patient(), condition_fact(ICD10, "E11.9"),
             observation("4548-4", "2025-11-01", 6.9, "%")],
        insulin=[patient(), condition_fact(ICD10, "E11.9"),
                 observation("4548-4", "2025-11-01", 8.1, "%"), medication("411529005")],
    )  # fmt: skip
    # the LOINC code in the Group is the NGSP one; the IFCC result of "eligible" is another
    # code, so only a concept would match both: the Group says exactly what it says
    assert cohort(question, ReferenceEngine().evaluate(question, pop, AT)) == set()
    pop["pct"] = population(
        p=[patient(), condition_fact(ICD10, "E11.9"), observation("4548-4", "2025-11-01", 8.0, "%")]
    )["p"]
    assert cohort(question, ReferenceEngine().evaluate(question, pop, AT)) == {"pct"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"membership": "enumerated"}, "definitional"),
        ({"characteristic": []}, "no inclusion"),
        ({"active": "perhaps"}, "invalid FHIR R5 Group"),
    ],
)
def test_unsupported_groups_are_refused_clearly(change: dict[str, Any], message: str) -> None:
    with pytest.raises(GroupError, match=message):
        question_from_group({**group(), **change})


def test_unknown_characteristic_codes_are_named() -> None:
    document = group()
    document["characteristic"][0]["code"] = {"coding": [{"system": "urn:x", "code": "42"}]}
    with pytest.raises(GroupError, match=r"characteristic\[0\].*not one this reader maps"):
        question_from_group(document)
