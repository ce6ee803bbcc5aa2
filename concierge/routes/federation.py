"""Federation over HTTP: the node's routes (``/v1/federation``, questions signed by the hub)
and the hub's (``/v1/hub``, sponsors' and administrators' tokens of the hub's own site).

A node answers only questions signed by its hub for it (``federation.tokens``), through the same
service, disclosure control, registry and budget as its own sponsors' questions, charged to the
sponsor under the hub's name; each question is audited in the node's own trail (the audit
middleware, with the hub, the organisation and the mode). See ``docs/explanation/federation.md``.
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, ValidationError

from concierge.routes.feasibility import (
    EXAMPLE,
    _recruitment_from_app,
    not_current,
    over_budget,
    recruitment_block,
)
from concierge.routes.workspace import recruitment_sets_of
from core.auth import Principal, require_role
from core.auth import _bearer as bearer  # the same scheme in the OpenAPI document
from core.contracts.trials import TRIAL_ID_PATTERN
from core.http import problem_responses
from feasibility.criteria import CriteriaError, Question, parse_question
from feasibility.disclosure.budget import BudgetExceeded
from feasibility.expansion import ExpansionError, compile_question
from feasibility.saved import NotYours, SavedQuestions, SavedTrial, SiteCode, TrialCreate
from feasibility.service import FeasibilityService, NotCurrent, answer_sets
from feasibility.workspace.service import Workspace
from federation.hub import Hub, NodeRecord, RetiredQuestion, UnknownNodes
from federation.node import Node, exact_reply, live_reply, protected_reply, sites_reply
from federation.saved import NotTheirs
from federation.settings import NAME_PATTERN
from federation.tokens import REPLY_HEADER, HubQuestion, SignatureError, sign_reply


def _site_caller(request: Request, token: str) -> bool:
    """Whether ``token`` is one of this site's own tokens; if so the audit names its holder
    (who is then refused: these routes take only the hub's signed questions)."""
    try:
        request.state.principal = request.app.state.token_verifier.verify(token)
    except Exception:  # any refusal: it is not a site token either, the caller stays unnamed
        return False
    return True


def _node(request: Request, token: str) -> Node:
    node: Node | None = getattr(request.app.state, "federation_node", None)
    if node is None:
        _site_caller(request, token)
        raise HTTPException(status.HTTP_404_NOT_FOUND, "this API is not a federation node")
    return node


def _service(request: Request) -> FeasibilityService:
    service: FeasibilityService | None = getattr(request.app.state, "feasibility", None)
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "feasibility is starting up")
    return service


def _token(request: Request) -> str:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a hub's signed question is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return header.removeprefix("Bearer ")


async def _hub_question(request: Request, node: Node, token: str) -> tuple[HubQuestion, bytes]:
    body = await request.body()
    try:
        asked = node.verify(token, body)
    except SignatureError as exc:
        request.state.audit_detail = {"federation": {"refused": "signature"}}
        if _site_caller(request, token):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, "this route takes only the hub's signed questions"
            ) from None
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            str(exc),
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    # the audit record names the hub, the sponsor it asks for and the question's token id
    request.state.principal = Principal(
        sub=f"hub:{asked.hub}",
        role=asked.role,
        org=node.org_of(asked),
        exp=asked.exp,
        jti=asked.jti,
    )
    return asked, body


def _question(body: bytes, service: FeasibilityService) -> Question:
    try:
        question = parse_question(body)
        return compile_question(question, service.terminology).question
    except CriteriaError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except ExpansionError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, [e["msg"] for e in exc.errors]
        ) from None


def _signed(node: Node, asked: HubQuestion, reply: dict[str, Any]) -> Response:
    content = json.dumps(reply, sort_keys=True).encode()
    signature = sign_reply(node.key, node.id, asked.hub, content, asked.jti)
    return Response(content, media_type="application/json", headers={REPLY_HEADER: signature})


REFUSALS = problem_responses(
    400,
    401,
    403,
    404,
    422,
    429,
    503,
    descriptions={
        401: "The question is not signed by this node's hub for this node",
        403: "The node's policy refuses the question (exact counts not allowed)",
        404: "This API is not a federation node",
    },
)


