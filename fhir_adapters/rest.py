"""A FHIR-style REST endpoint for sources that push: ``POST /fhir`` for Bundles (including
Subscription notifications), ``POST``/``PUT``/``DELETE /fhir/{type}[/{id}]`` for resources.

Responses are FHIR: created/updated resources answer 201/200 with Location, invalid input answers
with an OperationOutcome (and is dead-lettered, so nothing is lost), Bundles answer with a
``batch-response`` Bundle giving each entry's outcome.

Each request is ingested as the source system its caller's token names (``get_source``), the
first part of every resource key it reaches: a source writes and retracts only its own source
system's resources. The type and id in a URL are checked before anything else (400, the FHIR id
type without the dot segments ``.`` and ``..``), and a ``Location`` is made only of checked,
escaped segments.

A request is answered only once what it published is on the broker (the producer flushed, every
delivery acknowledged) and the resource index committed. If publishing fails nothing of the
request is indexed (:meth:`~fhir_adapters.pipeline.Ingestor.abort`) and the answer says so: 503
with ``Retry-After`` when the broker is unreachable or slow (within
``CONCIERGE_INGEST_TIMEOUT_SECONDS``), 413 when a message is larger than the broker accepts.
Bodies are size-checked before they are parsed: on ``Content-Length`` at once, and while they
are read (in chunks, never past the limit) when there is none; single resources against
``CONCIERGE_MAX_RESOURCE_BYTES``, ``POST /fhir`` against ``CONCIERGE_MAX_BODY_BYTES``. The work
runs on a worker thread, one request at a time, so the event loop keeps serving other routes.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves string annotations against the
# module globals, so the ``Service`` dependency alias local to build_router would be read as a
# query parameter and every request would answer 422.

import asyncio
import math
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import orjson
from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from core.http import FHIR_JSON, OperationOutcome, outcome_responses

from .extract import FhirVersion
from .outcome import Issue, operation_outcome
from .pipeline import EXCERPT_BYTES, Excerpt, Ingestor, Outcome, loads
from .primitives import id_problem, is_id
from .sinks import DeliveryFailed

T = TypeVar("T")


class FhirJSONResponse(JSONResponse):
    """What the FHIR endpoint answers: FHIR JSON (its routes' response class, so the OpenAPI
    document names the media type they really answer)."""

    media_type = FHIR_JSON


class EntryResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(description="`201 Created`, `200 OK` or `422 Unprocessable Entity`")
    location: str | None = Field(default=None, description="`Type/id/_history/seq`, escaped")
    outcome: OperationOutcome | None = None


class BatchEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    response: EntryResponse


class BatchResponse(BaseModel):
    """The answer to ``POST /fhir``: one entry per resource, in order."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["Bundle"]  # the FHIR element's name
    type: Literal["batch-response"]
    entry: list[BatchEntry]
    meta: dict[str, Any] | None = Field(
        default=None, description="A `subscription-gap` tag when a notification skipped events"
    )


#: What the FHIR routes read: JSON under either media type (the body is parsed as JSON whatever
#: its Content-Type; ``fhirVersion=4`` or ``5`` in it picks the FHIR release).
_RESOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {
        "resourceType": {"type": "string", "description": "The type in the URL"},
        "id": {"type": "string", "description": "PUT: the id in the URL"},
    },
    "additionalProperties": True,
}
_DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {
        "resourceType": {
            "type": "string",
            "description": "`Bundle` (any type, Subscription notifications included), or a "
            "single resource",
        },
        "type": {"type": "string"},
        "entry": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": True,
}


#: An example of what a source sends (for the documentation; schemathesis sends it too).
_PATIENT_EXAMPLE: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "example-patient",
    "meta": {"versionId": "1", "lastUpdated": "2024-05-01T09:30:00Z"},
    "gender": "female",
    "birthDate": "1961-07-14",
}


def _fhir_body(schema: dict[str, Any], description: str, example: Any) -> dict[str, Any]:
    media = {"schema": schema, "examples": {"example": {"value": example}}}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {FHIR_JSON: media, "application/json": media},
        }
    }


#: A resource type and id in a URL (checked at the edge: the FHIR id type, no dot segments).
ResourceType = Annotated[str, Path(examples=["Patient"])]
ResourceId = Annotated[str, Path(examples=["example-patient"])]


