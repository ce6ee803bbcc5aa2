"""Sponsor API under ``/v1/feasibility``: ad hoc questions, saved questions, live answers.

Every route needs a sponsor token (``concierge token create --role sponsor --org NAME``) and
answers aggregates only, under disclosure control; errors are problem+json; the audit middleware
records each request with the question's fingerprint, the disclosure rules' bookkeeping and
whether it was charged. Every route that gives a sponsor something new (an ad hoc answer, a
saved question's registration or new version, a saved answer that changed) goes through one
query budget and its lockout (:meth:`feasibility.service.FeasibilityService.charged`).
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError

from core.auth import Principal, require_role
from core.db import NO_NUL
from core.http import problem_responses
from feasibility.criteria import CriteriaError, Question, json_pointer, json_schema
from feasibility.disclosure.budget import BudgetExceeded, LockedOut
from feasibility.expansion import ExpansionError, compile_question, report_of
from feasibility.fhir_group import GroupError, question_from_group
from feasibility.recruitment_funnel import protect_recruitment, unavailable
from feasibility.render import render
from feasibility.saved import NotYours, SavedQuestions, SavedTrial, TrialCreate, TrialPublic
from feasibility.service import FeasibilityService, NotCurrent
from recruitment.funnel import invited_by_state
from recruitment.service import RecruitmentService

if TYPE_CHECKING:
    from recruitment.runtime import Runtime

log = logging.getLogger(__name__)

Sponsor = Annotated[Principal, require_role("sponsor")]

#: Takes the request, returns the recruitment service (its ``sessions`` read the recruitment
#: store), or None when recruitment is not running.
RecruitmentProvider = Callable[[Request], RecruitmentService | None]

#: A request body FastAPI parses as JSON under either media type (it reads any ``+json``).
_ALSO_FHIR_JSON: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/fhir+json": {"schema": {"type": "object", "additionalProperties": True}}
        }
    }
}

EXAMPLE = {
    "schema": "concierge.criteria/1",
    "title": "Type 2 diabetes, HbA1c 58 or more, aged 18-80",
    "inclusion": [
        {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]},
        {"type": "age", "min": 18, "max": 80},
        {
            "type": "observation",
            "codes": [{"concept": "hba1c"}],
            "value": {"ge": 58, "unit": "mmol/mol"},
            "window": {"days_before": 365},
        },
    ],
    "exclusion": [
        {
            "type": "observation",
            "codes": [{"concept": "egfr"}],
            "value": {"lt": 30, "unit": "mL/min/{1.73_m2}"},
        }
    ],
}


class CriteriaRoute(APIRoute):
    """A route whose 422s point into the request body: each validation error gains
    ``pointer``, a JSON pointer into the body as sent (``/inclusion/2/value/unit``), where the
    model's ``loc`` names parts the body leaves out (a criterion's type, the step around a bare
    criterion); see :func:`feasibility.criteria.json_pointer`."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def pointing(request: Request) -> Response:
            try:
                response: Response = await handler(request)
            except RequestValidationError as exc:
                errors = [
                    {**e, "pointer": json_pointer(exc.body, list(e.get("loc", ()))[1:])}
                    if list(e.get("loc", ()))[:1] == ["body"]
                    else e
                    for e in exc.errors()
                ]
                raise RequestValidationError(errors, body=exc.body) from None
            except ExpansionError as exc:
                # ECL or ValueSet entries that could not be expanded: 422 pointing at each
                body = await request.json()
                raise RequestValidationError(
                    [
                        {
                            "type": "expansion",
                            "loc": ["body", *e["path"]],
                            "msg": e["msg"],
                            "input": None,
                            "pointer": json_pointer(body, e["path"]),
                        }
                        for e in exc.errors
                    ],
                    body=body,
                ) from None
            return response

        return pointing


#: A definitional Group (docs/examples/fhir/t2dm-group.json has a longer one).
GROUP_EXAMPLE = {
    "resourceType": "Group",
    "type": "person",
    "membership": "definitional",
    "characteristic": [
        {
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "439401001"}]},
            "valueCodeableConcept": {
                "coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]
            },
            "exclude": False,
        },
        {
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "397669002"}]},
            "valueRange": {
                "low": {"value": 18, "system": "http://unitsofmeasure.org", "code": "a"},
                "high": {"value": 80, "system": "http://unitsofmeasure.org", "code": "a"},
            },
            "exclude": False,
        },
    ],
}


