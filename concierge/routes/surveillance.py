"""Regulator API under ``/v1/surveillance``: device-safety signals, their statistics, drill-down
and lifecycle actions.

Every route needs a regulator token (``concierge token create --role regulator --org MHRA``);
``/status`` also admits site admins, who alone see its patient count exact. Every request is
audited by the API's middleware (provenance reads also record how many pseudonymised patients
they touched). Patient counts in breakdowns follow the sponsors'
small-number rules (:class:`feasibility.disclosure.policy.DisclosurePolicy`); the 2x2 cells of a
signal are shown as they are, since every statistic the regulator must be able to reproduce is a
function of them.
"""

# No ``from __future__ import annotations``: FastAPI resolves the dependency aliases at import.

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field

from core.auth import Principal, require_role
from core.http import problem_responses
from surveillance_stream.monitor import MonitorError, SignalMonitor, UnknownSignal
from surveillance_stream.signals import REGULATOR_ACTIONS, IllegalTransition

Regulator = Annotated[Principal, require_role("regulator")]
RegulatorOrAdmin = Annotated[Principal, require_role("regulator", "admin")]


def _monitor(request: Request) -> SignalMonitor:
    monitor: SignalMonitor | None = getattr(request.app.state, "surveillance", None)
    if monitor is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "device surveillance is not running in this API"
        )
    return monitor


Monitor = Annotated[SignalMonitor, Depends(_monitor)]


class Action(BaseModel):
    action: Literal["review", "confirm", "dismiss", "close", "reopen"] = Field(
        description="The lifecycle move: " + ", ".join(REGULATOR_ACTIONS)
    )
    reason: str = Field(default="", max_length=2000, description="Why (kept in the audit log).")


def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except UnknownSignal as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except IllegalTransition as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except MonitorError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "2"}
        ) from exc


def _protector() -> Any:
    from feasibility.disclosure.policy import DisclosurePolicy

    policy = DisclosurePolicy.from_env()

    def protect(n: int) -> int | str:
        return policy.small_display if policy.is_small(n) else policy.rounded(n)

    return protect


