"""Cross-cutting HTTP behaviour: problem+json errors under /v1 (OperationOutcomes under /fhir),
an audit record per request, and the OpenAPI description of those errors.

Every error the API answers is described in its OpenAPI document by the same few objects:
:func:`problem_responses` (``application/problem+json``, the :class:`Problem` model) and
:func:`outcome_responses` (``application/fhir+json``, an :class:`OperationOutcome`), each status
with its standard description and headers (``Retry-After`` on 429 and 503,
``WWW-Authenticate`` on 401). Routers pass them as ``responses=``; ``tests/contract`` checks the
document against the running API with schemathesis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.audit import AuditWriter

PROBLEM = "application/problem+json"
FHIR_JSON = "application/fhir+json"
#: Seconds a 429 or 503 asks the caller to wait when the code refusing does not say.
RETRY_AFTER_SECONDS = 5


class InvalidInput(BaseModel):
    """One reason a request was refused as invalid (a 422's ``detail`` lists them)."""

    loc: list[str | int] = Field(
        description="Where: the part of the request (body, query, path) and the path into it"
    )
    msg: str = Field(description="Why, in words")
    pointer: str | None = Field(
        default=None,
        description="Criteria bodies: a JSON pointer (RFC 6901) into the body as sent",
    )


class Problem(BaseModel):
    """An error of the product API: RFC 9457 problem details."""

    type: str = Field(default="about:blank", description="A URI naming the kind of problem")
    title: str = Field(description="The status in words (Unauthorized, Conflict, ...)")
    status: int = Field(description="The HTTP status")
    detail: str | list[InvalidInput] | dict[str, Any] | None = Field(
        default=None,
        description="What went wrong: a sentence; for 422, one entry per invalid input; for a "
        "view that is not current (503), `message` and `waiting_for`",
    )


class OutcomeIssue(BaseModel):
    """One issue of an OperationOutcome (FHIR R4/R5); other FHIR elements may appear."""

    model_config = ConfigDict(extra="allow")

    severity: Literal["fatal", "error", "warning", "information"]
    code: str = Field(description="An IssueType code: invalid, structure, login, forbidden, ...")
    diagnostics: str | None = None
    expression: list[str] | None = None


class OperationOutcome(BaseModel):
    """A FHIR OperationOutcome: how the FHIR endpoint answers what it refuses (and, with
    ``information`` issues, what it accepted)."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["OperationOutcome"]  # the FHIR element's name
    issue: list[OutcomeIssue]


#: What each error status means wherever it is answered (a route may say more).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body cannot be read (not JSON text in UTF-8)",
    401: "No bearer token, or one that is not valid (expired, not yet valid, revoked, signed "
    "with an unknown key, for another audience or from another issuer)",
    403: "The token's role (or its practitioner or source system) does not allow this route",
    404: "Nothing here by that id, or nothing the caller may see",
    409: "The request conflicts with the current state",
    413: "The body is larger than the limit, or than the broker accepts (dead-lettered)",
    422: "The request is not valid: `detail` says where and why",
    429: "The organisation's query budget is spent, or it is locked out; `Retry-After` says "
    "when to ask again",
    503: "A part this answer needs is not available now (a view behind, a store or the broker "
    "not answering, the token check unavailable); `Retry-After` says when to ask again",
}

RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before asking again",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
WWW_AUTHENTICATE_HEADER: dict[str, Any] = {
    "WWW-Authenticate": {
        "description": '`Bearer`, with `error="invalid_token"` when a token was sent',
        "required": True,
        "schema": {"type": "string"},
    }
}


def _error_headers(status: int) -> dict[str, Any]:
    if status in (429, 503):
        return RETRY_AFTER_HEADER
    if status == 401:
        return WWW_AUTHENTICATE_HEADER
    return {}


def problem_responses(
    *statuses: int, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each status answered as ``application/problem+json``
    (:class:`Problem`), with its standard description (or the one given) and headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": (descriptions or {}).get(status, ERROR_DESCRIPTIONS[status]),
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if headers := _error_headers(status):
            response["headers"] = headers
        out[status] = response
    return out


def outcome_responses(
    *statuses: int, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for FHIR routes (their response class answers ``application/fhir+json``):
    each status answered with an :class:`OperationOutcome`, its description and headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "model": OperationOutcome,
            "description": (descriptions or {}).get(status, ERROR_DESCRIPTIONS[status]),
        }
        if headers := _error_headers(status):
            response["headers"] = headers
        out[status] = response
    return out


def problem(
    status: int,
    title: str,
    detail: Any = None,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _operation_outcome(status: int, text: str, exc: StarletteHTTPException) -> JSONResponse:
    """FHIR clients are answered in FHIR: an OperationOutcome."""
    code = {401: "login", 403: "forbidden", 404: "not-found"}.get(status, "processing")
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return JSONResponse(
        body,
        status_code=status,
        media_type="application/fhir+json",
        headers=getattr(exc, "headers", None),
    )


def install_problem_details(app: FastAPI) -> None:
    """RFC 9457 problem details for the product API (the FHIR endpoint answers in FHIR)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code in (429, 503) and not any(
            name.lower() == "retry-after" for name in headers
        ):  # every refusal that may pass says when to ask again (as documented)
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        exc.headers = headers
        title = {
            400: "Bad Request",
            401: "Unauthorized",
            403: "Forbidden",
            404: "Not Found",
            409: "Conflict",
            422: "Unprocessable Content",
            429: "Too Many Requests",
            503: "Service Unavailable",
        }.get(exc.status_code, "Error")
        if request.url.path.startswith("/fhir"):
            return _operation_outcome(exc.status_code, str(exc.detail), exc)
        return problem(exc.status_code, title, exc.detail, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg")}
            | ({"pointer": e["pointer"]} if "pointer" in e else {})
            for e in exc.errors()
        ]
        return problem(422, "Invalid request", errors)

    install_problem_schema(app)


#: FastAPI's own description of a request validation error, which this API answers as a problem.
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def install_problem_schema(app: FastAPI) -> None:
    """Make the app's OpenAPI document say what :func:`install_problem_details` answers: add
    :class:`Problem` (the schema :func:`problem_responses` refers to) to its components
    (FastAPI adds only the models it is given as ``model``, and under the route's own media
    type, never ``application/problem+json``), replace the 422 FastAPI documents on every
    route with parameters (``application/json``, its ``HTTPValidationError``) by the problem
    the validation handler really answers, and add the 400 FastAPI answers (as a problem) to a
    JSON body it cannot decode."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            _, definitions = models_json_schema(
                [(Problem, "serialization")], ref_template="#/components/schemas/{model}"
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in definitions.get("$defs", {}).items():
                schemas.setdefault(name, schema)
            invalid, unreadable = problem_responses(422, 400).values()
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    found = responses.get("422", {})
                    schema = found.get("content", {}).get("application/json", {}).get("schema")
                    if schema == {"$ref": _FASTAPI_422}:
                        responses["422"] = invalid
                    # FastAPI answers 400 to a JSON body it cannot decode, before anything else
                    body = operation.get("requestBody", {}).get("content", {})
                    if "application/json" in body and "400" not in responses:
                        responses["400"] = unreadable
            if _FASTAPI_422 not in json.dumps(document.get("paths", {})):
                schemas.pop("HTTPValidationError", None)
                schemas.pop("ValidationError", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def audit_writer(app: FastAPI) -> AuditWriter:
    """The app's audit writer, for the audit log in ``app.state.audit`` (made on first use,
    and again if the log was replaced)."""
    writer: AuditWriter | None = getattr(app.state, "audit_writer", None)
    if writer is None or writer.log is not app.state.audit:
        writer = app.state.audit_writer = AuditWriter(app.state.audit)
    return writer


def install_audit(app: FastAPI) -> None:
    """One audit record per /v1 request: who, what, and the outcome."""

    @app.middleware("http")
    async def audit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.url.path.startswith("/v1"):
            principal = getattr(request.state, "principal", None)
            detail: dict[str, Any] = {
                "status": response.status_code,
                "query": str(request.url.query),
            }
            if principal is not None:  # the token's id: what `concierge token revoke` takes
                detail["jti"] = principal.jti
            detail.update(getattr(request.state, "audit_detail", {}))
            # the path as decoded, but a NUL kept escaped: PostgreSQL keeps no U+0000 in text
            path = request.url.path.replace("\x00", "%00")
            # handed to the audit writer's thread, which commits whatever has queued in one
            # transaction (core.audit.AuditWriter); the response waits for its record to be
            # committed (no unaudited answer) without holding a thread of the pool meanwhile
            committed = audit_writer(request.app).submit(
                actor=principal.sub if principal else "anonymous",
                role=principal.role if principal else "anonymous",
                org=principal.org if principal else "",
                action=f"{request.method} {path}",
                detail=detail,
            )
            await asyncio.wrap_future(committed)
        return response


__all__ = [
    "ERROR_DESCRIPTIONS",
    "FHIR_JSON",
    "PROBLEM",
    "RETRY_AFTER_SECONDS",
    "HTTPException",
    "InvalidInput",
    "OperationOutcome",
    "OutcomeIssue",
    "Problem",
    "audit_writer",
    "install_audit",
    "install_problem_details",
    "install_problem_schema",
    "outcome_responses",
    "problem",
    "problem_responses",
]