_LOCATION = {
    "Location": {
        "description": "`Type/id/_history/seq` of the version stored",
        "required": False,
        "schema": {"type": "string"},
    }
}
_STORED: dict[int | str, dict[str, Any]] = {
    201: {
        "model": OperationOutcome,
        "description": "Stored as a new resource (an `information` issue says what happened)",
        "headers": _LOCATION,
    },
    200: {
        "model": OperationOutcome,
        "description": "A new version stored, or the same content already stored (unchanged), "
        "or a type the product does not use (skipped)",
        "headers": _LOCATION,
    },
}


class IngestBusy(RuntimeError):
    """The ingestor did not come free within the ingest timeout."""


class IngestService:
    """One Ingestor shared by the API's requests, one request at a time; each request is
    committed before it is answered, and aborted (nothing indexed) if anything fails."""

    def __init__(self, ingestor: Ingestor, timeout_seconds: float = 5.0) -> None:
        self.ingestor = ingestor
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        #: Requests wait their turn on the event loop, not on a worker thread (a thread blocked
        #: on the lock would hold one of the threadpool's tokens that every sync route needs).
        self._turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.timeout_seconds)))

    @contextmanager
    def session(self, timeout: float | None = None) -> Iterator[Ingestor]:
        """The ingestor, committed on leaving; on any error (the commit's included) the batch
        is aborted and the error raised. ``timeout``: how long to wait for the ingestor."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise IngestBusy(f"the ingestor was busy for {timeout:g} s")
        try:
            try:
                yield self.ingestor
            except BaseException:
                self.ingestor.abort()
                raise
            self.ingestor.commit()  # aborts the batch itself if it fails
        finally:
            self._lock.release()

    async def run(self, work: Callable[[Ingestor], T], source: str | None = None) -> T:
        """``work(ingestor)`` in a session, on a worker thread, after the requests before it;
        as the source system ``source`` (None: the ingestor's own), so keys, provenance and
        dead letters name the caller's source system."""
        loop = asyncio.get_running_loop()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = anyio.Lock()
        acquired = False
        with anyio.move_on_after(self.timeout_seconds):
            await turn.acquire()
            acquired = True
        if not acquired:
            raise IngestBusy(f"the ingestor was busy for {self.timeout_seconds:g} s")
        try:

            def job() -> T:
                with self.session(self.timeout_seconds) as ingestor, ingestor.acting_as(source):
                    return work(ingestor)

            # Not abandoned on cancellation: a request whose client went away still finishes
            # (and commits or aborts) before the next one starts.
            return await anyio.to_thread.run_sync(job)
        finally:
            turn.release()


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


#: A resource type as it may appear in a URL (the types themselves are checked later).
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{0,63}\Z")


def _location(outcome: Outcome) -> str | None:
    """``Type/id/_history/seq`` of an outcome, each segment escaped; None unless the type and
    id are ones a URL may carry (never a dot segment: ``Patient/..`` is not a resource)."""
    rtype, rid = outcome.resource_type, outcome.resource_id
    if not _TYPE_RE.match(rtype) or not is_id(rid) or outcome.seq is None:
        return None
    return f"{quote(rtype, safe='')}/{quote(str(rid), safe='')}/_history/{outcome.seq}"


def _path_problem(resource_type: str, resource_id: str | None) -> Issue | None:
    """Why the type or id in a request's URL is not one (checked at the edge, before anything
    is looked up or reflected), or None."""
    if not _TYPE_RE.match(resource_type):
        return Issue(
            "value", f"invalid resource type {resource_type[:80]!r} in the URL", "resourceType"
        )
    if resource_id is not None and not is_id(resource_id):
        return Issue("value", f"{id_problem(resource_id)} in the URL", f"{resource_type}.id")
    return None


def _refuse_path(
    ingestor: Ingestor, payload: bytes | dict[str, Any], problem: Issue, origin: str, rtype: str
) -> Response:
    """A request whose URL names no resource: dead-lettered with the reason (nothing is lost),
    answered 400 with the OperationOutcome."""
    outcome = ingestor.dead_letter(
        payload, [problem], origin, rtype if _TYPE_RE.match(rtype) else "(unparsed)"
    )
    return _fhir(outcome.outcome or {}, 400)


def _too_long(outcome: Outcome) -> bool:
    issues = (outcome.outcome or {}).get("issue") or [{}]
    return outcome.status == "dead_lettered" and issues[0].get("code") == "too-long"


def _entry_response(outcome: Outcome) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _STATUS[outcome.status]}
    location = _location(outcome) if outcome.status == "accepted" else None
    if location is not None:
        response["location"] = location
    if outcome.outcome is not None:
        response["outcome"] = outcome.outcome
    elif outcome.reason:
        response["outcome"] = operation_outcome(
            [Issue("informational", outcome.reason, severity="information")]
        )
    return {"response": response}