def build_router() -> APIRouter:
    # the role is checked first, before the monitor's availability: anonymous callers get 401
    # and other roles 403 whatever the monitor's state
    prefix, tag = "/v1/surveillance", "surveillance (regulators)"
    errors = problem_responses(
        401,
        403,
        503,
        descriptions={
            503: "Device surveillance is not running in this API, the monitor is behind or "
            "cannot read its topics, or the token cannot be checked now; `Retry-After` says "
            "when to ask again"
        },
    )
    router = APIRouter(
        prefix=prefix, tags=[tag], dependencies=[require_role("regulator")], responses=errors
    )
    protect = _protector()
    # the monitor's status is also the site operators': on a router of its own, since the
    # other routes admit regulators only
    operations = APIRouter(
        prefix=prefix,
        tags=[tag],
        dependencies=[require_role("regulator", "admin")],
        responses=errors,
    )

    @operations.get(
        "/status",
        summary="The monitor's state: patients counted, latest data day",
        description="`patients` (patients with a device contribution) is exact for site admins "
        "only; regulators get it under the small-number rule and rounding of sponsors' answers "
        "(no statistic needs it: the 2x2 tables of the signals carry their own counts).",
    )
    def status_(monitor: Monitor, principal: RegulatorOrAdmin) -> dict[str, Any]:
        found = monitor.status()
        if principal.role != "admin":
            found["patients"] = protect(int(found["patients"]))
        return found

    @router.get(
        "/signals",
        summary="Every live (device node, outcome), ranked by strength",
        description="Strength is the Poisson MaxSPRT log-likelihood ratio over its critical "
        "value (1 or more: at or over the signalling boundary); signalling rows come first.",
        responses=problem_responses(422),
    )
    def signals(
        monitor: Monitor,
        principal: Regulator,
        level: Annotated[Literal["class", "manufacturer", "model", "lot"] | None, Query()] = None,
        state: Annotated[
            Literal["none", "signalled", "under_review", "confirmed", "dismissed", "closed"] | None,
            Query(),
        ] = None,
    ) -> dict[str, Any]:
        rows = _call(monitor.rows, level, state)
        status_now = monitor.status()
        return {
            "at": status_now["latest_day"],
            "generated_at": status_now["updated_at"],
            "signals": rows,
        }

    @router.get(
        "/signals/{signal_id}",
        summary="A signal: statistics, lifecycle, reproduction",
        responses=problem_responses(404),
    )
    def signal(signal_id: str, monitor: Monitor, principal: Regulator) -> dict[str, Any]:
        found: dict[str, Any] = _call(monitor.detail, signal_id)
        return found

    @router.get(
        "/signals/{signal_id}/history",
        summary="Observed vs expected, cumulative by implant quarter, with the boundary",
        responses=problem_responses(404),
    )
    def history(signal_id: str, monitor: Monitor, principal: Regulator) -> dict[str, Any]:
        found: dict[str, Any] = _call(monitor.history, signal_id)
        return found

    @router.get(
        "/signals/{signal_id}/breakdown",
        summary="The signal's outcome by manufacturer, model, lot or site",
        responses=problem_responses(404, 422),
    )
    def breakdown(
        signal_id: str,
        monitor: Monitor,
        principal: Regulator,
        by: Annotated[Literal["manufacturer", "model", "lot", "site"], Query()] = "lot",
    ) -> dict[str, Any]:
        found: dict[str, Any] = _call(monitor.breakdown, signal_id, by, protect)
        return found

    @router.get(
        "/signals/{signal_id}/provenance",
        summary="The pseudonymised facts and source resource versions behind the outcome count",
        responses=problem_responses(404, 422),
    )
    def provenance(
        signal_id: str,
        request: Request,
        monitor: Monitor,
        principal: Regulator,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> dict[str, Any]:
        found: dict[str, Any] = _call(monitor.provenance, signal_id, limit)
        request.state.audit_detail = {
            "signal": signal_id,
            "patients": found["patients"],
            "sources_returned": len(found["sources"]),
        }
        return found

    @router.post(
        "/signals/{signal_id}/actions",
        summary="A lifecycle action: review, confirm, dismiss, close, reopen",
        responses=problem_responses(
            404, 409, 422, descriptions={409: "The signal's state does not allow the action"}
        ),
    )
    def action(
        signal_id: str,
        request: Request,
        monitor: Monitor,
        principal: Regulator,
        body: Annotated[Action, Body()],
    ) -> dict[str, Any]:
        new = _call(monitor.act, signal_id, body.action, actor=principal.sub, reason=body.reason)
        request.state.audit_detail = {
            "signal": signal_id,
            "action": body.action,
            "to": new.state.value,
            "version": new.version,
        }
        detail: dict[str, Any] = _call(monitor.detail, signal_id)
        return {"signal": detail["signal"]}

    _scan_and_report_routes(router)
    _subscription_routes(router)
    both = APIRouter()
    both.include_router(operations)
    both.include_router(router)
    return both


class ScanRequest(BaseModel):
    spend: bool = Field(
        default=False,
        description="Make this scan the plan's next look: it spends that look's alpha and its "
        "signals move the lifecycle. Without it the scan is exploratory: compared with the next "
        "look's alpha, it signals nothing and spends nothing.",
    )
    seed: int | None = Field(default=None, ge=0, description="Monte Carlo seed (reproducible).")


def _scan_and_report_routes(router: APIRouter) -> None:
    """The tree-based scan (its looks and an on-demand run) and a signal's filed report."""

    @router.get(
        "/scan",
        summary="The tree-based scan: the alpha-spending plan, its looks, the latest scan",
        description="One tree per (device class, outcome), conditional Poisson, Monte Carlo "
        "p-values; `latest.top` holds the highest cuts with observed, expected, LLR and p-value.",
    )
    def scan_view(monitor: Monitor, principal: Regulator) -> dict[str, Any]:
        found: dict[str, Any] = _call(monitor.scan_view)
        return found

    @router.post(
        "/scan",
        summary="Run the tree-based scan now (exploratory, or as the plan's next look)",
    )
    def scan_now(
        request: Request,
        monitor: Monitor,
        principal: Regulator,
        body: Annotated[ScanRequest, Body()] = ScanRequest(),
    ) -> dict[str, Any]:
        found: dict[str, Any] = _call(monitor.scan, spend=body.spend, seed=body.seed)
        request.state.audit_detail = {"spend": body.spend, "look": found.get("look")}
        return found

    @router.get(
        "/signals/{signal_id}/report",
        summary="A signal's report to file: statistics with their inputs, charts, adjustment, "
        "multiplicity, provenance summary, lifecycle and reproduce commands",
        response_class=Response,
        responses={
            200: {"content": {"text/html": {}, "application/pdf": {}}},
            **problem_responses(404),
        },
    )
    def report(
        signal_id: str,
        request: Request,
        monitor: Monitor,
        principal: Regulator,
        format: Annotated[Literal["html", "pdf"], Query()] = "html",
    ) -> Response:
        from surveillance_stream.report import render_html, render_pdf

        data = _call(monitor.report_data, signal_id, str(request.base_url).rstrip("/"))
        request.state.audit_detail = {
            "signal": signal_id,
            "format": format,
            "patients": data.provenance.get("patients", 0),
        }
        if format == "pdf":
            filename = f"{signal_id}.pdf"
            return Response(
                render_pdf(data),
                media_type="application/pdf",
                headers={"Content-Disposition": f'inline; filename="{filename}"'},
            )
        return Response(render_html(data), media_type="text/html; charset=utf-8")


class SubscriptionCreate(BaseModel):
    channel: Literal["email", "webhook"]
    address: str = Field(max_length=2000, description="An e-mail address or an https URL.")
    device_class: str | None = Field(default=None, max_length=200, description="Any if unset.")
    outcome: str | None = Field(default=None, max_length=500, description="Any if unset.")
    level: Literal["class", "manufacturer", "model", "lot"] | None = None
    actions: (
        list[Literal["detect", "lapse", "review", "confirm", "dismiss", "close", "reopen"]] | None
    ) = Field(default=None, description="The moves to be told of; every one if unset.")


def _notices(request: Request) -> Any:
    notices = getattr(request.app.state, "signal_notices", None)
    if notices is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "signal notifications need the signal monitor and the recruitment database (its "
            "outbox) in this API",
        )
    return notices


