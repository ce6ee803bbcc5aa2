"""The terminology routes and ECL/ValueSet entries in sponsors' criteria, on the whole app in
process (``tests/api_world.py``: real stores, the hand-made SNOMED CT release loaded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_world import SPONSOR_ORG, World, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with build_world(tmp_path_factory.mktemp("terminology-routes")) as built:
        yield built


def sponsor(world: World) -> dict[str, str]:
    return world.headers("sponsor", SPONSOR_ORG)


def condition(entry: dict[str, Any]) -> dict[str, Any]:
    return {"title": "Diabetes", "inclusion": [{"type": "condition", "codes": [entry]}]}


def test_search_by_words_and_by_id(world: World) -> None:
    response = world.client.get(
        "/v1/terminology/search", params={"q": "diabetes type 2", "limit": 3},
        headers=sponsor(world),
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["release"].endswith("/version/20250401")
    first = body["results"][0]
    assert first == {
        "system": "http://snomed.info/sct",
        "code": "44054006",
        "term": "Type 2 diabetes mellitus",
        "fsn": "Diabetes mellitus type 2 (disorder)",
        "semantic_tag": "disorder",
        "active": True,
        "descendants": 3,
        "matched": "Type 2 diabetes mellitus",
    }
    assert len(body["results"]) == 3
    by_id = world.client.get(
        "/v1/terminology/search", params={"q": "73211009"}, headers=sponsor(world)
    ).json()
    assert [c["code"] for c in by_id["results"]] == ["73211009"]
    loinc = world.client.get(
        "/v1/terminology/search", params={"q": "x", "system": "loinc"}, headers=sponsor(world)
    )
    assert loinc.status_code == 422


def test_a_concept_with_its_parents_and_children(world: World) -> None:
    response = world.client.get("/v1/terminology/snomed/127013003", headers=sponsor(world))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["code"] for p in body["parents"]] == ["73211009", "90708001"]
    assert [c["code"] for c in body["children"]] == ["420279001"]
    assert body["term"] == "Diabetic renal disease"
    missing = world.client.get("/v1/terminology/snomed/123456789", headers=sponsor(world))
    assert missing.status_code == 404
    status = world.client.get("/v1/terminology/status", headers=sponsor(world)).json()
    assert status["release"]["active_concepts"] == 20


def test_an_ecl_question_is_answered_with_its_expansion_recorded(world: World) -> None:
    response = world.client.post(
        "/v1/feasibility/ask",
        json=condition({"system": "snomed", "ecl": "<< 73211009 MINUS << 46635009"}),
        headers=sponsor(world),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    [expansion] = body["terminology"]["expansions"]
    # a pointer into the criteria in their full form (steps written out)
    assert expansion["pointer"] == "/inclusion/0/any_of/0/codes/0"
    assert expansion["codes"] == 7
    assert expansion["release"].endswith("/version/20250401")
    # the synthetic population codes type 2 diabetes as 44054006: the same count as the code
    same = world.client.post(
        "/v1/feasibility/ask",
        json=condition({"system": "snomed", "code": "44054006"}),
        headers=sponsor(world),
    ).json()
    assert body["total"] == same["total"]


def test_an_expression_that_matches_nothing_is_a_warning(world: World) -> None:
    response = world.client.post(
        "/v1/feasibility/ask", json=condition({"ecl": "<< 999999999"}), headers=sponsor(world)
    )
    assert response.status_code == 200, response.text
    warnings = response.json()["terminology"]["warnings"]
    assert any("matches no concept" in w for w in warnings)


@pytest.mark.parametrize(
    ("entry", "pointer", "message"),
    [
        ({"ecl": "<< 73211009 AND"}, "/inclusion/0/codes/0/ecl", "ECL error at character 16"),
        (
            {"ecl": "<< 73211009 : 363698007 = *"},
            "/inclusion/0/codes/0/ecl",
            "character 13: refinements",
        ),
        (
            {"valueset": "https://example.org/nope"},
            "/inclusion/0/codes/0/valueset",
            "ValueSet https://example.org/nope is not loaded",
        ),
        ({"system": "icd10", "ecl": "<< 73211009"}, "/inclusion/0/codes/0", "ECL is for SNOMED CT"),
    ],
)
def test_bad_entries_are_422_at_their_place(
    world: World, entry: dict[str, Any], pointer: str, message: str
) -> None:
    for route, body, prefix in (
        ("ask", condition(entry), ""),
        ("saved-questions", {"id": "ecl-bad", "title": "Bad", "criteria": condition(entry)},
         "/criteria"),
    ):  # fmt: skip
        response = world.client.post(f"/v1/feasibility/{route}", json=body, headers=sponsor(world))
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["pointer"] == prefix + pointer, error
        assert message in error["msg"], error


def test_a_saved_question_keeps_its_expansion_in_its_record(world: World) -> None:
    trial = {
        "id": "ecl-saved",
        "title": "Diabetes by ECL",
        "criteria": condition({"ecl": "<< 44054006"}),
    }
    response = world.client.post("/v1/feasibility/saved-questions", json=trial,
                                 headers=sponsor(world))  # fmt: skip
    assert response.status_code == 201, response.text
    code = response.json()["criteria"]["inclusion"][0]["any_of"][0]["codes"][0]
    assert code["expansion"]["codes"] == {
        "http://snomed.info/sct": ["44054006", "313436004", "420279001", "999001021000000105"]
    }
    assert code["expansion"]["release"].endswith("/version/20250401")
    answer = world.client.get(
        "/v1/feasibility/saved-questions/ecl-saved/answer", headers=sponsor(world)
    )
    assert answer.status_code in (200, 503), answer.text


ATLAS = Path(__file__).resolve().parents[4] / "docs" / "examples" / "atlas"


def test_import_atlas_translates_reports_and_refuses(world: World) -> None:
    clean = json.loads((ATLAS / "t2dm-metformin.json").read_text())
    response = world.client.post("/v1/feasibility/import/atlas", json=clean, headers=sponsor(world))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["report"]["refused"] is False
    assert body["criteria"]["inclusion"][0]["any_of"][0]["id"] == "index_event"
    ecl = [e for e in body["terminology"]["expansions"] if "ecl" in e]
    assert {e["ecl"] for e in ecl} == {
        "<< 44054006 MINUS << 999001021000000105",
        "<< 109081006",
        "<< 46635009",
    }
    # the translation is criteria the API answers
    asked = world.client.post("/v1/feasibility/ask", json=body["criteria"], headers=sponsor(world))
    assert asked.status_code == 200, asked.text

    changed = json.loads((ATLAS / "dkd-older-women.json").read_text())
    refused = world.client.post(
        "/v1/feasibility/import/atlas", json=changed, headers=sponsor(world)
    )
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert detail["report"]["refused"] is True
    kinds = {i["kind"] for i in detail["report"]["issues"] if i["changes_meaning"]}
    assert kinds == {"observation_window", "age_at_index"}
    accepted = world.client.post(
        "/v1/feasibility/import/atlas",
        params=[("accept", "observation_window"), ("accept", "age_at_index")],
        json=changed,
        headers=sponsor(world),
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["report"]["accepted"] == ["observation_window", "age_at_index"]


def test_import_atlas_on_the_command_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from concierge.cli import main

    runner = CliRunner()
    refused = runner.invoke(
        main, ["feasibility", "import-atlas", str(ATLAS / "dkd-older-women.json")]
    )
    assert refused.exit_code == 1
    assert "accept with observation_window" in refused.output
    out = tmp_path / "criteria.json"
    done = runner.invoke(
        main,
        [
            "feasibility",
            "import-atlas",
            str(ATLAS / "dkd-older-women.json"),
            "--accept",
            "observation_window",
            "--accept",
            "age_at_index",
            "--out",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "accepted [age_at_index]" in done.output
    criteria = json.loads(out.read_text())
    assert [s["label"] for s in criteria["inclusion"]] == [
        "initial event",
        "Women aged 65 or over",
        "Two eGFR results under 60 at any time",
        "No dialysis",
    ]