def _service(request: Request) -> FeasibilityService:
    service: FeasibilityService | None = getattr(request.app.state, "feasibility", None)
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "feasibility is starting up")
    return service


Service = Annotated[FeasibilityService, Depends(_service)]


def not_current(request: Request, exc: NotCurrent) -> HTTPException:
    """503 with ``Retry-After``: a view the answer needs is behind or disconnected, and a count
    from it would look current while it is not."""
    request.state.audit_detail = {"not_current": exc.waiting_for}
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        {"message": "the data behind this answer is not current", "waiting_for": exc.waiting_for},
        headers={"Retry-After": str(exc.retry_after)},
    )


NOT_CURRENT = problem_responses(
    503,
    descriptions={
        503: "A view the answer needs is behind, disconnected or inconsistent; "
        "`detail.waiting_for` says which, `Retry-After` when to ask again (also while the "
        "service starts, or when the token cannot be checked)"
    },
)


def over_budget(request: Request, exc: BudgetExceeded) -> HTTPException:
    """429 with ``Retry-After``: the organisation's query budget is spent, or it is locked out
    until an administrator unlocks it. Nothing was read or recorded for the request."""
    request.state.audit_detail = {"budget": "locked" if isinstance(exc, LockedOut) else "exceeded"}
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        str(exc),
        headers={"Retry-After": str(int(exc.retry_after_seconds))},
    )


OVER_BUDGET = problem_responses(
    429,
    descriptions={
        429: "The organisation's query budget is spent, or it is locked out pending an "
        "administrator's review; `Retry-After` says when to ask again"
    },
)
#: Every sponsor and admin route: no or a bad token, another role, the token check or the
#: service not available yet.
AUTHENTICATED = problem_responses(401, 403, 503)


def _answer(
    request: Request, service: FeasibilityService, question: Question, org: str, kind: str
) -> dict[str, Any]:
    try:
        body, audit = service.answer(question, org, kind)
    except NotCurrent as exc:
        raise not_current(request, exc) from None
    except BudgetExceeded as exc:
        raise over_budget(request, exc) from None
    request.state.audit_detail = audit
    return body


def _recruitment_from_app(request: Request) -> RecruitmentService | None:
    runtime: Runtime | None = getattr(request.app.state, "recruitment", None)
    return runtime.service if runtime is not None else None


