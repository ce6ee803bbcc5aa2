"""The OpenAPI document says what the API answers, route by route (read from the document the
app serves; ``tests/contract`` checks the running API against it with schemathesis).

* every error is ``application/problem+json`` (:class:`core.http.Problem`) under ``/v1``, an
  OperationOutcome in ``application/fhir+json`` under ``/fhir``; never FastAPI's
  ``application/json`` validation error;
* every route that needs a token documents 401 (with ``WWW-Authenticate``), 403 and 503; every
  429 and 503 says ``Retry-After``;
* FHIR routes take and answer FHIR JSON; criteria mark their ``type`` required.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import BaseModel

from concierge.api import create_app
from core.http import FHIR_JSON, PROBLEM, RETRY_AFTER_SECONDS, install_problem_details
from feasibility.criteria import json_schema, parse_question
from tests.api_world import settings_for

PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
OUTCOME_REF = {"$ref": "#/components/schemas/OperationOutcome"}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = create_app(settings_for(tmp_path_factory.mktemp("openapi") / "home"))
    with TestClient(app) as client:
        found: dict[str, Any] = client.get("/openapi.json").json()
    return found


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def test_every_error_is_a_problem_or_an_operation_outcome(document: dict[str, Any]) -> None:
    problem = {PROBLEM: {"schema": PROBLEM_REF}}
    outcome = {FHIR_JSON: {"schema": OUTCOME_REF}}
    seen = 0
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if status.startswith("2") or (method, path) in PUBLIC:
                continue
            seen += 1
            where = f"{method.upper()} {path} {status}"
            if path.startswith("/fhir"):
                # FastAPI's own request validation is answered as a problem everywhere
                assert response["content"] == outcome or (
                    status == "422" and response["content"] == problem
                ), where
            else:
                assert response["content"] == problem, where
    assert seen > 100
    schemas = document["components"]["schemas"]
    assert {"Problem", "InvalidInput", "OperationOutcome"} <= set(schemas)
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body: never what is answered


def test_every_route_with_a_token_documents_its_refusals(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        if (method, path) in PUBLIC:
            assert operation.get("security") is None, where
            continue
        assert operation["security"] == [{"HTTPBearer": []}], where
        assert {"401", "403", "503"} <= set(responses), where
        assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True, where
        for status in ("429", "503"):
            if status in responses:
                assert responses[status]["headers"]["Retry-After"]["required"] is True, where
        if "requestBody" in operation:
            assert ("400" in responses and "422" in responses) or path.startswith("/fhir"), where


def test_fhir_routes_take_and_answer_fhir_json(document: dict[str, Any]) -> None:
    fhir = [(m, p, o) for m, p, o in operations(document) if p.startswith("/fhir")]
    assert len(fhir) == 4
    for method, path, operation in fhir:
        where = f"{method.upper()} {path}"
        for status, response in operation["responses"].items():
            if status.startswith("2"):
                assert set(response["content"]) == {FHIR_JSON}, where
        if method in ("post", "put"):
            body = operation["requestBody"]
            assert body["required"] is True, where
            assert set(body["content"]) == {FHIR_JSON, "application/json"}, where
            assert {"413", "400"} <= set(operation["responses"]), where
        parameters = {p["name"] for p in operation.get("parameters", [])}
        assert "content-type" not in parameters, where  # the body's media type says it
    created = document["paths"]["/fhir/{resource_type}"]["post"]["responses"]
    assert {"200", "201", "422"} <= set(created)
    assert "Location" in created["201"]["headers"]


def test_readiness_documents_its_503(document: dict[str, Any]) -> None:
    refused = document["paths"]["/readyz"]["get"]["responses"]["503"]
    assert refused["headers"]["Retry-After"]["required"] is True
    assert refused["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}
    }


def test_a_criterion_without_its_type_is_refused_and_the_schema_says_it_is_required(
    document: dict[str, Any],
) -> None:
    for schemas in (document["components"]["schemas"], json_schema()["$defs"]):
        mapping = schemas["Not"]["properties"]["criterion"]["discriminator"]["mapping"]
        assert len(mapping) == 14
        for ref in mapping.values():
            name = ref.rsplit("/", 1)[-1]
            assert "type" in schemas[name]["required"], name
    # as the schema says: parsing refuses a criterion that does not say its kind
    with pytest.raises(ValueError, match="type"):
        parse_question({"inclusion": [{"any_of": [{"codes": [{"concept": "hba1c"}]}]}]})


def test_a_bare_criterion_step_and_days_before_are_in_the_schema_as_parsing_accepts_them() -> None:
    schema = json_schema()["$defs"]
    for step in ("InclusionStep", "ExclusionStep"):
        assert len(schema[step]["anyOf"]) == 2  # a step, or a bare criterion
    assert "days_before" in schema["Window"]["properties"]
    question = parse_question(
        {
            "inclusion": [
                {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]},
                {
                    "type": "observation",
                    "codes": [{"concept": "hba1c"}],
                    "window": {"days_before": 365},
                },
            ]
        }
    )
    assert len(question.inclusion) == 2


class _Body(BaseModel):
    n: int


def _problem_app() -> FastAPI:
    app = FastAPI()
    install_problem_details(app)

    @app.get("/v1/down")
    def down() -> None:
        raise HTTPException(503, "not running here")

    @app.get("/v1/down-for")
    def down_for() -> None:
        raise HTTPException(503, "behind", headers={"Retry-After": "2"})

    @app.post("/v1/echo")
    def echo(body: _Body) -> dict[str, int]:
        return {"n": body.n}

    return app


def test_every_503_says_when_to_ask_again() -> None:
    client = TestClient(_problem_app())
    down = client.get("/v1/down")
    assert down.status_code == 503
    assert down.headers["content-type"] == PROBLEM
    assert down.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    assert client.get("/v1/down-for").headers["retry-after"] == "2"  # its own, kept


def test_a_body_that_is_not_json_text_is_a_documented_400_problem() -> None:
    app = _problem_app()
    client = TestClient(app)
    refused = client.post(
        "/v1/echo", content=b"\xc3(", headers={"Content-Type": "application/json"}
    )
    assert refused.status_code == 400
    assert refused.headers["content-type"] == PROBLEM
    assert refused.json()["title"] == "Bad Request"
    invalid = client.post("/v1/echo", json={"n": "many"})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "n"]
    documented = app.openapi()["paths"]["/v1/echo"]["post"]["responses"]
    assert documented["400"]["content"] == {PROBLEM: {"schema": PROBLEM_REF}}
    assert documented["422"]["content"] == {PROBLEM: {"schema": PROBLEM_REF}}