def build_node_router() -> APIRouter:
    """The node's routes: answered only to the hub, under this node's disclosure control."""
    # the bearer scheme documents the Authorization header; the hub's token is checked by
    # _hub_question (an EdDSA JWT of the hub, not one of this site's tokens)
    router = APIRouter(
        prefix="/v1/federation",
        tags=["federation (node)"],
        dependencies=[Depends(bearer)],
    )

    @router.post(
        "/ask",
        summary="The hub's question: this node's protected answer",
        description="Criteria JSON as `/v1/feasibility/ask` takes it, signed by the hub "
        "(Authorization: Bearer, an EdDSA JWT for this node with the body's SHA-256). The "
        "answer is this node's own protected cells only, signed by the node "
        f"(`{REPLY_HEADER}`); charged to the sponsor under the hub's name.",
        responses=REFUSALS,
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": {"type": "object"}}},
                "required": True,
            }
        },
    )
    async def ask(request: Request) -> Response:
        token = _token(request)
        node = _node(request, token)
        asked, body = await _hub_question(request, node, token)
        service = _service(request)
        if asked.role != "sponsor":
            raise HTTPException(status.HTTP_403_FORBIDDEN, "a sponsor's question only")
        question = _question(body, service)
        org = node.org_of(asked)
        try:
            answer, audit = await run_in_threadpool(service.answer, question, org, "federated")
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        except BudgetExceeded as exc:
            raise over_budget(request, exc) from None
        request.state.audit_detail = {
            **audit,
            "federation": {"hub": asked.hub, "mode": "protected"},
        }
        return _signed(node, asked, protected_reply(node.id, answer))

    @router.post(
        "/exact",
        summary="The hub administrators' question: exact counts, where this node allows them",
        description="Only for a question the hub signed with the role admin, and only when "
        "this node sets CONCIERGE_NODE_ALLOW_EXACT; never charged, always audited.",
        responses=REFUSALS,
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": {"type": "object"}}},
                "required": True,
            }
        },
    )
    async def exact(request: Request) -> Response:
        token = _token(request)
        node = _node(request, token)
        asked, body = await _hub_question(request, node, token)
        if asked.role != "admin" or not node.allow_exact:
            request.state.audit_detail = {"federation": {"hub": asked.hub, "refused": "exact"}}
            raise HTTPException(status.HTTP_403_FORBIDDEN, "exact counts are not allowed here")
        service = _service(request)
        question = _question(body, service)

        def evaluate() -> dict[str, Any]:
            service.require("facts", "sites")
            at = service.clock()
            sets = answer_sets(question, service.evaluate(question, at), service.sites)
            return exact_reply(node.id, sets, at.isoformat())

        try:
            reply = await run_in_threadpool(evaluate)
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        request.state.audit_detail = {"federation": {"hub": asked.hub, "mode": "exact"}}
        return _signed(node, asked, reply)

    # ------------------------------------------------------- saved questions, live at this node

    async def sponsor_question(request: Request) -> tuple[Node, HubQuestion, bytes]:
        token = _token(request)
        node = _node(request, token)
        asked, body = await _hub_question(request, node, token)
        if asked.role != "sponsor":
            raise HTTPException(status.HTTP_403_FORBIDDEN, "a sponsor's question only")
        return node, asked, body

    def registry(service: FeasibilityService) -> SavedQuestions:
        if service.saved is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "saved questions unavailable")
        return service.saved

    def own(service: FeasibilityService, trial_id: str, org: str, body: bytes) -> SavedTrial:
        try:
            named = json.loads(body).get("trial")
        except (ValueError, AttributeError):
            named = None
        if named != trial_id:  # the path is not signed, the body is: they must agree
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "the signed body names another question"
            )
        try:
            return registry(service).get(trial_id, org)
        except (KeyError, NotYours):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"no saved question {trial_id}"
            ) from None

    def active(service: FeasibilityService, trial_id: str, org: str, body: bytes) -> SavedTrial:
        """:func:`own`, and 409 if it is retired."""
        record = own(service, trial_id, org, body)
        if record.status != "active":
            raise HTTPException(status.HTTP_409_CONFLICT, f"saved question {trial_id} is retired")
        return record

    saved_body = {
        "requestBody": {
            "content": {"application/json": {"schema": {"type": "object"}}},
            "required": True,
        }
    }

    @router.post(
        "/saved-questions",
        summary="The hub's saved question: registered here, kept live by this node's stream",
        description="A saved question as `/v1/feasibility/saved-questions` takes it (id, "
        "title, criteria), signed by the hub; registered for the sponsor under the hub's name "
        "and charged to it. The reply (signed) is the version registered.",
        responses={**REFUSALS, **problem_responses(409)},
        openapi_extra=saved_body,
    )
    async def register_saved(request: Request) -> Response:
        node, asked, body = await sponsor_question(request)
        service = _service(request)
        registry(service)
        try:
            trial = TrialCreate.model_validate_json(body)
            compiled = compile_question(trial.criteria, service.terminology, prefix=("criteria",))
        except ValidationError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()],
            ) from None
        except ExpansionError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, [e["msg"] for e in exc.errors]
            ) from None
        trial = trial.model_copy(update={"criteria": compiled.question})
        org = node.org_of(asked)
        try:
            record, audit = await run_in_threadpool(service.register, trial, org)
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        except BudgetExceeded as exc:
            raise over_budget(request, exc) from None
        except NotYours as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        request.state.audit_detail = {**audit, "federation": {"hub": asked.hub, "mode": "saved"}}
        reply = {"node": node.id, "trial": record.id, "version": record.version}
        return _signed(node, asked, {**reply, "status": record.status})

    @router.post(
        "/saved-questions/{trial_id}/answer",
        summary="The hub's saved question: this node's protected live answer",
        description='Signed body `{"trial": trial_id}`. The cohort as this node\'s stream '
        "keeps it, under this node's disclosure control and budget (as "
        "`/v1/feasibility/saved-questions/{id}/answer`); 503 with `Retry-After` while this "
        "node's views are behind.",
        responses={**REFUSALS, **problem_responses(409)},
        openapi_extra=saved_body,
    )
    async def saved_answer(trial_id: str, request: Request) -> Response:
        node, asked, body = await sponsor_question(request)
        service = _service(request)
        org = node.org_of(asked)
        record = active(service, trial_id, org, body)
        try:
            if service.cohorts is None:
                answer, audit = await run_in_threadpool(
                    service.answer, record.criteria, org, "saved"
                )
            else:
                answer, audit = await run_in_threadpool(service.answer_live, record, org)
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        except BudgetExceeded as exc:
            raise over_budget(request, exc) from None
        # invited patients per invitation state at this node, under its disclosure control
        block, block_audit = await run_in_threadpool(recruitment_block, request, service, trial_id)
        request.state.audit_detail = {
            **audit,
            "trial": trial_id,
            "version": record.version,
            "recruitment": block_audit,
            "federation": {"hub": asked.hub, "mode": "live"},
        }
        return _signed(node, asked, live_reply(node.id, trial_id, record.version, answer, block))

    @router.post(
        "/saved-questions/{trial_id}/sites",
        summary="The hub's saved question: this node's protected site selection",
        description='Signed body `{"trial": trial_id}`. Per site of this node\'s population, '
        "the published counts of patients eligible now, of new eligible patients over the "
        "cohort history's window and, at recruiting sites, of each recruitment state; the "
        "trial's totals, the window and the rounding, under this node's disclosure control and "
        "budget (as `/v1/feasibility/saved-questions/{id}/sites`). Candidates never leave the "
        "node; the hub ranks and forecasts across nodes from these cells.",
        responses={**REFUSALS, **problem_responses(409)},
        openapi_extra=saved_body,
    )
    async def saved_sites(trial_id: str, request: Request) -> Response:
        node, asked, body = await sponsor_question(request)
        service = _service(request)
        org = node.org_of(asked)
        record = active(service, trial_id, org, body)
        found = await run_in_threadpool(
            recruitment_sets_of, request, _recruitment_from_app, trial_id
        )
        workspace = Workspace(service, service.cohort_history)
        try:
            answer, audit = await run_in_threadpool(workspace.sites, org, record, found)
        except NotCurrent as exc:
            raise not_current(request, exc) from None
        except BudgetExceeded as exc:
            raise over_budget(request, exc) from None
        request.state.audit_detail = {
            **audit,
            "trial": trial_id,
            "version": record.version,
            "federation": {"hub": asked.hub, "mode": "sites"},
        }
        return _signed(node, asked, sites_reply(node.id, trial_id, record.version, answer))

    @router.post(
        "/saved-questions/{trial_id}/retire",
        summary="The hub's saved question retired here",
        description='Signed body `{"trial": trial_id}`; free.',
        responses=REFUSALS,
        openapi_extra=saved_body,
    )
    async def retire_saved(trial_id: str, request: Request) -> Response:
        node, asked, body = await sponsor_question(request)
        service = _service(request)
        org = node.org_of(asked)
        own(service, trial_id, org, body)
        record = await run_in_threadpool(registry(service).retire, trial_id, org)
        request.state.audit_detail = {"trial": trial_id, "federation": {"hub": asked.hub}}
        reply = {"node": node.id, "trial": record.id, "version": record.version}
        return _signed(node, asked, {**reply, "status": record.status})

    return router