def _single(outcome: Outcome) -> Response:
    if outcome.status == "dead_lettered":
        return _fhir(outcome.outcome or operation_outcome([]), 413 if _too_long(outcome) else 422)
    headers = {}
    location = _location(outcome)
    if location is not None:
        headers["Location"] = location
    body = operation_outcome(
        [Issue("informational", outcome.reason or f"{outcome.status}", severity="information")]
    )
    return _fhir(body, 201 if outcome.status == "accepted" and outcome.created else 200, headers)


async def _read_body(request: Request, limit: int) -> bytes | Excerpt:
    """The body, or an :class:`Excerpt` of it if it is larger than ``limit``: refused on its
    Content-Length before reading more than an excerpt, else as soon as the limit is passed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        head = bytearray()
        async for chunk in request.stream():
            head += chunk[: EXCERPT_BYTES - len(head)]
            if len(head) >= EXCERPT_BYTES:
                break
        return Excerpt(bytes(head), int(declared), None)
    chunks: list[bytes] = []
    head = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if len(head) < EXCERPT_BYTES:
            head += chunk[: EXCERPT_BYTES - len(head)]
        if size > limit:
            return Excerpt(bytes(head), None, None)
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_oversize(
    ingestor: Ingestor,
    excerpt: Excerpt,
    limit: int,
    setting: str,
    origin: str,
    resource_type: str = "(unparsed)",
    resource_id: str | None = None,
) -> Response:
    size = (
        f"{excerpt.size} bytes (Content-Length)"
        if excerpt.size is not None
        else f"more than {limit} bytes"
    )
    outcome = ingestor.dead_letter(
        excerpt,
        [
            Issue(
                "too-long",
                f"the body is {size}; the limit is {limit} ({setting}); refused unread, "
                f"the dead letter holds its first {len(excerpt.head)} bytes",
            )
        ],
        origin,
        resource_type,
        resource_id,
    )
    return _fhir(outcome.outcome or {}, 413)


def _unavailable(service: IngestService, diagnostics: str) -> Response:
    body = operation_outcome([Issue("transient", diagnostics)])
    return _fhir(body, 503, {"Retry-After": service.retry_after})


async def _answer(
    service: IngestService,
    work: Callable[[Ingestor], Response],
    too_large: Callable[[Ingestor], Response] | None = None,
    source: str | None = None,
) -> Response:
    """Run ``work`` as the source system ``source`` and answer its response once committed; a
    failed publication answers 503 (retry later) or, if a message was too large for the
    broker, what ``too_large`` answers."""
    try:
        return await service.run(work, source)
    except IngestBusy as exc:
        return _unavailable(service, f"ingest is busy ({exc}); nothing was stored: retry")
    except DeliveryFailed as exc:
        if exc.kind == "too_large" and too_large is not None:
            try:
                return await service.run(too_large, source)
            except (IngestBusy, DeliveryFailed) as again:
                return _unavailable(service, f"nothing was stored ({again}): retry")
        return _unavailable(
            service,
            f"the broker did not acknowledge the publication ({exc}); nothing was stored: retry",
        )


def _too_large_for_broker(
    body: bytes, origin: str, resource_type: str = "(unparsed)", resource_id: str | None = None
) -> Callable[[Ingestor], Response]:
    def refuse(ingestor: Ingestor) -> Response:
        outcome = ingestor.dead_letter(
            Excerpt.of(body),
            [
                Issue(
                    "too-long",
                    "a message made from this request is larger than the broker accepts "
                    "(the topic's max.message.bytes); nothing of it was stored",
                )
            ],
            origin,
            resource_type,
            resource_id,
        )
        return _fhir(outcome.outcome or {}, 413)

    return refuse


#: The body's media type, read for its ``fhirVersion``; described by the request body in the
#: OpenAPI document, not as a parameter of its own.
ContentType = Annotated[str | None, Header(include_in_schema=False)]


def _own_source() -> None:
    """No source system from the caller: the ingestor writes as its own."""
    return None


def build_router(
    get_service: Any,
    max_resource_bytes: int,
    max_body_bytes: int,
    dependencies: Sequence[Any] = (),
    get_source: Any = None,
) -> APIRouter:
    """The ingest endpoint. ``dependencies`` run before every route (the API passes the
    ``source`` role check: only systems holding a source token may write). ``get_source``, a
    dependency, names the source system each request writes as (the API: the one its token
    names, so a source reaches only its own resources; None: the ingestor's own). Single
    resources are limited to ``max_resource_bytes``, ``POST /fhir`` bodies to
    ``max_body_bytes``. The type and id in a URL are checked before anything else."""
    router = APIRouter(
        prefix="/fhir",
        tags=["FHIR ingest"],
        dependencies=list(dependencies),
        default_response_class=FhirJSONResponse,
        responses=outcome_responses(
            401,
            403,
            503,
            descriptions={
                403: "Not a source token, or one that names no source system",
                503: "The broker did not acknowledge in time, or ingest was busy, or the "
                "token cannot be checked now: nothing was stored; `Retry-After` says when "
                "to ask again",
            },
        ),
    )
    Service = Annotated[IngestService, Depends(get_service)]
    Source = Annotated[str | None, Depends(get_source or _own_source)]

    @router.post(
        "",
        summary="Ingest a Bundle (collection, transaction, batch, searchset, history "
        "or a Subscription notification)",
        responses={
            200: {
                "model": BatchResponse,
                "description": "A `batch-response` Bundle: each entry's outcome (invalid "
                "entries are dead-lettered and answered `422` in their entry)",
            },
            **outcome_responses(
                400,
                413,
                descriptions={
                    400: "The body is not JSON, or not a Bundle or resource that can be read "
                    "(dead-lettered)",
                    413: "The body is over `CONCIERGE_MAX_BODY_BYTES`, a single resource over "
                    "`CONCIERGE_MAX_RESOURCE_BYTES`, or a message is larger than the broker "
                    "accepts (dead-lettered, nothing stored)",
                },
            ),
        },
        openapi_extra=_fhir_body(
            _DOCUMENT_SCHEMA,
            "A Bundle, or a single resource",
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"fullUrl": "urn:uuid:example-patient", "resource": _PATIENT_EXAMPLE}],
            },
        ),
    )
    async def post_bundle(
        request: Request,
        service: Service,
        source: Source,
        content_type: ContentType = None,
    ) -> Response:
        origin = "http:POST /fhir"
        body = await _read_body(request, max_body_bytes)
        if isinstance(body, Excerpt):
            excerpt = body
            return await _answer(
                service,
                lambda ingestor: _refuse_oversize(
                    ingestor, excerpt, max_body_bytes, "CONCIERGE_MAX_BODY_BYTES", origin
                ),
                source=source,
            )
        raw = body
        version = _version(content_type)
        return await _answer(
            service,
            lambda ingestor: _post_bundle(ingestor, raw, origin, version),
            _too_large_for_broker(raw, origin),
            source,
        )

    single_refusals = outcome_responses(
        400,
        413,
        422,
        descriptions={
            400: "The type or id in the URL is not one, the body is not JSON or not a "
            "resource, or its type or id does not match the URL (dead-lettered)",
            413: "The body is over `CONCIERGE_MAX_RESOURCE_BYTES`, or larger than the broker "
            "accepts (dead-lettered, nothing stored)",
            422: "The resource is not valid FHIR, or its patient cannot be resolved "
            "(dead-lettered: the OperationOutcome says why)",
        },
    )

    @router.post(
        "/{resource_type}",
        summary="Create a resource",
        status_code=201,
        responses={**_STORED, **single_refusals},
        openapi_extra=_fhir_body(
            _RESOURCE_SCHEMA, "A resource of the type in the URL", _PATIENT_EXAMPLE
        ),
    )
    async def create(
        resource_type: ResourceType,
        request: Request,
        service: Service,
        source: Source,
        content_type: ContentType = None,
    ) -> Response:
        return await _one(request, service, source, resource_type, None, content_type, "POST")

    @router.put(
        "/{resource_type}/{resource_id}",
        summary="Create or update a resource",
        responses={**_STORED, **single_refusals},
        openapi_extra=_fhir_body(
            _RESOURCE_SCHEMA,
            "A resource of the type in the URL, with the id in the URL",
            _PATIENT_EXAMPLE,
        ),
    )
    async def update(
        resource_type: ResourceType,
        resource_id: ResourceId,
        request: Request,
        service: Service,
        source: Source,
        content_type: ContentType = None,
    ) -> Response:
        return await _one(request, service, source, resource_type, resource_id, content_type, "PUT")

    async def _one(
        request: Request,
        service: IngestService,
        source: str | None,
        resource_type: str,
        resource_id: str | None,
        content_type: str | None,
        method: str,
    ) -> Response:
        origin = f"http:{method} /fhir/{resource_type}" + (f"/{resource_id}" if resource_id else "")
        body = await _read_body(request, max_resource_bytes)
        if isinstance(body, Excerpt):
            excerpt = body
            return await _answer(
                service,
                lambda ingestor: _refuse_oversize(
                    ingestor,
                    excerpt,
                    max_resource_bytes,
                    "CONCIERGE_MAX_RESOURCE_BYTES",
                    origin,
                    resource_type,
                    resource_id,
                ),
                source=source,
            )
        raw = body
        problem = _path_problem(resource_type, resource_id)
        if problem is not None:
            found = problem
            return await _answer(
                service,
                lambda ingestor: _refuse_path(ingestor, raw, found, origin, resource_type),
                source=source,
            )
        version = _version(content_type)
        return await _answer(
            service,
            lambda ingestor: _ingest_one(
                ingestor, raw, resource_type, resource_id, version, origin
            ),
            _too_large_for_broker(raw, origin, resource_type, resource_id),
            source,
        )

    @router.delete(
        "/{resource_type}/{resource_id}",
        summary="Delete (retract) a resource",
        responses={
            200: {
                "model": OperationOutcome,
                "description": "Retracted (or nothing of this source system's by that id)",
            },
            **outcome_responses(
                400,
                descriptions={400: "The type or id in the URL is not one (dead-lettered)"},
            ),
        },
    )
    async def delete(
        resource_type: ResourceType, resource_id: ResourceId, service: Service, source: Source
    ) -> Response:
        origin = f"http:DELETE /fhir/{resource_type}/{resource_id}"
        problem = _path_problem(resource_type, resource_id)
        if problem is not None:
            found = problem
            request = {"request": {"method": "DELETE", "url": f"{resource_type}/{resource_id}"}}
            return await _answer(
                service,
                lambda ingestor: _refuse_path(ingestor, request, found, origin, resource_type),
                source=source,
            )

        def work(ingestor: Ingestor) -> Response:
            # the caller's source system's resource only: another source's never matches
            outcome = ingestor.delete(resource_type, resource_id, origin)
            if outcome.status == "dead_lettered":
                return _fhir(outcome.outcome or {}, 400)
            return _fhir(
                operation_outcome(
                    [Issue("informational", outcome.reason or "deleted", severity="information")]
                ),
                200,
            )

        return await _answer(service, work, source=source)

    return router


def _post_bundle(
    ingestor: Ingestor, body: bytes, origin: str, version: FhirVersion | None
) -> Response:
    gaps_before = len(ingestor.stats.gaps)
    try:
        document = loads(body)
    except orjson.JSONDecodeError as exc:
        outcome = ingestor.dead_letter(body, [Issue("structure", f"invalid JSON: {exc}")], origin)
        return _fhir(outcome.outcome or {}, 400)
    outcomes = ingestor.ingest_document(document, body, origin, version)
    gaps = ingestor.stats.gaps[gaps_before:]
    is_bundle = isinstance(document, dict) and document.get("resourceType") == "Bundle"
    if len(outcomes) == 1 and outcomes[0].status == "dead_lettered":
        if outcomes[0].resource_type in ("Bundle", "(unparsed)"):
            return _fhir(outcomes[0].outcome or {}, 400)
        if not is_bundle and _too_long(outcomes[0]):
            return _fhir(outcomes[0].outcome or {}, 413)
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


def _ingest_one(
    ingestor: Ingestor,
    body: bytes,
    resource_type: str,
    resource_id: str | None,
    version: FhirVersion | None,
    origin: str,
) -> Response:
    try:
        resource = loads(body)
    except orjson.JSONDecodeError as exc:
        outcome = ingestor.dead_letter(body, [Issue("structure", f"invalid JSON: {exc}")], origin)
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
