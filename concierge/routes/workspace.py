"""The sponsor workspace under ``/v1/feasibility``: site selection, the accrual forecast,
criterion impact, the cohort profile, each organisation's past answers and their exports.

Every route needs a sponsor token; every output is a disclosure-controlled answer charged to the
organisation's query budget like the plain answer (re-reading an unchanged one is free); 503
with ``Retry-After`` while a view it needs is behind, 429 once the budget is spent. See
``docs/explanation/sponsor-workspace.md``.
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, status
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from concierge.routes.feasibility import (
    EXAMPLE,
    NOT_CURRENT,
    OVER_BUDGET,
    CriteriaRoute,
    RecruitmentProvider,
    Service,
    Sponsor,
    not_current,
    over_budget,
)
from core.contracts.invitations import RecruitmentBySite
from core.http import problem_responses
from feasibility.criteria import Question
from feasibility.disclosure.budget import BudgetExceeded
from feasibility.expansion import compile_question
from feasibility.saved import NotYours, SavedTrial
from feasibility.service import FeasibilityService, NotCurrent
from feasibility.workspace.export import report_html, report_pdf, to_csv
from feasibility.workspace.history import AnswerHistory
from feasibility.workspace.service import Workspace
from recruitment.funnel import recruitment_by_site

log = logging.getLogger(__name__)

HISTORY_UNAVAILABLE = "this API keeps no history of answers"

#: The statuses every workspace route may answer besides 200, as problem+json (the router adds
#: 503: a view behind, or the token check unavailable).
DOCUMENTED: dict[int | str, dict[str, Any]] = problem_responses(
    401, 403, descriptions={403: "The token's role is not `sponsor`"}
)
TRIAL_ROUTE: dict[int | str, dict[str, Any]] = {
    **DOCUMENTED,
    **problem_responses(
        404,
        409,
        descriptions={
            404: "No saved question with this id for your organisation",
            409: "The saved question is retired",
        },
    ),
}
ASKED: dict[int | str, dict[str, Any]] = {
    **DOCUMENTED,
    **problem_responses(
        422,
        descriptions={
            422: "The criteria are not valid, or an ECL/ValueSet entry does not expand; "
            "each error has `pointer`, a JSON pointer into the body as sent"
        },
    ),
}
PAST: dict[int | str, dict[str, Any]] = {
    **DOCUMENTED,
    **problem_responses(
        404,
        503,
        descriptions={
            404: "No such answer of your organisation",
            503: "This API keeps no history of answers, or the token check is unavailable",
        },
    ),
}
#: An answer's id as the history store keeps it (an SQL integer): a larger one is none.
AnswerId = Annotated[int, Path(ge=1, le=2**31 - 1)]


class CsvResponse(PlainTextResponse):
    """CSV text, so the document says ``text/csv`` as the answer does."""

    media_type = "text/csv"


class PdfResponse(Response):
    """A PDF document, so the document says ``application/pdf`` as the answer does."""

    media_type = "application/pdf"


#: The PDF report's 200 as the OpenAPI document gives it: bytes, not JSON.
PDF_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The report as a one-page PDF (A4)",
        "content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _workspace(service: FeasibilityService) -> Workspace:
    return Workspace(service, service.cohort_history)


def _trial(service: FeasibilityService, trial_id: str, org: str) -> SavedTrial:
    if service.saved is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "saved questions unavailable")
    try:
        record = service.saved.get(trial_id, org)
    except (KeyError, NotYours):
        # another sponsor's trial is indistinguishable from a missing one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no saved question {trial_id}") from None
    if record.status != "active":
        raise HTTPException(status.HTTP_409_CONFLICT, f"saved question {trial_id} is retired")
    return record


def _answers(service: FeasibilityService) -> AnswerHistory:
    if service.answers is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, HISTORY_UNAVAILABLE)
    return service.answers


def _answered(request: Request, call: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> Any:
    try:
        body, audit = call()
    except NotCurrent as exc:
        raise not_current(request, exc) from None
    except BudgetExceeded as exc:
        raise over_budget(request, exc) from None
    request.state.audit_detail = audit
    return body


def recruitment_sets_of(
    request: Request, provider: RecruitmentProvider, trial_id: str
) -> RecruitmentBySite | None:
    """The trial's patients per recruitment state and site, from the recruitment service
    ``provider`` gives (None: recruitment is not running in this API); 503 with
    ``Retry-After`` when its store does not answer."""
    found = provider(request)
    if found is None:
        return None
    try:
        with found.sessions() as session:
            return recruitment_by_site(session, trial_id)
    except SQLAlchemyError as exc:
        log.warning("recruitment by site unavailable: %s", type(exc).__name__)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            {"message": "the recruitment store did not answer", "waiting_for": ["recruitment"]},
            headers={"Retry-After": "2"},
        ) from None


def build_router(recruitment: RecruitmentProvider | None = None) -> APIRouter:
    """The workspace router; ``recruitment`` as for :func:`concierge.routes.feasibility.
    build_router` (by default the app's recruitment runtime)."""
    from concierge.routes.feasibility import _recruitment_from_app

    provider = recruitment or _recruitment_from_app
    router = APIRouter(
        prefix="/v1/feasibility",
        tags=["sponsor workspace"],
        route_class=CriteriaRoute,
        responses=problem_responses(401, 403, 503),
    )

    def recruitment_sets(request: Request, trial_id: str) -> RecruitmentBySite | None:
        return recruitment_sets_of(request, provider, trial_id)

    answered = {**NOT_CURRENT, **OVER_BUDGET}
    asked = {**ASKED, **answered}
    on_trial = {**TRIAL_ROUTE, **answered}
    question_body = Body(openapi_examples={"t2dm": {"value": EXAMPLE}})

    @router.post(
        "/profile",
        summary="The eligible cohort's profile: age bands by sex, and region",
        description="Charged like an ad hoc answer; every cell under the same disclosure "
        "control as the funnel, in one plan with it.",
        responses=asked,
    )
    def profile(
        request: Request,
        principal: Sponsor,
        service: Service,
        question: Annotated[Question, question_body],
    ) -> dict[str, Any]:
        compiled = compile_question(question, service.terminology)
        return _answered(
            request, lambda: _workspace(service).profile(principal.org, compiled.question)
        )

    @router.post(
        "/impact",
        summary="Criterion impact: the cohort with each step removed and the others kept",
        description="Independent of the steps' order; each cohort is a published set under "
        "disclosure control and overlap control, so a step that removes only a few patients "
        "shows withheld.",
        responses=asked,
    )
    def impact(
        request: Request,
        principal: Sponsor,
        service: Service,
        question: Annotated[Question, question_body],
    ) -> dict[str, Any]:
        compiled = compile_question(question, service.terminology)
        return _answered(
            request, lambda: _workspace(service).impact(principal.org, compiled.question)
        )

    @router.get(
        "/saved-questions/{trial_id}/profile",
        summary="A saved question's cohort profile (the live cohort)",
        responses=on_trial,
    )
    def saved_profile(
        trial_id: str, request: Request, principal: Sponsor, service: Service
    ) -> dict[str, Any]:
        record = _trial(service, trial_id, principal.org)
        return _answered(request, lambda: _workspace(service).profile(principal.org, trial=record))

    @router.get(
        "/saved-questions/{trial_id}/impact",
        summary="A saved question's criterion impact (the live cohort)",
        responses=on_trial,
    )
    def saved_impact(
        trial_id: str, request: Request, principal: Sponsor, service: Service
    ) -> dict[str, Any]:
        record = _trial(service, trial_id, principal.org)
        return _answered(request, lambda: _workspace(service).impact(principal.org, trial=record))

    @router.get(
        "/saved-questions/{trial_id}/sites",
        summary="Site selection: candidate sites ranked by projected time to the target",
        description="Per site of the population: eligible now, new eligible patients per 30 "
        "days (from the cohort's history since the question's baseline), and at recruiting "
        "sites the shares lost to opt-outs and invitation limits and the conversion from "
        "invitation to consent and enrolment; each site's projected days to reach the trial's "
        "target on its own, with a 90% interval. Counts under disclosure control together "
        "(complementary suppression across sites, rounding, overlap control); rates from "
        "shown counts only, withheld when a count is.",
        responses=on_trial,
    )
    def sites(
        trial_id: str, request: Request, principal: Sponsor, service: Service
    ) -> dict[str, Any]:
        record = _trial(service, trial_id, principal.org)
        found = recruitment_sets(request, trial_id)
        return _answered(request, lambda: _workspace(service).sites(principal.org, record, found))

    @router.get(
        "/saved-questions/{trial_id}/forecast",
        summary="Accrual forecast: when the target is reached, for the trial and each site",
        description="The projected date with a 90% interval (Poisson arrivals times observed "
        "conversion, see `model`), recomputed from the stream at every request, and the live "
        "count's history as daily points, protected like every other count.",
        responses=on_trial,
    )
    def forecast(
        trial_id: str, request: Request, principal: Sponsor, service: Service
    ) -> dict[str, Any]:
        record = _trial(service, trial_id, principal.org)
        found = recruitment_sets(request, trial_id)
        return _answered(
            request, lambda: _workspace(service).forecast(principal.org, record, found)
        )

    # ------------------------------------------------------------------ history, export

    @router.get(
        "/history",
        summary="Your organisation's past answers, newest first",
        description="Every answer this organisation got (ad hoc, saved, and each workspace "
        "output), as it was sent; free (nothing new is told).",
        responses={**DOCUMENTED, 503: PAST[503]},
    )
    def history(
        principal: Sponsor, service: Service, limit: Annotated[int, Query(ge=1, le=500)] = 100
    ) -> dict[str, Any]:
        answers = _answers(service)
        return {"answers": [a.summary() for a in answers.list(principal.org, limit)]}

    def _past(service: FeasibilityService, org: str, answer_id: int) -> Any:
        found = _answers(service).get(org, answer_id)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no answer {answer_id}")
        return found

    @router.get("/history/{answer_id}", summary="One past answer, as it was sent", responses=PAST)
    def past_answer(answer_id: AnswerId, principal: Sponsor, service: Service) -> dict[str, Any]:
        past = _past(service, principal.org, answer_id)
        return {**past.summary(), "criteria": past.question, "answer": past.body}

    @router.get(
        "/history/{answer_id}/export.csv",
        summary="A past answer as CSV (one row per published cell)",
        response_class=CsvResponse,
        responses=PAST,
    )
    def export_csv(answer_id: AnswerId, principal: Sponsor, service: Service) -> CsvResponse:
        past = _past(service, principal.org, answer_id)
        return CsvResponse(
            to_csv(past),
            headers={"Content-Disposition": f'attachment; filename="answer-{answer_id}.csv"'},
        )

    @router.get(
        "/history/{answer_id}/report.html",
        summary="A past answer as a one-page report (criteria in words, funnel, sites, rules)",
        response_class=HTMLResponse,
        responses=PAST,
    )
    def export_report(answer_id: AnswerId, principal: Sponsor, service: Service) -> HTMLResponse:
        past = _past(service, principal.org, answer_id)
        return HTMLResponse(
            report_html(past),
            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
        )

    @router.get(
        "/history/{answer_id}/report.pdf",
        summary="A past answer as a one-page PDF report (criteria in words, funnel, sites, rules)",
        description="The HTML report laid out on one A4 page by WeasyPrint, offline (the "
        "report fetches nothing); withheld cells read `withheld`, as on the page.",
        response_class=PdfResponse,
        responses={**PAST, **PDF_CONTENT},
    )
    def export_pdf(answer_id: AnswerId, principal: Sponsor, service: Service) -> PdfResponse:
        past = _past(service, principal.org, answer_id)
        return PdfResponse(
            report_pdf(past),
            headers={"Content-Disposition": f'attachment; filename="answer-{answer_id}.pdf"'},
        )

    return router


__all__ = ["build_router"]
