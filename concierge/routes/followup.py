"""The trial team's follow-up API, under ``/v1/followup``.

See ``docs/how-to/follow-up-enrolled-participants.md``.

Each route admits one role of the trial team, and only for the trials its token names
(``concierge token create --role trial_data_manager --org Sponsor --trial T1``); another
trial is 404, as if it did not exist:

* ``trial_data_manager``: ``PUT|GET .../trials/{trial}/plan`` (the data scope, outcome
  definitions, safety contact and endpoint), ``PUT .../enrolments/{invitation}/arm`` (the arm
  recorded at enrolment), ``GET .../trials/{trial}/feed?after=&limit=`` (the feed by cursor),
  ``POST .../trials/{trial}/$export`` with its status and output files;
* ``safety_contact``: ``GET .../trials/{trial}/safety-events``;
* ``statistician``: ``GET .../trials/{trial}/endpoints[?drill=true]`` (counts per arm, with the
  resource versions behind them on drill-down).

Nothing here carries identity: participants are trial pseudonyms. Every request is audited by
the API's middleware; feed reads add the trial and the entries read.

Every answer read from what ``concierge followup`` writes (the feed, exports, safety events,
endpoint counts) says how current it is (``followup.progress``): ``partial``, ``lag`` and
``as_of`` in the body (headers ``X-Followup-Partial``, ``X-Followup-Lag``,
``X-Followup-As-Of`` on an export's NDJSON files), and 503 with ``Retry-After`` while the
consumer is down, has never run, or its lag cannot be measured.
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from core.auth import Principal, require_role
from core.http import problem_responses
from followup.export import Exports
from followup.plans import Plan
from followup.progress import RETRY_AFTER_SECONDS, Progress, Standing
from followup.service import FollowupService, NotFound

TRIAL_ID = Path(max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
DataManager = Annotated[Principal, require_role("trial_data_manager")]
Statistician = Annotated[Principal, require_role("statistician")]
SafetyContact = Annotated[Principal, require_role("safety_contact")]


def _service(request: Request) -> FollowupService:
    found: FollowupService | None = getattr(request.app.state, "followup", None)
    if found is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "follow-up is not running in this API (it needs the recruitment database)",
            headers={"Retry-After": "5"},
        )
    return found


Service = Annotated[FollowupService, Depends(_service)]


def _exports(request: Request) -> Exports:
    found: Exports | None = getattr(request.app.state, "followup_exports", None)
    if found is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "follow-up is not running in this API",
            headers={"Retry-After": "5"},
        )
    return found


ExportsDep = Annotated[Exports, Depends(_exports)]


def _standing(request: Request) -> Standing:
    """How current the follow-up tables are; 503 with ``Retry-After`` when nobody can say
    (the consumer is down or never ran, or the facts topic cannot be measured)."""
    progress: Progress | None = getattr(request.app.state, "followup_progress", None)
    if progress is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "follow-up is not running in this API",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    found = progress.standing()
    if not found.available:
        request.state.audit_detail = {"not_current": found.waiting_for}
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            {
                "message": "the follow-up tables are not known to be current",
                "waiting_for": [found.waiting_for],
                **found.body(),
            },
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return found


NOT_CURRENT = problem_responses(
    503,
    descriptions={
        503: "The follow-up consumer is down or has never run, or its lag cannot be measured: "
        "`detail.waiting_for` says which, `Retry-After` when to ask again"
    },
)


def _serves(principal: Principal, trial_id: str) -> None:
    if trial_id not in principal.trials:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no trial {trial_id} for you")


class Arm(BaseModel):
    arm: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9 _.:-]+$")


def build_router() -> APIRouter:
    errors = problem_responses(401, 403, 404, 422, 503)
    router = APIRouter(prefix="/v1/followup", tags=["follow-up (trial team)"], responses=errors)

    @router.put(
        "/trials/{trial_id}/plan",
        summary="Declare the trial's follow-up plan: data scope, outcomes, safety contact",
        responses=problem_responses(422),
    )
    def put_plan(
        principal: DataManager,
        service: Service,
        trial_id: Annotated[str, TRIAL_ID],
        plan: Annotated[Plan, Body()],
    ) -> dict[str, Any]:
        _serves(principal, trial_id)
        version = service.put_plan(trial_id, plan, principal.sub)
        return {"trial": trial_id, "version": version, "plan": plan.model_dump(mode="json")}

    @router.get("/trials/{trial_id}/plan", summary="The trial's follow-up plan")
    def get_plan(
        principal: Annotated[
            Principal, require_role("trial_data_manager", "statistician", "safety_contact")
        ],
        service: Service,
        trial_id: Annotated[str, TRIAL_ID],
    ) -> dict[str, Any]:
        _serves(principal, trial_id)
        try:
            version, plan = service.get_plan(trial_id)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return {"trial": trial_id, "version": version, "plan": plan.model_dump(mode="json")}

    @router.put(
        "/enrolments/{invitation_id}/arm",
        summary="Record the arm an enrolled participant was allocated to",
        responses=problem_responses(422),
    )
    def put_arm(
        principal: DataManager,
        service: Service,
        invitation_id: Annotated[str, Path(max_length=36, pattern=r"^[0-9a-f-]+$")],
        body: Arm,
    ) -> dict[str, Any]:
        try:
            trial_id = service.trial_of(invitation_id)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        _serves(principal, trial_id)
        service.record_arm(invitation_id, body.arm)
        return {"invitation": invitation_id, "trial": trial_id, "arm": body.arm}

    @router.get(
        "/trials/{trial_id}/feed",
        summary="The trial's follow-up feed, from a cursor",
        description="Entries after `after` (a feed `seq`), oldest first: `fact` (a resource "
        "version within the trial's scope, with provenance), `retraction` (a version the trial "
        "held is no longer true), `started`, `withdrawn` (consent withdrawn or a research "
        "opt-out: nothing of the participant follows), `safety`. Resume from `next`. "
        "`partial: true` when the follow-up consumer is behind the facts topic by more than "
        "`CONCIERGE_FOLLOWUP_MAX_LAG_SECONDS` (`lag`, `as_of`, `consumer` say how far).",
        responses={**problem_responses(422), **NOT_CURRENT},
    )
    def feed(
        request: Request,
        principal: DataManager,
        service: Service,
        trial_id: Annotated[str, TRIAL_ID],
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        _serves(principal, trial_id)
        standing = _standing(request)
        page = service.feed(trial_id, after, limit)
        request.state.audit_detail = {"trial": trial_id, "entries": len(page["entries"]),
                                      "partial": standing.partial}  # fmt: skip
        return {**page, **standing.body()}

    @router.post(
        "/trials/{trial_id}/$export",
        status_code=status.HTTP_202_ACCEPTED,
        summary="Kick off an NDJSON export of the trial's feed (Bulk Data shaped)",
        description="202 with `Content-Location`: the status URL. `_since` is a feed `seq`. "
        "The export holds the feed as written when it was kicked off; `partial`, `lag` and "
        "`as_of` say how current that was (also in the manifest and on each file).",
        responses={**problem_responses(422), **NOT_CURRENT},
    )
    def export(
        request: Request,
        response: Response,
        principal: DataManager,
        exports: ExportsDep,
        trial_id: Annotated[str, TRIAL_ID],
        since: Annotated[int, Query(alias="_since", ge=0, le=2**62)] = 0,
    ) -> dict[str, Any]:
        _serves(principal, trial_id)
        standing = _standing(request)
        job = exports.kick_off(trial_id, principal.sub, str(request.url), since, standing.body())
        response.headers["Content-Location"] = str(request.url_for("export_status", job_id=job.id))
        return {"job": job.id, **standing.body()}

    @router.get(
        "/exports/{job_id}",
        name="export_status",
        summary="An export's status: 202 while it runs, 200 with its output files",
        responses={202: {"description": "Still running (`X-Progress`, `Retry-After`)"}},
    )
    def export_status(
        request: Request,
        response: Response,
        principal: DataManager,
        exports: ExportsDep,
        job_id: Annotated[str, Path(max_length=32, pattern=r"^[0-9a-f]+$")],
    ) -> Any:
        job = exports.get(job_id, principal.sub)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no export {job_id}")
        if not job.done:
            response.status_code = status.HTTP_202_ACCEPTED
            response.headers["X-Progress"] = f"{job.written} of {job.upto} entries"
            response.headers["Retry-After"] = "1"
            return {"job": job.id, "progress": job.written, "of": job.upto}
        if job.error is not None:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, job.error)
        return exports.manifest(job, str(request.url_for("export_status", job_id=job.id)))

    @router.get(
        "/exports/{job_id}/{name}",
        summary="One output file of an export (NDJSON)",
        response_class=FileResponse,
    )
    def export_file(
        principal: DataManager,
        exports: ExportsDep,
        job_id: Annotated[str, Path(max_length=32, pattern=r"^[0-9a-f]+$")],
        name: Annotated[str, Path(max_length=40, pattern=r"^feed-[0-9]{4}\.ndjson$")],
    ) -> FileResponse:
        job = exports.get(job_id, principal.sub)
        found = exports.file(job, name) if job is not None and job.done else None
        if job is None or found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {name}")
        return FileResponse(found, media_type="application/fhir+ndjson",
                            headers=exports.headers(job))  # fmt: skip

    @router.get(
        "/trials/{trial_id}/safety-events",
        summary="The trial's safety events",
        description="`partial: true` when the follow-up consumer is behind (`lag`, `as_of`).",
        responses=NOT_CURRENT,
    )
    def safety_events(
        request: Request,
        principal: SafetyContact,
        service: Service,
        trial_id: Annotated[str, TRIAL_ID],
    ) -> dict[str, Any]:
        _serves(principal, trial_id)
        standing = _standing(request)
        return {"trial": trial_id, "events": service.safety_events(trial_id), **standing.body()}

    @router.get(
        "/trials/{trial_id}/endpoints",
        summary="Live counts of the trial's endpoint per arm (statistician)",
        description="Participants followed up per arm and those with the plan's endpoint among "
        "the resource versions the trial holds now; `drill=true` adds, per participant counted, "
        "the resource versions behind the count. `partial: true` when the follow-up consumer "
        "is behind (`lag`, `as_of`).",
        responses=NOT_CURRENT,
    )
    def endpoints(
        request: Request,
        principal: Statistician,
        service: Service,
        trial_id: Annotated[str, TRIAL_ID],
        drill: bool = False,
    ) -> dict[str, Any]:
        _serves(principal, trial_id)
        standing = _standing(request)
        try:
            counts = service.endpoint_counts(trial_id, drill)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        # the tables' own as_of replaces the time of the read: the count is as current as that
        return {**counts, **standing.body()}

    return router
