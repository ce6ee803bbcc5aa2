"""HDR UK Cohort Discovery (RQuest) queries translated into criteria: one spec per varcat and
operator, how groups combine, and what is refused (with where), over the hand-made Athena
fixture ``tests/fixtures/omop/CONCEPT.csv``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from federation.bunny import BunnyError, ConceptMap, result, translate

G0, R0 = "/cohort/groups/0", "/cohort/groups/0/rules/0"
CONCEPTS = Path(__file__).resolve().parents[2] / "fixtures" / "omop" / "CONCEPT.csv"


@pytest.fixture(scope="module")
def concepts() -> ConceptMap:
    return ConceptMap.from_athena(CONCEPTS)


def rule(varcat: str, value: str, oper: str = "=", **more: Any) -> dict[str, Any]:
    return {"varname": "OMOP", "varcat": varcat, "type": "TEXT", "oper": oper, "value": value,
            **more}  # fmt: skip


def task(*groups: dict[str, Any], groups_oper: str = "AND") -> dict[str, Any]:
    return {
        "uuid": "q-1",
        "owner": "user1",
        "collection": "RQ-CC-1",
        "protocol_version": "v2",
        "char_salt": "salt",
        "cohort": {"groups": list(groups), "groups_oper": groups_oper},
    }


def group(*rules: dict[str, Any], rules_oper: str = "AND") -> dict[str, Any]:
    return {"rules": list(rules), "rules_oper": rules_oper}


def criterion(question: Any, step: int = 0) -> dict[str, Any]:
    data = json.loads(question.to_json())
    inner: dict[str, Any] = data["inclusion"][step]["any_of"][0]
    return {k: v for k, v in inner.items() if v is not None and k not in ("id", "label")}


def events(kind: str, system: str, code: str, key: str = "code") -> dict[str, Any]:
    return {"type": kind, "codes": [{"system": system, key: code}]}


def strip(c: dict[str, Any]) -> dict[str, Any]:
    """A criterion with its defaults left out, for comparison."""
    keep = {"type", "codes", "values", "min", "max", "value", "criterion", "criteria", "select"}
    out = {k: v for k, v in c.items() if k in keep and v is not None}
    if out.get("select") == "latest":  # the default
        del out["select"]
    if "codes" in out:
        out["codes"] = [{k: v for k, v in code.items() if v is not None} for code in out["codes"]]
    if "value" in out:
        out["value"] = {k: v for k, v in out["value"].items() if v is not None}
    if "criterion" in out:
        out["criterion"] = strip(out["criterion"])
    if "criteria" in out:
        out["criteria"] = [strip(x) for x in out["criteria"]]
    return out


@pytest.mark.parametrize(
    ("varcat", "value", "expected"),
    [
        ("Condition", "1567956", events("condition", "icd10", "E11", "prefix")),
        ("Condition", "201826", events("condition", "snomed", "44054006")),
        ("Observation", "4275495", events("observation", "snomed", "77176002")),
        ("Measurement", "3004410", events("observation", "loinc", "4548-4")),
        ("Drug", "35750001", events("medication", "dmd", "325278007")),
        ("Procedure", "2000000001", events("procedure", "opcs4", "K40", "prefix")),
        ("Person", "8507", {"type": "sex", "values": ["male"]}),
        ("Person", "8532", {"type": "sex", "values": ["female"]}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("oper", ["=", "!="])
def test_every_varcat_and_operator(
    concepts: ConceptMap, varcat: str, value: str, expected: dict[str, Any], oper: str
) -> None:
    question = translate(task(group(rule(varcat, value, oper))), concepts)
    got = strip(criterion(question))
    assert got == (expected if oper == "=" else {"type": "not", "criterion": expected})


def test_numeric_rules_age_and_measurement(concepts: ConceptMap) -> None:
    age = {"varname": "AGE", "varcat": "Person", "type": "NUM", "oper": "=", "value": "18|80"}
    assert strip(criterion(translate(task(group(age)), concepts))) == {
        "type": "age", "min": 18, "max": 80,
    }  # fmt: skip
    older = {**age, "value": "65.5.."}
    assert strip(criterion(translate(task(group(older)), concepts))) == {"type": "age", "min": 66}
    hba1c = {"varname": "OMOP=3004410", "varcat": "Measurement", "type": "NUM", "oper": "=",
             "value": "48.0|"}  # fmt: skip
    assert strip(criterion(translate(task(group(hba1c)), concepts))) == {
        "type": "observation",
        "codes": [{"system": "loinc", "code": "4548-4"}],
        "value": {"ge": 48.0},
        "select": "any",
    }


def test_groups_and_rules_combine(concepts: ConceptMap) -> None:
    dm, male = rule("Condition", "1567956"), rule("Person", "8507")
    both = translate(task(group(dm, male, rules_oper="OR")), concepts)
    assert strip(criterion(both))["type"] == "any_of"
    all_rules = translate(task(group(dm, male, rules_oper="AND")), concepts)
    assert strip(criterion(all_rules))["type"] == "all_of"
    # groups AND: one inclusion step per group; OR: one step, any of the groups
    anded = json.loads(translate(task(group(dm), group(male)), concepts).to_json())
    assert len(anded["inclusion"]) == 2
    ored = translate(task(group(dm), group(male), groups_oper="OR"), concepts)
    assert len(json.loads(ored.to_json())["inclusion"]) == 1
    assert strip(criterion(ored))["type"] == "any_of"


@pytest.mark.parametrize(
    ("query", "where"),
    [
        (task(group(rule("Condition", "999"))), "/cohort/groups/0/rules/0/value"),
        (task(group(rule("Drug", "1503297"))), "/cohort/groups/0/rules/0/value"),  # RxNorm
        (task(group(rule("Person", "8515"))), "/cohort/groups/0/rules/0/value"),  # race
        (task(group(rule("Condition", "1567956", oper=">"))), "/cohort/groups/0/rules/0/oper"),
        (task(group(rule("Condition", "1567956", time="|10:TIME:M"))), f"{R0}/time"),
        (task(group(rule("Specimen", "1567956"))), "/cohort/groups/0/rules/0"),
        (task(group(rule("Condition", "1567956"), rules_oper="XOR")), f"{G0}/rules_oper"),
        (task(), "/cohort/groups"),
        ({"cohort": {}}, "/cohort"),
    ],
)  # fmt: skip
def test_what_cannot_be_translated_is_refused_with_where(
    concepts: ConceptMap, query: dict[str, Any], where: str
) -> None:
    with pytest.raises(BunnyError) as caught:
        translate(query, concepts)
    assert caught.value.where == where


def test_the_result_has_bunnys_shape(tmp_path: Path, concepts: ConceptMap) -> None:
    query = task(group(rule("Condition", "1567956")))
    shown = result(query, {"value": 35, "display": "35", "suppressed": False})
    assert shown == {
        "uuid": "q-1",
        "status": "ok",
        "collection_id": "RQ-CC-1",
        "message": "",
        "protocolVersion": "v2",
        "queryResult": {"count": 35, "datasetCount": 1, "files": []},
    }
    withheld = result(query, {"value": None, "display": "withheld", "suppressed": True})
    assert withheld["queryResult"]["count"] == 0 and withheld["status"] == "ok"
    failed = result(query, None, "no")
    assert failed["status"] == "error" and failed["message"] == "no"
    # the map survives saving and opening
    concepts.save(tmp_path / "concepts.json")
    assert ConceptMap.open(tmp_path / "concepts.json").concepts == concepts.concepts