# ----------------------------------------------------------------------------------- the hub

Sponsor = Annotated[Principal, require_role("sponsor")]
Admin = Annotated[Principal, require_role("admin")]


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


class FederatedQuestion(BaseModel):
    """A sponsor's question to the hub: criteria, and optionally which nodes to ask."""

    criteria: dict[str, Any] = Field(examples=[EXAMPLE])
    #: None: every registered node.
    nodes: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = None


class HubSavedCreate(BaseModel):
    """A sponsor's saved question at the hub: as a node takes it, and optionally which nodes.
    Recruiting sites are each node's own business (recruitment stays at the node)."""

    id: str = Field(pattern=TRIAL_ID_PATTERN)
    title: str = Field(min_length=1, max_length=300)
    criteria: dict[str, Any] = Field(examples=[EXAMPLE])
    #: None: every registered node.
    nodes: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = None
    target: int | None = Field(
        default=None, ge=1, description="Enrolments wanted across nodes (for the forecast)"
    )
    recruiting_sites: dict[Annotated[str, Field(pattern=NAME_PATTERN)], list[SiteCode]] = Field(
        default_factory=dict,
        description="Per node, its sites that recruit (ODS codes); each node is sent its own",
    )


class NodeRegistration(BaseModel):
    id: Annotated[str, Field(pattern=NAME_PATTERN)]
    url: str
    public_key: str
    controller: str = ""