def _subscription_routes(router: APIRouter) -> None:
    """Regulators' subscriptions to signal notifications (e-mail or webhook, via the outbox)."""

    @router.post(
        "/subscriptions",
        summary="Subscribe to notifications of signal moves (detect, lapse, each action)",
        status_code=status.HTTP_201_CREATED,
        responses=problem_responses(
            422, descriptions={422: "An address, level or action that cannot be kept"}
        ),
    )
    def subscribe(
        request: Request, principal: Regulator, body: Annotated[SubscriptionCreate, Body()]
    ) -> dict[str, Any]:
        from recruitment.signal_notices import SubscriptionError

        try:
            found: dict[str, Any] = _notices(request).subscribe(
                principal.sub, principal.org or "", body.channel, body.address,
                device_class=body.device_class, outcome=body.outcome, level=body.level,
                actions=body.actions,
            )  # fmt: skip
        except SubscriptionError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        request.state.audit_detail = {"subscription": found["id"], "channel": body.channel}
        return found

    @router.get("/subscriptions", summary="Your subscriptions to signal notifications")
    def subscriptions(request: Request, principal: Regulator) -> dict[str, Any]:
        return {"subscriptions": _notices(request).subscriptions(principal.sub)}

    @router.delete(
        "/subscriptions/{subscription_id}",
        summary="End one of your subscriptions",
        status_code=status.HTTP_204_NO_CONTENT,
        responses=problem_responses(404),
    )
    def unsubscribe(subscription_id: str, request: Request, principal: Regulator) -> Response:
        if not _notices(request).unsubscribe(subscription_id, principal.sub):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no subscription {subscription_id}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)
