"""Concept search and look-up under ``/v1/terminology`` (role sponsor), over the site's loaded
SNOMED CT release: finding the codes and ECL to write criteria with. Terminology is reference
data, not patient data: nothing here reads a fact.
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool

from core.auth import Principal, require_role
from core.codes import SNOMED, UnknownSystem, canonical_system
from core.http import problem_responses
from feasibility.atlas import ACCEPTABLE, AtlasImportError, import_atlas
from feasibility.expansion import ExpansionError, compile_question
from terminology.expand import Terminology
from terminology.store import NoRelease, search_words

Sponsor = Annotated[Principal, require_role("sponsor")]


async def _terminology(request: Request) -> Terminology:
    # async: it reads the app's state only, so it runs on the event loop (FastAPI hands a plain
    # function to a worker thread and back, a cost on every request)
    found = getattr(request.app.state, "terminology", None)
    if found is None:
        service = getattr(request.app.state, "feasibility", None)
        found = getattr(service, "terminology", None)
    if not isinstance(found, Terminology):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no terminology store here")
    return found


Terms = Annotated[Terminology, Depends(_terminology)]


def _snomed_only(system: str) -> None:
    try:
        canonical = canonical_system(system)
    except UnknownSystem as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if canonical != SNOMED:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"only SNOMED CT (and dm+d, which uses its ids) is searchable, not {system}",
        )


def _no_release(exc: NoRelease) -> HTTPException:
    # a part not set up at this site: 503 (with the problem handler's Retry-After, as every 503;
    # asking again helps only once a release is loaded)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))


def cheap_search(text: str) -> bool:
    """Whether a search for ``text`` reads only short lists from the index: an id, or words of
    two letters or more (the index keeps prefixes of 2, 3 and 4 letters). A one-letter word
    reads the list of every word it starts (over 100 ms of CPU on a UK-size release)."""
    text = text.strip()
    if text.isdigit():
        return True
    words = search_words(text)
    return bool(words) and all(len(w) >= 2 for w in words)


def _search(terms: Terminology, q: str, limit: int) -> dict[str, Any]:
    info = terms.store.current()
    if info is None:
        raise _no_release(NoRelease("no SNOMED CT release is loaded at this site"))
    found = terms.store.search(q, limit)
    return {"release": info.version, "results": [c.to_dict() for c in found]}


def build_router() -> APIRouter:
    router = APIRouter(
        prefix="/v1/terminology",
        tags=["terminology"],
        responses=problem_responses(401, 403, 503),
    )

    @router.get(
        "/search",
        summary="Find SNOMED CT concepts by words or by id",
        description="Concepts with a description holding a word starting with each word of "
        "`q` (or the concept whose id `q` is), with the preferred term, semantic tag and how "
        "many descendants each has: what `<<` would take in. Ranked: preferred-term matches "
        "first, then shorter terms.",
        responses=problem_responses(
            422, descriptions={422: "`q` or `limit` out of range, or a system other than SNOMED CT"}
        ),
    )
    async def search(
        principal: Sponsor,
        terms: Terms,
        q: Annotated[str, Query(min_length=1, max_length=200)],
        system: str = "snomed",
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        _snomed_only(system)
        if cheap_search(q):
            # a few milliseconds of SQLite: done here rather than handed to a worker thread and
            # back, two thread switches that on a loaded machine took longer than the search
            # (benchmarks/README.md, terminology_search_p99)
            return _search(terms, q, limit)
        return await run_in_threadpool(_search, terms, q, limit)

    @router.get("/status", summary="The loaded release and ValueSets")
    def release_status(principal: Sponsor, terms: Terms) -> dict[str, Any]:
        info = terms.store.current()
        return {
            "release": info.to_dict() if info is not None else None,
            "valuesets": terms.store.valuesets(),
            "generation": terms.store.generation(),
        }

    @router.get(
        "/{system}/{code}",
        summary="One concept with its parents and children",
        responses=problem_responses(
            404,
            422,
            descriptions={
                404: "No concept by that id in the loaded release",
                422: "A system other than SNOMED CT",
            },
        ),
    )
    def concept(principal: Sponsor, terms: Terms, system: str, code: str) -> dict[str, Any]:
        _snomed_only(system)
        if not code.isdigit():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no concept {code}")
        info = terms.store.current()
        if info is None:
            raise _no_release(NoRelease("no SNOMED CT release is loaded at this site"))
        detail = terms.store.concept(int(code))
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no concept {code} in the release")
        return {"release": info.version, **detail.to_dict()}

    return router


def build_import_router() -> APIRouter:
    """``POST /v1/feasibility/import/atlas``: an ATLAS cohort definition as criteria."""
    router = APIRouter(
        prefix="/v1/feasibility/import",
        tags=["feasibility (sponsors)"],
        responses=problem_responses(401, 403, 503),
    )

    @router.post(
        "/atlas",
        summary="Translate an ATLAS (OHDSI Circe) cohort definition into criteria",
        description="The criteria (`concierge.criteria/1`, ready for `/ask` or a saved "
        "question), the report of what did not translate exactly (`report.issues`, each with "
        "`changes_meaning`), and what each concept set expands to in this site's release "
        "(`terminology`). 422 with the report when a part that changes the meaning does not "
        "translate, unless its kind is listed in `accept` ("
        + ", ".join(f"`{k}`: {v}" for k, v in ACCEPTABLE.items())
        + "). Reads no patient data and costs no query budget.",
        responses=problem_responses(
            422,
            descriptions={
                422: "Not a cohort definition, a part that changes the meaning does not "
                "translate (`detail`: `message` and `report`), or the translated criteria "
                "cannot be expanded here (`detail`: `message`, `errors`, `criteria`, `report`)"
            },
        ),
    )
    def atlas(
        request: Request,
        principal: Sponsor,
        definition: Annotated[dict[str, Any], Body(description="The JSON ATLAS exports")],
        accept: Annotated[list[str] | None, Query()] = None,
    ) -> dict[str, Any]:
        try:
            imported = import_atlas(definition, accept or ())
        except AtlasImportError as exc:
            request.state.audit_detail = {"atlas": "refused"}
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                {"message": str(exc), "report": exc.report.to_dict()},
            ) from None
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        service = getattr(request.app.state, "feasibility", None)
        source = getattr(request.app.state, "terminology", None) or getattr(
            service, "terminology", None
        )
        try:
            compiled = compile_question(imported.question, source)
        except ExpansionError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                {
                    "message": "the translated criteria cannot be expanded here",
                    "errors": exc.errors,
                    "criteria": imported.criteria,
                    "report": imported.report.to_dict(),
                },
            ) from None
        return {
            "criteria": imported.criteria,
            "report": imported.report.to_dict(),
            "terminology": compiled.report,
        }

    return router


__all__ = ["build_import_router", "build_router"]