def build_hub_router() -> APIRouter:
    """The hub's routes: no patient data behind them, only the nodes' protected answers."""
    router = APIRouter(prefix="/v1/hub", tags=["federation (hub)"])

    def checked(criteria: dict[str, Any]) -> dict[str, Any]:
        try:
            parse_question(criteria)  # refused here rather than by every node
        except CriteriaError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        return criteria

    @router.post(
        "/ask",
        summary="Ask every node (or those named): the combined protected answer",
        description="Each node answers under its own disclosure control; combined counts are "
        "sums of the nodes' shown counts, withheld when any part is. Nodes that did not "
        "answer by the deadline, refused or failed are in `nodes_missing` and the answer is "
        "`partial`.",
        responses=problem_responses(401, 403, 422),
    )
    async def ask(
        request: Request, principal: Sponsor, question: Annotated[FederatedQuestion, Body()]
    ) -> dict[str, Any]:
        hub = _hub(request)
        try:
            answer = await hub.ask(checked(question.criteria), principal.org, question.nodes)
        except UnknownNodes as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        request.state.audit_detail = {
            "nodes_answered": answer["nodes_answered"],
            "nodes_missing": [m["node"] for m in answer["nodes_missing"]],
        }
        return answer

    @router.post(
        "/exact",
        summary="Exact counts from the nodes that allow them (hub administrators only)",
        responses=problem_responses(401, 403, 422),
    )
    async def exact(
        request: Request, principal: Admin, question: Annotated[FederatedQuestion, Body()]
    ) -> dict[str, Any]:
        hub = _hub(request)
        try:
            return await hub.ask_exact(checked(question.criteria), principal.sub, question.nodes)
        except UnknownNodes as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None

    @router.post(
        "/saved-questions",
        status_code=status.HTTP_201_CREATED,
        summary="Register a saved question at every node (or those named): live at each",
        description="Each node registers it in its own registry, charged to the sponsor under "
        "the hub's name, and keeps its cohort live on its own stream. Nodes that did not take "
        "it are in `not_registered` and are tried again at the next answer. 409 if the id is "
        "another organisation's at the hub.",
        responses=problem_responses(401, 403, 409, 422),
    )
    async def register_saved(
        request: Request, principal: Sponsor, saved: Annotated[HubSavedCreate, Body()]
    ) -> dict[str, Any]:
        hub = _hub(request)
        try:
            for sites in [[], *saved.recruiting_sites.values()]:  # as each node will take it
                TrialCreate.model_validate(
                    {
                        "id": saved.id,
                        "title": saved.title,
                        "criteria": saved.criteria,
                        "target": saved.target,
                        "recruiting_sites": sites,
                    }
                )
        except ValidationError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()],
            ) from None
        try:
            record = await hub.register_saved(
                saved.id,
                saved.title,
                saved.criteria,
                principal.org,
                saved.nodes,
                target=saved.target,
                recruiting_sites=saved.recruiting_sites,
            )
        except UnknownNodes as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        except NotTheirs as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        request.state.audit_detail = {
            "trial": saved.id,
            "registered": sorted(record["registered"]),
            "not_registered": [m["node"] for m in record["not_registered"]],
        }
        return record

    @router.get("/saved-questions", summary="Your saved questions at the hub")
    def list_saved(request: Request, principal: Sponsor) -> list[dict[str, Any]]:
        return [r.public() for r in _hub(request).saved_questions.of(principal.org)]

    @router.get(
        "/saved-questions/{trial_id}/answer",
        summary="The live answer: the combination of each node's protected live answer",
        description="Each node answers from its own stream under its own disclosure control "
        "and budget; combined cells as for `/v1/hub/ask`; each node's `as_of` (its stream "
        "time) is shown. A node behind, down, refusing or where the question is not "
        "registered is named in `nodes_missing` and the answer is `partial`.",
        responses=problem_responses(401, 403, 404, 409),
    )
    async def saved_answer(trial_id: str, request: Request, principal: Sponsor) -> dict[str, Any]:
        try:
            answer = await _hub(request).answer_saved(trial_id, principal.org)
        except NotTheirs as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except RetiredQuestion as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        request.state.audit_detail = {
            "trial": trial_id,
            "nodes_answered": answer["nodes_answered"],
            "nodes_missing": [m["node"] for m in answer["nodes_missing"]],
        }
        return answer

    async def sites_of(trial_id: str, request: Request, principal: Principal) -> dict[str, Any]:
        try:
            answer = await _hub(request).sites(trial_id, principal.org)
        except NotTheirs as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except RetiredQuestion as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        request.state.audit_detail = {
            "trial": trial_id,
            "nodes_answered": answer["nodes_answered"],
            "nodes_missing": [m["node"] for m in answer["nodes_missing"]],
        }
        return answer

    @router.get(
        "/saved-questions/{trial_id}/sites",
        summary="Site selection across nodes: every node's sites ranked by projected days",
        description="Each node sends its protected site selection (charged to the sponsor "
        "there; candidates never leave it). A site's counts are the sums over the nodes that "
        "name it, withheld when any part is; each site's projected days to the trial's target "
        "on its own, with enrolments at every node counted; the trial's forecast with arrivals "
        "from every node (`forecast`). Nodes behind, down or refusing are in `nodes_missing` "
        "and the answer is `partial`.",
        responses=problem_responses(401, 403, 404, 409),
    )
    async def saved_sites(trial_id: str, request: Request, principal: Sponsor) -> dict[str, Any]:
        return await sites_of(trial_id, request, principal)

    @router.get(
        "/saved-questions/{trial_id}/forecast",
        summary="Accrual forecast across nodes: when the target is reached",
        description="Patients arrive at every node at once: the rates add (each node's "
        "posterior from its own arrivals and window) and the conversion is pooled over every "
        "node's recruiting sites; a node whose arrivals are withheld or whose history is too "
        "short is left out and named (`left_out`), and the date is then later than with it. "
        "With each site's projection (see `model`). The same node questions as `sites`.",
        responses=problem_responses(401, 403, 404, 409),
    )
    async def saved_forecast(trial_id: str, request: Request, principal: Sponsor) -> dict[str, Any]:
        answer = await sites_of(trial_id, request, principal)
        keep = ("hub", "trial", "title", "partial", "nodes_asked", "nodes_answered")
        return {
            **{k: answer[k] for k in keep},
            "nodes_missing": answer["nodes_missing"],
            "target": answer["target"],
            "forecast": answer["forecast"],
            "sites": [
                {k: s[k] for k in ("site", "nodes", "recruiting", "projection", "rank")}
                for s in answer["sites"]
            ],
            "model": answer["model"],
            "rules": answer["rules"],
            "notes": answer["notes"],
            "elapsed_ms": answer["elapsed_ms"],
        }

    @router.delete(
        "/saved-questions/{trial_id}",
        summary="Retire a saved question at the hub and at every node",
        responses=problem_responses(401, 403, 404),
    )
    async def retire_saved(trial_id: str, request: Request, principal: Sponsor) -> dict[str, Any]:
        try:
            return await _hub(request).retire_saved(trial_id, principal.org)
        except NotTheirs as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None

    @router.get("/nodes", summary="The registered nodes")
    def nodes(request: Request, principal: Admin) -> list[dict[str, str]]:
        return [
            {"id": r.id, "url": r.url, "controller": r.controller}
            for r in _hub(request).directory.all().values()
        ]

    @router.put(
        "/nodes/{node_id}",
        summary="Register a node (or change its URL or key)",
        responses=problem_responses(422),
    )
    def register(
        node_id: str, request: Request, principal: Admin, node: NodeRegistration
    ) -> dict[str, str]:
        if node.id != node_id:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "the id differs from the path"
            )
        try:
            record = _hub(request).directory.register(
                NodeRecord(node.id, node.url, node.public_key, node.controller)
            )
        except (ValueError, SignatureError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
        return {"id": record.id, "url": record.url, "controller": record.controller}

    return router


__all__ = ["build_hub_router", "build_node_router"]
