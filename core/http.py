"""Cross-cutting HTTP behaviour: problem+json errors under /v1 and an audit record per request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM = "application/problem+json"


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
        title = {
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
        return problem(exc.status_code, title, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg")}
            | ({"pointer": e["pointer"]} if "pointer" in e else {})
            for e in exc.errors()
        ]
        return problem(422, "Invalid request", errors)


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
            # the audit write is a SQL transaction: off the event loop, so other requests go
            # on meanwhile; it completes before this response is sent (no unaudited answer)
            await run_in_threadpool(
                request.app.state.audit.append,
                actor=principal.sub if principal else "anonymous",
                role=principal.role if principal else "anonymous",
                org=principal.org if principal else "",
                action=f"{request.method} {request.url.path}",
                detail=detail,
            )
        return response


__all__ = ["HTTPException", "install_audit", "install_problem_details", "problem"]