def _recruitment_block(
    request: Request,
    provider: RecruitmentProvider,
    service: FeasibilityService,
    trial_id: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The answer's ``recruitment`` block (disclosure-controlled counts per invitation state)
    and its audit bookkeeping; ``{"available": false}`` when recruitment is not running here."""
    recruitment = provider(request)
    if recruitment is None:
        return unavailable("recruitment is not running in this API"), {"available": False}
    try:
        with recruitment.sessions() as session:
            counts = invited_by_state(session, trial_id).by_state
    except SQLAlchemyError as exc:
        log.warning("recruitment counts unavailable: %s", type(exc).__name__)
        return unavailable("the recruitment store did not answer"), {"available": False}
    block, audit = protect_recruitment(counts, service.policy)
    return block, audit.to_dict()


def recruitment_block(
    request: Request, service: FeasibilityService, trial_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``recruitment`` block of this API's own recruitment service (the federation node's
    live answer carries its cells to the hub)."""
    return _recruitment_block(request, _recruitment_from_app, service, trial_id)


def build_router(recruitment: RecruitmentProvider | None = None) -> APIRouter:
    """The sponsor router. ``recruitment`` takes the request and returns the recruitment
    service or None (by default: ``request.app.state.recruitment``, as ``concierge.api``
    keeps it)."""
    router = APIRouter(
        prefix="/v1/feasibility",
        tags=["feasibility (sponsors)"],
        route_class=CriteriaRoute,
        responses=AUTHENTICATED,
    )
    recruitment_provider = recruitment or _recruitment_from_app

    @router.post(
        "/ask",
        summary="Ask an ad hoc feasibility question",
        description="Counts of eligible patients (total, per site and region) and the attrition "
        "funnel in criterion order, under disclosure control: a withheld count reads `withheld` "
        "whatever its size, and `notes` (per funnel row, `note`) says in words what cannot all "
        "be shown. Counts one question against the sponsor's query budget, unless the answer "
        "is exactly the organisation's last answer to the same question (a republication); "
        "429 once the budget is spent or the organisation is locked out. 503 while the "
        "snapshot is behind the facts topic.",
        responses={**problem_responses(422), **NOT_CURRENT, **OVER_BUDGET},
    )
    def ask(
        request: Request,
        principal: Sponsor,
        service: Service,
        question: Annotated[Question, Body(openapi_examples={"t2dm": {"value": EXAMPLE}})],
    ) -> dict[str, Any]:
        # ECL and ValueSet entries become explicit codes before any engine sees them
        compiled = compile_question(question, service.terminology)
        body = _answer(request, service, compiled.question, principal.org, "ad hoc")
        return {**body, "terminology": compiled.report} if compiled.report else body

    @router.post(
        "/ask-group",
        summary="Ask with a definitional FHIR R5 Group as the criteria",
        description="The Group's characteristics become funnel steps (see "
        "feasibility/fhir_group.py for the codes understood); answered and charged like "
        "/ask.",
        responses={**problem_responses(422), **NOT_CURRENT, **OVER_BUDGET},
        # FastAPI reads any JSON media type (a FHIR client sends application/fhir+json)
        openapi_extra=_ALSO_FHIR_JSON,
    )
    def ask_group(
        request: Request,
        principal: Sponsor,
        service: Service,
        group: Annotated[
            dict[str, Any],
            Body(
                description="A FHIR R5 Group resource",
                openapi_examples={"t2dm": {"value": GROUP_EXAMPLE}},
            ),
        ],
    ) -> dict[str, Any]:
        try:
            question = question_from_group(group)
        except (GroupError, CriteriaError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        return _answer(request, service, question, principal.org, "ad hoc (FHIR Group)")

    @router.post(
        "/check",
        summary="Validate criteria and render them readably (no data read)",
        responses=problem_responses(422),
    )
    def check(principal: Sponsor, question: Question) -> dict[str, Any]:
        return {"valid": True, "text": render(question), "steps": len(question.steps)}

    @router.get("/criteria-schema", summary="The JSON schema of criteria (concierge.criteria/1)")
    def schema(principal: Sponsor) -> dict[str, Any]:
        return json_schema()

    @router.get("/budget", summary="Your organisation's query budget")
    def budget(principal: Sponsor, service: Service) -> dict[str, Any]:
        result: dict[str, Any] = service.budget.status(principal.org).to_dict()
        return result

    @router.get("/status", summary="How current the data behind answers is")
    def feed_status(principal: Sponsor, service: Service) -> dict[str, Any]:
        return {**service.as_of(), "views": service.readiness()}

    # ------------------------------------------------------------------ saved questions

    def saved(service: FeasibilityService) -> SavedQuestions:
        if service.saved is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "saved questions unavailable")
        return service.saved

    @router.post(
        "/saved-questions",
        status_code=status.HTTP_201_CREATED,
        summary="Register a trial (a saved question), or change one you registered",
        description="Each registration (a new saved question or a new version of one) counts "
        "one question against the sponsor's query budget: the stream evaluates it and it "
        "recruits at its sites. 429 once the budget is spent or the organisation is locked "
        "out; 503 while the registry of saved questions is behind.",
        responses={
            **problem_responses(
                409,
                422,
                descriptions={409: "The saved question's id is another organisation's"},
            ),
            **NOT_CURRENT,
            **OVER_BUDGET,
        },
    )
    def register(
        request: Request,
        principal: Sponsor,
        service: Service,
        trial: TrialCreate,
        response: Response,
    ) -> TrialPublic:
        saved(service)
        # the record keeps the expansions, so the stream evaluates what was compiled here
        compiled = compile_question(trial.criteria, service.terminology, prefix=("criteria",))
        trial = trial.model_copy(update={"criteria": compiled.question})
        try:
            record, audit = service.register(trial, principal.org)
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        except BudgetExceeded as exc:
            raise over_budget(request, exc) from None
        except NotYours as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        request.state.audit_detail = audit
        response.headers["Location"] = f"/v1/feasibility/saved-questions/{record.id}"
        return TrialPublic.of(record)

    @router.get("/saved-questions", summary="Your saved questions")
    def list_saved(principal: Sponsor, service: Service) -> list[TrialPublic]:
        return [TrialPublic.of(r) for r in saved(service).of_sponsor(principal.org)]

    def _get(service: FeasibilityService, trial_id: str, org: str) -> SavedTrial:
        try:
            return saved(service).get(trial_id, org)
        except (KeyError, NotYours):
            # another sponsor's trial is indistinguishable from a missing one
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"no saved question {trial_id}"
            ) from None

    @router.get(
        "/saved-questions/{trial_id}",
        summary="One of your saved questions",
        responses=problem_responses(404),
    )
    def get_saved(trial_id: str, principal: Sponsor, service: Service) -> TrialPublic:
        return TrialPublic.of(_get(service, trial_id, principal.org))

    @router.delete(
        "/saved-questions/{trial_id}",
        summary="Retire a saved question",
        description="Free, and allowed to a locked-out organisation: it stops the question's "
        "evaluation and recruitment and answers no count.",
        responses=problem_responses(404),
    )
    def retire(trial_id: str, principal: Sponsor, service: Service) -> TrialPublic:
        _get(service, trial_id, principal.org)
        return TrialPublic.of(saved(service).retire(trial_id, principal.org))

    @router.get(
        "/saved-questions/{trial_id}/answer",
        summary="The current answer to a saved question",
        description="Counts under the same disclosure control as ad hoc questions, and charged "
        "to the same query budget: each answer that differs from the last one this "
        "organisation got for the question counts one question; reading it again unchanged "
        "(a republication) is free. 429 once the budget is spent or the organisation is "
        "locked out, changed or not. The `recruitment` block gives invited patients per "
        "invitation state, under the same disclosure control (`available: false` when "
        "recruitment is not running). 503 while the cohort view or the snapshot is behind, "
        "or the snapshot has not reached the stream's position.",
        responses={
            **problem_responses(
                404, 409, descriptions={409: "The saved question is retired: no answer"}
            ),
            **NOT_CURRENT,
            **OVER_BUDGET,
        },
    )
    def live_answer(
        trial_id: str, request: Request, principal: Sponsor, service: Service
    ) -> dict[str, Any]:
        record = _get(service, trial_id, principal.org)
        if record.status != "active":
            raise HTTPException(status.HTTP_409_CONFLICT, f"saved question {trial_id} is retired")
        try:
            if service.cohorts is None:
                body, audit = service.answer(record.criteria, principal.org, "saved")
            else:
                body, audit = service.answer_live(record, principal.org)
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        except BudgetExceeded as exc:
            raise over_budget(request, exc) from None
        block, block_audit = _recruitment_block(request, recruitment_provider, service, trial_id)
        request.state.audit_detail = {
            **audit,
            "trial": trial_id,
            "version": record.version,
            "recruitment": block_audit,
        }
        terminology = report_of(record.criteria)
        if terminology:
            body["terminology"] = terminology
        return {"trial": trial_id, "version": record.version, **body, "recruitment": block}

    return router


Admin = Annotated[Principal, require_role("admin")]


def build_admin_router() -> APIRouter:
    """Site operations (role admin): exact, unprotected numbers for the people who run the
    service, never for sponsors; every request is audited like any other."""
    router = APIRouter(
        prefix="/v1/admin", tags=["operations (site admins)"], responses=AUTHENTICATED
    )

    @router.get("/saved-questions/{trial_id}/live", summary="Exact live cohort size")
    def live_size(trial_id: str, principal: Admin, service: Service) -> dict[str, Any]:
        if service.cohorts is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no live cohort view")
        return {
            "trial": trial_id,
            "members": len(service.cohorts.members(trial_id)),
            **service.cohorts.status(),
        }

    @router.post("/budgets/{org}/unlock", summary="Lift a sponsor's query lockout")
    def unlock(
        org: Annotated[str, Path(pattern=NO_NUL)], principal: Admin, service: Service
    ) -> dict[str, Any]:
        service.budget.unlock(org)
        status_: dict[str, Any] = service.budget.status(org).to_dict()
        return status_

    return router


__all__ = ["build_admin_router", "build_router", "recruitment_block"]
