"""Concept search and look-up under ``/v1/terminology`` (role sponsor), over the site's loaded
SNOMED CT release: finding the codes and ECL to write criteria with. Terminology is reference
data, not patient data: nothing here reads a fact.
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status

from core.auth import Principal, require_role
from core.codes import SNOMED, UnknownSystem, canonical_system
from terminology.expand import Terminology
from terminology.store import NoRelease

Sponsor = Annotated[Principal, require_role("sponsor")]


def _terminology(request: Request) -> Terminology:
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
    # a part not set up at this site: 503 without Retry-After (asking again will not help)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1/terminology", tags=["terminology"])

    @router.get(
        "/search",
        summary="Find SNOMED CT concepts by words or by id",
        description="Concepts with a description holding a word starting with each word of "
        "`q` (or the concept whose id `q` is), with the preferred term, semantic tag and how "
        "many descendants each has: what `<<` would take in. Ranked: preferred-term matches "
        "first, then shorter terms.",
    )
    def search(
        principal: Sponsor,
        terms: Terms,
        q: Annotated[str, Query(min_length=1, max_length=200)],
        system: str = "snomed",
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        _snomed_only(system)
        info = terms.store.current()
        if info is None:
            raise _no_release(NoRelease("no SNOMED CT release is loaded at this site"))
        found = terms.store.search(q, limit)
        return {"release": info.version, "results": [c.to_dict() for c in found]}

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
    )
    def concept(principal: Sponsor, terms: Terms, system: str, code: str) -> dict[str, Any]:
        _snomed_only(system)
        if not code.isdigit():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no concept {code}")
        try:
            detail = terms.store.concept(int(code))
            info = terms.store.current()
        except NoRelease as exc:
            raise _no_release(exc) from None
        if detail is None or info is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no concept {code} in the release")
        return {"release": info.version, **detail.to_dict()}

    return router


__all__ = ["build_router"]
