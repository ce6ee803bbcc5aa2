"""Criteria the schema admits but the product cannot handle are refused with a 422 that says
why, never answered 500 nor accepted and then lost. Both were found probing the API's contract
(``tests/contract``, ``docs/reference/api-contract.md``):

* ``index_date: "9999-12-31"`` answered 500 (the engines work in POSIX seconds, and the last
  instant of that day rounds into year 10000); dates far from 1970 rounded into the next day;
* a saved question whose connectives nested 200 deep was registered (201), and then skipped as
  unreadable by every reader of the trials topic (their JSON parser's recursion is bounded).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import pytest

from feasibility.criteria import (
    FIRST_INDEX_DATE,
    LAST_INDEX_DATE,
    MAX_NESTING,
    CriteriaError,
    json_schema,
    parse_question,
)
from feasibility.saved import SavedTrial
from tests.api_world import SPONSOR_ORG, World, build_world

DIABETES: dict[str, Any] = {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}


def nested(depth: int) -> dict[str, Any]:
    """A criterion under ``depth`` connectives (alternating not and all_of)."""
    criterion = DIABETES
    for level in range(depth):
        criterion = (
            {"type": "not", "criterion": criterion}
            if level % 2
            else {"type": "all_of", "criteria": [criterion]}
        )
    return criterion


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with build_world(tmp_path_factory.mktemp("limits")) as found:
        yield found


def test_index_dates_are_those_whose_instant_survives_the_engines_seconds() -> None:
    for outside in ("9999-12-31", "2200-01-01", "1799-12-31", "0001-01-01"):
        with pytest.raises(CriteriaError, match="index_date"):
            parse_question({"index_date": outside, "inclusion": [DIABETES]})
    for day in (FIRST_INDEX_DATE, date(1970, 1, 1), date(2026, 12, 7), LAST_INDEX_DATE):
        question = parse_question({"index_date": day.isoformat(), "inclusion": [DIABETES]})
        at = question.index_instant(datetime.now(UTC))
        assert at.date() == day and at.tzinfo is UTC
        # the engines' POSIX seconds come back to the same day (9999-12-31's did not)
        assert datetime.fromtimestamp(at.timestamp(), UTC).date() == day, day


def test_an_index_date_at_the_end_of_time_is_a_422_not_a_500(world: World) -> None:
    headers = world.headers("sponsor", SPONSOR_ORG)
    refused = world.client.post(
        "/v1/feasibility/ask",
        json={"index_date": "9999-12-31", "inclusion": [DIABETES]},
        headers=headers,
    )
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert "index_date" in str(refused.json()["detail"])
    answered = world.client.post(
        "/v1/feasibility/ask",
        json={
            "index_date": LAST_INDEX_DATE.isoformat(),
            "inclusion": [DIABETES, {"type": "age", "min": 18}],
        },
        headers=headers,
    )
    assert answered.status_code == 200, answered.text
    assert answered.json()["index_instant"].startswith(LAST_INDEX_DATE.isoformat())
    assert date.fromisoformat(answered.json()["index_instant"][:10]) == LAST_INDEX_DATE


def test_connectives_nest_at_most_so_deep() -> None:
    question = parse_question({"inclusion": [nested(MAX_NESTING)]})
    assert question.inclusion[0].any_of[0].type in ("all_of", "not")
    with pytest.raises(CriteriaError, match=f"nests all_of/any_of/not {MAX_NESTING + 1} deep"):
        parse_question({"inclusion": [nested(MAX_NESTING + 1)]})
    with pytest.raises(CriteriaError, match="exclusion step 0"):
        parse_question({"inclusion": [DIABETES], "exclusion": [nested(MAX_NESTING + 5)]})


def test_a_saved_question_as_deep_as_allowed_is_readable_by_the_trials_topic_readers(
    world: World,
) -> None:
    headers = world.headers("sponsor", SPONSOR_ORG)
    deep = {"id": "limits-deep", "title": "Deep", "criteria": {"inclusion": [nested(200)]}}
    refused = world.client.post("/v1/feasibility/saved-questions", json=deep, headers=headers)
    assert refused.status_code == 422, refused.text
    assert "at most 32" in str(refused.json()["detail"])
    deepest = {
        "id": "limits-deepest",
        "title": "As deep as allowed",
        "criteria": {"inclusion": [nested(MAX_NESTING)]},
    }
    registered = world.client.post("/v1/feasibility/saved-questions", json=deepest, headers=headers)
    assert registered.status_code == 201, registered.text
    # the registry read its own record back from JSON (it skips records it cannot parse)
    read = world.client.get("/v1/feasibility/saved-questions/limits-deepest", headers=headers)
    assert read.status_code == 200, read.text
    saved = world.app.state.feasibility.saved.trials["limits-deepest"]
    assert SavedTrial.model_validate_json(saved.to_json()) == saved


def test_the_criteria_schema_says_how_deep() -> None:
    schema = json_schema()
    assert "nest at most 32 deep" in " ".join(schema["description"].split())
    assert "1800-01-01 to 2199-12-31" in schema["properties"]["index_date"]["description"]


def test_a_saved_questions_texts_are_what_the_recruitment_store_can_keep(world: World) -> None:
    """A title with U+0000, or a site code longer than the recruitment store's column, was
    registered (201) and then stopped the recruitment consumer on PostgreSQL, which retries a
    batch the database refuses and then gives up. Each is refused with a 422 naming it."""
    headers = world.headers("sponsor", SPONSOR_ORG)
    trial = {"id": "limits-texts", "title": "Texts", "criteria": {"inclusion": [DIABETES]}}
    for change, loc in (
        ({"title": "T2DM\u0000"}, ["body", "title"]),
        ({"recruiting_sites": ["R" * 129]}, ["body", "recruiting_sites", 0]),
        ({"recruiting_sites": ["RA3\u0000"]}, ["body", "recruiting_sites", 0]),
        ({"site_targets": {"R\u0000": 3}}, ["body", "site_targets", "R\u0000", "[key]"]),
        ({"recruiters": {"RA3": "urn:x|Practitioner|\u0000"}}, ["body", "recruiters", "RA3"]),
    ):
        refused = world.client.post(
            "/v1/feasibility/saved-questions", json={**trial, **change}, headers=headers
        )
        assert refused.status_code == 422, (change, refused.text)
        assert refused.json()["detail"][0]["loc"] == loc, change
    fine = {**trial, "recruiting_sites": ["R" * 128], "recruiters": {"RA3": "urn:x|Practitioner|1"}}
    registered = world.client.post("/v1/feasibility/saved-questions", json=fine, headers=headers)
    assert registered.status_code == 201, registered.text


def test_an_organisation_named_with_a_nul_is_a_422(world: World) -> None:
    admin = world.headers("admin", "Leeds site")
    refused = world.client.post("/v1/admin/budgets/Acme%00/unlock", headers=admin)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["path", "org"]
    unlocked = world.client.post(f"/v1/admin/budgets/{SPONSOR_ORG}/unlock", headers=admin)
    assert unlocked.status_code == 200, unlocked.text
