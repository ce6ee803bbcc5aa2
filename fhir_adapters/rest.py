"""A FHIR-style REST endpoint for sources that push: ``POST /fhir`` for Bundles (including
Subscription notifications), ``POST``/``PUT``/``DELETE /fhir/{type}[/{id}]`` for resources.

Responses are FHIR: created/updated resources answer 201/200 with Location, invalid input answers
with an OperationOutcome (and is dead-lettered, so nothing is lost), Bundles answer with a
``batch-response`` Bundle giving each entry's outcome.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves string annotations against the
# module globals, so the ``Service`` dependency alias local to build_router would be read as a
# query parameter and every request would answer 422.

import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response

from .extract import FhirVersion
from .outcome import Issue, operation_outcome
from .pipeline import Ingestor, Outcome, loads

FHIR_JSON = "application/fhir+json"


class IngestService:
    """One Ingestor shared by the API's requests; each request is committed before answering."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self._lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[Ingestor]:
        with self._lock:
            try:
                yield self.ingestor
            finally:
                self.ingestor.commit()


def _fhir(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)


def _version(content_type: str | None) -> FhirVersion | None:
    if content_type and "fhirversion=5" in content_type.replace(" ", "").lower():
        return "R5"
    if content_type and "fhirversion=4" in content_type.replace(" ", "").lower():
        return "R4"
    return None


_STATUS = {
    "accepted": "201 Created",
    "unchanged": "200 OK",
    "skipped": "200 OK",
    "dead_lettered": "422 Unprocessable Entity",
}


def _location(outcome: Outcome) -> str:
    return f"{outcome.resource_type}/{outcome.resource_id}/_history/{outcome.seq}"


def _entry_response(outcome: Outcome) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _STATUS[outcome.status]}
    if outcome.resource_id and outcome.status == "accepted":
        response["location"] = (
            f"{outcome.resource_type}/{outcome.resource_id}/_history/{outcome.seq}"
        )
    if outcome.outcome is not None:
        response["outcome"] = outcome.outcome
    elif outcome.reason:
        response["outcome"] = operation_outcome(
            [Issue("informational", outcome.reason, severity="information")]
        )
    return {"response": response}


def _single(outcome: Outcome) -> Response:
    if outcome.status == "dead_lettered":
        return _fhir(outcome.outcome or operation_outcome([]), 422)
    headers = {}
    if outcome.resource_id:
        headers["Location"] = (
            f"{outcome.resource_type}/{outcome.resource_id}/_history/{outcome.seq}"
        )
    body = operation_outcome(
        [Issue("informational", outcome.reason or f"{outcome.status}", severity="information")]
    )
    return _fhir(body, 201 if outcome.status == "accepted" and outcome.seq == 1 else 200, headers)


def build_router(
    get_service: Any, max_body_bytes: int, dependencies: Sequence[Any] = ()
) -> APIRouter:
    """The ingest endpoint. ``dependencies`` run before every route (the API passes the
    ``source`` role check: only systems holding a source token may write)."""
    router = APIRouter(prefix="/fhir", tags=["FHIR ingest"], dependencies=list(dependencies))
    Service = Annotated[IngestService, Depends(get_service)]

    async def _body(request: Request) -> bytes:
        return await request.body()

    @router.post(
        "",
        summary="Ingest a Bundle (collection, transaction, batch, searchset, history "
        "or a Subscription notification)",
    )
    async def post_bundle(
        request: Request, service: Service, content_type: Annotated[str | None, Header()] = None
    ) -> Response:
        body = await _body(request)
        with service.session() as ingestor:
            gaps_before = len(ingestor.stats.gaps)
            outcomes = ingestor.ingest_text(body, "http:POST /fhir", _version(content_type))
            gaps = ingestor.stats.gaps[gaps_before:]
        if (
            len(outcomes) == 1
            and outcomes[0].resource_type in ("Bundle", "(unparsed)")
            and outcomes[0].status == "dead_lettered"
        ):
            return _fhir(outcomes[0].outcome or {}, 400)
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [_entry_response(o) for o in outcomes],
        }
        if gaps:
            bundle["meta"] = {
                "tag": [
                    {
                        "system": "urn:concierge:subscription-gap",
                        "code": "gap",
                        "display": orjson.dumps(gaps).decode(),
                    }
                ]
            }
        return _fhir(bundle, 200)

    @router.post("/{resource_type}", summary="Create a resource")
    async def create(
        resource_type: str,
        request: Request,
        service: Service,
        content_type: Annotated[str | None, Header()] = None,
    ) -> Response:
        body = await _body(request)
        return _ingest_one(
            service, body, resource_type, None, _version(content_type), max_body_bytes, "POST"
        )

    @router.put("/{resource_type}/{resource_id}", summary="Create or update a resource")
    async def update(
        resource_type: str,
        resource_id: str,
        request: Request,
        service: Service,
        content_type: Annotated[str | None, Header()] = None,
    ) -> Response:
        body = await _body(request)
        return _ingest_one(
            service, body, resource_type, resource_id, _version(content_type), max_body_bytes, "PUT"
        )

    @router.delete("/{resource_type}/{resource_id}", summary="Delete (retract) a resource")
    async def delete(resource_type: str, resource_id: str, service: Service) -> Response:
        with service.session() as ingestor:
            outcome = ingestor.delete(
                resource_type, resource_id, f"http:DELETE /fhir/{resource_type}/{resource_id}"
            )
        return _fhir(
            operation_outcome(
                [Issue("informational", outcome.reason or "deleted", severity="information")]
            ),
            200,
        )

    return router


def _ingest_one(
    service: IngestService,
    body: bytes,
    resource_type: str,
    resource_id: str | None,
    version: FhirVersion | None,
    max_body_bytes: int,
    method: str,
) -> Response:
    origin = f"http:{method} /fhir/{resource_type}" + (f"/{resource_id}" if resource_id else "")
    with service.session() as ingestor:
        if len(body) > max_body_bytes:
            outcome = ingestor.dead_letter(
                body[:10_000],
                [Issue("too-long", f"body is {len(body)} bytes; the limit is {max_body_bytes}")],
                origin,
            )
            return _fhir(outcome.outcome or {}, 413)
        try:
            resource = loads(body)
        except orjson.JSONDecodeError as exc:
            outcome = ingestor.dead_letter(
                body, [Issue("structure", f"invalid JSON: {exc}")], origin
            )
            return _fhir(outcome.outcome or {}, 400)
        problem = None
        if not isinstance(resource, dict):
            problem = Issue("structure", "the body must be a FHIR resource (a JSON object)")
        elif resource.get("resourceType") != resource_type:
            problem = Issue(
                "invalid",
                f"resourceType {resource.get('resourceType')!r} does not "
                f"match the URL ({resource_type})",
                "resourceType",
            )
        elif resource_id is not None and resource.get("id") != resource_id:
            problem = Issue(
                "invalid",
                f"resource id {resource.get('id')!r} does not match the URL ({resource_id})",
                f"{resource_type}.id",
            )
        if problem is not None:
            outcome = ingestor.dead_letter(body, [problem], origin, resource_type, resource_id)
            return _fhir(outcome.outcome or {}, 400)
        if resource_id is None and "id" not in resource:
            resource = {**resource, "id": str(uuid.uuid4())}
        return _single(ingestor.ingest_resource(resource, origin, version))
