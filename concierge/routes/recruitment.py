"""The clinician API, under ``/v1/clinician`` (role ``clinician``).

* ``GET /v1/clinician/candidates`` and ``GET /v1/clinician/invitations``: the clinician's own
  patients (see :mod:`recruitment.access`), each with the patient's identity (name, NHS number,
  date of birth, phone) read from the identity vault for exactly those patients; the pseudonyms
  read go into the request's audit record. Pages are by key, not offset: each page's ``next``
  is an opaque cursor (the last row's sort key) that ``after`` takes for the page after it, so
  a deep page costs what the first does and rows arriving meanwhile neither repeat nor vanish.
  Reads are written with ``orjson`` straight from the rows (the response models stay the
  OpenAPI document's description of them; ``tests/contract`` holds the two together).
* ``GET /v1/clinician/invitations/{id}``: one invitation with its history.
* ``POST /v1/clinician/invitations/{id}/{action}`` for ``approve``, ``reject``, ``contacted``,
  ``interested``, ``declined``, ``no-response``, ``consented``, ``enrolled``, ``screen-failed``,
  ``withdraw``; body ``{"note": ..., "version": ...}`` (both optional; ``version`` makes the
  action conditional on the invitation not having changed). An illegal transition or a
  concurrent change answers 409 (problem+json, naming the state and the allowed next states).

Mount with ``app.include_router(build_router(service, identities))``; the app provides token
verification, problem details and the audit middleware (:mod:`core.http`).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from core.auth import CurrentPrincipal, Principal, require_role
from core.db import NO_NUL
from core.http import problem_responses
from recruitment.access import ClinicianScope
from recruitment.lifecycle import ACTIONS, IllegalTransition, InvitationState, allowed_next
from recruitment.models import Candidate, Invitation, InvitationEvent, Trial
from recruitment.service import CandidateStatus, ConcurrentChange, NotFound, RecruitmentService

MAX_PAGE = 500
#: deadlock_detected, serialization_failure: the transaction lost a race; the client may retry.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})


class IdentitySource(Protocol):
    """Where identities come from: the site's identity vault (``SqlVault.get_identity``)."""

    def get_identity(self, pseudonym: str) -> Mapping[str, Any] | None: ...


class VaultIdentities:
    """Thread-safe reads from an identity vault of its own (not the ingestor's).

    The vault holds one connection with an open transaction; after each read it is rolled back
    so the next read sees identities written since.
    """

    def __init__(self, vault: IdentitySource) -> None:
        self.vault = vault
        self._lock = threading.Lock()

    def get_identity(self, pseudonym: str) -> Mapping[str, Any] | None:
        return self.get_identities([pseudonym]).get(pseudonym)

    def get_identities(self, pseudonyms: Sequence[str]) -> dict[str, Mapping[str, Any]]:
        """Identities of several patients at once (absent ones are left out)."""
        with self._lock:
            try:
                many = getattr(self.vault, "get_identities", None)
                if callable(many):
                    found: dict[str, Mapping[str, Any]] = many(pseudonyms)
                    return found
                out: dict[str, Mapping[str, Any]] = {}
                for pseudonym in pseudonyms:
                    record = self.vault.get_identity(pseudonym)
                    if record is not None:
                        out[pseudonym] = record
                return out
            finally:
                rollback = getattr(self.vault, "rollback", None)
                if callable(rollback):
                    rollback()


# --------------------------------------------------------------------------- response shapes


class PatientIdentity(BaseModel):
    name: str | None = None
    nhs_number: str | None = None
    birth_date: str | None = None
    phone: str | None = None


class HoldPublic(BaseModel):
    rule: str
    reason: str
    until: str | None = None


class CandidatePublic(BaseModel):
    id: str
    trial: str
    trial_title: str | None
    site: str
    status: str
    routed_to: str | None
    routing_reason: str | None
    held_reasons: list[HoldPublic]
    invitation: str | None
    created_at: datetime
    updated_at: datetime
    patient: PatientIdentity | None


class EventPublic(BaseModel):
    at: datetime
    actor: str
    from_state: str | None
    to_state: str
    note: str | None


class InvitationPublic(BaseModel):
    id: str
    trial: str
    trial_title: str | None
    site: str
    state: str
    version: int
    practitioner: str
    allowed_actions: list[str]
    created_at: datetime
    state_changed_at: datetime
    patient: PatientIdentity | None = None
    history: list[EventPublic] | None = None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    #: Every row the filters match, on every page.
    count: int
    limit: int
    #: The cursor of the next page (pass it as ``after``); null on the last page.
    next: str | None = Field(
        default=None, description="Pass as `after` for the next page; null on the last page"
    )


#: An invitation id as it reaches the recruitment database (PostgreSQL keeps no U+0000).
InvitationId = Annotated[str, Path(pattern=NO_NUL)]


class ActionRequest(BaseModel):
    note: str | None = Field(default=None, max_length=2000, pattern=NO_NUL)
    #: Act only if the invitation is still at this version (optimistic concurrency).
    version: int | None = Field(default=None, ge=1)


#: A page cursor as the API hands it out: URL-safe base64 of a small JSON array.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,400}$"
Cursor = Annotated[
    str | None,
    Query(
        pattern=CURSOR_PATTERN,
        description="The `next` of the previous page: the page after it (keyset pagination)",
    ),
]


class JSONResponseFast(JSONResponse):
    """``orjson`` bodies, timestamps written with ``Z`` as pydantic writes them (FastAPI's own
    ``ORJSONResponse`` is deprecated in the release we pin, in favour of pydantic serialising a
    response model: that still builds a model per row, which is what these lists avoid)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_UTC_Z)


# --------------------------------------------------------------------------- helpers


def _encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


def _decode_cursor(cursor: str, kinds: tuple[type, ...]) -> list[Any]:
    """The sort key a cursor carries, checked against ``kinds``; a 422 naming ``after`` if it
    is not one this API handed out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = orjson.loads(raw)
        if not isinstance(key, list) or len(key) != len(kinds):
            raise ValueError("wrong shape")
        out: list[Any] = []
        for value, kind in zip(key, kinds, strict=True):
            if kind is datetime:
                parsed = datetime.fromisoformat(value)
                if parsed.tzinfo is None:
                    raise ValueError("naive time")
                out.append(parsed)
            elif kind is int:
                if type(value) is not int or not -(2**63) <= value < 2**63:
                    raise ValueError("not an integer")
                out.append(value)
            else:
                if not isinstance(value, str) or "\x00" in value:
                    raise ValueError("not a text")
                out.append(value)
        return out
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise RequestValidationError(
            [
                {
                    "type": "cursor",
                    "loc": ["query", "after"],
                    "msg": "not a cursor of this list: pass the `next` of a page as it was given",
                    "input": cursor,
                }
            ]
        ) from None


def _time(value: datetime) -> str:
    """A timestamp as pydantic writes it (``Z`` for UTC)."""
    return value.isoformat().replace("+00:00", "Z")


def _identity_dict(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    given, family = record.get("given"), record.get("family")
    name = " ".join(str(p) for p in (given, family) if p) or None
    birth = record.get("birth_date")
    if isinstance(birth, date):
        birth = birth.isoformat()
    return {
        "name": name,
        "nhs_number": record.get("nhs_number"),
        "birth_date": birth,
        "phone": record.get("phone"),
    }


def _actions(state: str) -> list[str]:
    nexts = set(allowed_next(InvitationState(state)))
    return [action for action, target in ACTIONS.items() if target in nexts]


def _invitation_public(
    invitation: Invitation,
    trial_title: str | None,
    identity: PatientIdentity | None = None,
    history: Sequence[InvitationEvent] | None = None,
) -> InvitationPublic:
    return InvitationPublic(
        id=invitation.id,
        trial=invitation.trial_id,
        trial_title=trial_title,
        site=invitation.site,
        state=invitation.state,
        version=invitation.version,
        practitioner=invitation.practitioner,
        allowed_actions=_actions(invitation.state),
        created_at=invitation.created_at,
        state_changed_at=invitation.state_changed_at,
        patient=identity,
        history=[
            EventPublic(
                at=e.at, actor=e.actor, from_state=e.from_state, to_state=e.to_state, note=e.note
            )
            for e in history
        ]
        if history is not None
        else None,
    )


def _invitation_dict(
    invitation: Invitation,
    trial_title: str | None,
    identity: dict[str, Any] | None = None,
    history: Sequence[InvitationEvent] | None = None,
) -> dict[str, Any]:
    """What :func:`_invitation_public` gives, as plain data for ``orjson`` (no model built)."""
    return {
        "id": invitation.id,
        "trial": invitation.trial_id,
        "trial_title": trial_title,
        "site": invitation.site,
        "state": invitation.state,
        "version": invitation.version,
        "practitioner": invitation.practitioner,
        "allowed_actions": _actions(invitation.state),
        "created_at": _time(invitation.created_at),
        "state_changed_at": _time(invitation.state_changed_at),
        "patient": identity,
        "history": [
            {
                "at": _time(e.at),
                "actor": e.actor,
                "from_state": e.from_state,
                "to_state": e.to_state,
                "note": e.note,
            }
            for e in history
        ]
        if history is not None
        else None,
    }


def _practitioner(principal: Principal) -> str:
    if not principal.practitioner:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "this token carries no practitioner reference"
        )
    return principal.practitioner


def _concurrent(invitation_id: str) -> str:
    return f"invitation {invitation_id} changed concurrently; reload it and try again"


def _audit(request: Request, **detail: Any) -> None:
    current = dict(getattr(request.state, "audit_detail", {}) or {})
    current.update(detail)
    request.state.audit_detail = current


ServiceProvider = Callable[[Request], RecruitmentService]
IdentityProvider = Callable[[Request], IdentitySource]


def build_router(
    service: RecruitmentService | ServiceProvider,
    identities: IdentitySource | IdentityProvider,
) -> APIRouter:
    """The clinician router; pass objects, or callables that take the request and return them."""

    def get_service(request: Request) -> RecruitmentService:
        return service if isinstance(service, RecruitmentService) else service(request)

    def get_identities(request: Request) -> IdentitySource:
        if hasattr(identities, "get_identity"):
            return identities
        return identities(request)

    router = APIRouter(
        prefix="/v1/clinician",
        tags=["clinician"],
        dependencies=[require_role("clinician")],
        responses=problem_responses(
            401,
            403,
            503,
            descriptions={
                403: "Not a clinician's token, or one that names no practitioner",
                503: "Recruitment is not running in this API, or the token cannot be checked "
                "now; `Retry-After` says when to ask again",
            },
        ),
    )

    def read_identities(request: Request, pseudonyms: Sequence[str]) -> dict[str, Any]:
        source = get_identities(request)
        wanted = list(dict.fromkeys(pseudonyms))
        _audit(request, pseudonyms_read=wanted, patients=len(wanted))
        many = getattr(source, "get_identities", None)
        if callable(many):  # one query for the page, not one per patient
            found = many(wanted)
            return {p: _identity_dict(found.get(p)) for p in wanted}
        return {p: _identity_dict(source.get_identity(p)) for p in wanted}

    def scope(session: Session, principal: Principal) -> ClinicianScope:
        return ClinicianScope.resolve(session, _practitioner(principal), principal.sites)

    @router.get(
        "/candidates",
        response_model=Page[CandidatePublic],
        response_class=JSONResponseFast,
        responses=problem_responses(422),
    )
    def list_candidates(
        request: Request,
        principal: CurrentPrincipal,
        trial: Annotated[str | None, Query(pattern=NO_NUL)] = None,
        status_: Annotated[str | None, Query(alias="status", pattern=NO_NUL)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        after: Cursor = None,
    ) -> Response:
        """Your patients who are candidates for a trial (opted-out patients never are), in
        order of arrival; `next` is the cursor of the page after this one."""
        svc = get_service(request)
        with svc.read_sessions() as session:
            visible = scope(session, principal).clause(
                Candidate.patient, Candidate.site, Candidate.trial_id
            )
            where = [visible, Candidate.status != CandidateStatus.EXCLUDED.value]
            if trial:
                where.append(Candidate.trial_id == trial)
            if status_:
                where.append(Candidate.status == status_)
            count = session.scalar(sa.select(sa.func.count()).select_from(Candidate).where(*where))
            if after is not None:
                arrival, last_id = _decode_cursor(after, (int, str))
                where.append(
                    sa.or_(
                        Candidate.arrival > arrival,
                        sa.and_(Candidate.arrival == arrival, Candidate.id > last_id),
                    )
                )
            rows = session.execute(
                sa.select(Candidate, Trial.title, Invitation.id)
                .join(Trial, Trial.id == Candidate.trial_id)
                .outerjoin(
                    Invitation,
                    sa.and_(Invitation.candidate_id == Candidate.id, Invitation.active.is_(True)),
                )
                .where(*where)
                .order_by(Candidate.arrival, Candidate.id)
                .limit(limit + 1)
            ).all()
        more = len(rows) > limit
        rows = rows[:limit]
        people = read_identities(request, [c.patient for c, _, _ in rows])
        items = [
            {
                "id": c.id,
                "trial": c.trial_id,
                "trial_title": title,
                "site": c.site,
                "status": c.status,
                "routed_to": c.routed_to,
                "routing_reason": c.routing_reason,
                "held_reasons": [
                    {"rule": h["rule"], "reason": h["reason"], "until": h.get("until")}
                    for h in c.held_reasons
                ],
                "invitation": invitation_id,
                "created_at": _time(c.created_at),
                "updated_at": _time(c.updated_at),
                "patient": people[c.patient],
            }
            for c, title, invitation_id in rows
        ]
        last = rows[-1][0] if rows else None
        cursor = _encode_cursor(last.arrival, last.id) if more and last is not None else None
        return JSONResponseFast(
            {"items": items, "count": int(count or 0), "limit": limit, "next": cursor}
        )

    @router.get(
        "/invitations",
        response_model=Page[InvitationPublic],
        response_class=JSONResponseFast,
        responses=problem_responses(422),
    )
    def list_invitations(
        request: Request,
        principal: CurrentPrincipal,
        trial: Annotated[str | None, Query(pattern=NO_NUL)] = None,
        state: InvitationState | None = None,
        active: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        after: Cursor = None,
    ) -> Response:
        """Your patients' invitations, newest first; `next` is the cursor of the page after
        this one."""
        svc = get_service(request)
        with svc.read_sessions() as session:
            where = [
                scope(session, principal).clause(
                    Invitation.patient, Invitation.site, Invitation.trial_id
                )
            ]
            if trial:
                where.append(Invitation.trial_id == trial)
            if state:
                where.append(Invitation.state == state.value)
            if active is not None:
                where.append(Invitation.active.is_(active))
            count = session.scalar(sa.select(sa.func.count()).select_from(Invitation).where(*where))
            if after is not None:
                created, last_id = _decode_cursor(after, (datetime, str))
                where.append(
                    sa.or_(
                        Invitation.created_at < created,
                        sa.and_(Invitation.created_at == created, Invitation.id > last_id),
                    )
                )
            rows = session.execute(
                sa.select(Invitation, Trial.title)
                .join(Trial, Trial.id == Invitation.trial_id)
                .where(*where)
                .order_by(Invitation.created_at.desc(), Invitation.id)
                .limit(limit + 1)
            ).all()
        more = len(rows) > limit
        rows = rows[:limit]
        people = read_identities(request, [i.patient for i, _ in rows])
        items = [_invitation_dict(i, title, people[i.patient]) for i, title in rows]
        last = rows[-1][0] if rows else None
        cursor = (
            _encode_cursor(last.created_at.isoformat(), last.id)
            if more and last is not None
            else None
        )
        return JSONResponseFast(
            {"items": items, "count": int(count or 0), "limit": limit, "next": cursor}
        )

    def visible_invitation(
        session: Session, principal: Principal, invitation_id: str, lock: bool = False
    ) -> Invitation:
        query = sa.select(Invitation).where(
            Invitation.id == invitation_id,
            scope(session, principal).clause(
                Invitation.patient, Invitation.site, Invitation.trial_id
            ),
        )
        if lock:
            query = query.with_for_update(of=Invitation)
        invitation = session.scalars(query.execution_options(populate_existing=True)).first()
        if invitation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no invitation {invitation_id} for you")
        return invitation

    @router.get(
        "/invitations/{invitation_id}",
        response_model=InvitationPublic,
        response_class=JSONResponseFast,
        responses=problem_responses(404),
    )
    def get_invitation(
        request: Request, principal: CurrentPrincipal, invitation_id: InvitationId
    ) -> Response:
        """One invitation, with the patient's identity and the invitation's history."""
        svc = get_service(request)
        with svc.read_sessions() as session:
            invitation = visible_invitation(session, principal, invitation_id)
            title = session.scalar(sa.select(Trial.title).where(Trial.id == invitation.trial_id))
            history = list(invitation.events)
        people = read_identities(request, [invitation.patient])
        return JSONResponseFast(
            _invitation_dict(invitation, title, people[invitation.patient], history)
        )

    def act(
        request: Request,
        principal: CurrentPrincipal,
        invitation_id: str,
        action: str,
        body: ActionRequest | None,
    ) -> InvitationPublic:
        svc = get_service(request)
        target = ACTIONS[action]
        body = body or ActionRequest()
        try:
            with svc.sessions.begin() as session:
                invitation = visible_invitation(session, principal, invitation_id, lock=True)
                before = invitation.state
                _audit(request, invitation=invitation.id, pseudonym=invitation.patient)
                svc.transition(
                    session,
                    invitation,
                    target,
                    actor=principal.sub,
                    note=body.note,
                    expected_version=body.version,
                )
                title = session.scalar(
                    sa.select(Trial.title).where(Trial.id == invitation.trial_id)
                )
                _audit(request, transition=f"{before}->{invitation.state}")
                result = _invitation_public(invitation, title)
        except IllegalTransition as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except ConcurrentChange as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except (StaleDataError, IntegrityError):
            raise HTTPException(status.HTTP_409_CONFLICT, _concurrent(invitation_id)) from None
        except DBAPIError as exc:
            # PostgreSQL gave up one of two transactions (deadlock, serialization failure).
            if getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
                raise HTTPException(status.HTTP_409_CONFLICT, _concurrent(invitation_id)) from None
            raise
        except NotFound:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"no invitation {invitation_id} for you"
            ) from None
        return result

    for action, target in ACTIONS.items():
        router.add_api_route(
            f"/invitations/{{invitation_id}}/{action}",
            _action_endpoint(act, action),
            methods=["POST"],
            response_model=InvitationPublic,
            name=f"invitation_{action.replace('-', '_')}",
            summary=f"Move an invitation to {target.value}",
            responses=problem_responses(
                404,
                409,
                422,
                descriptions={
                    409: "The invitation's state does not allow the action, or it changed "
                    "meanwhile (`version`): `detail` names its state and the next ones allowed"
                },
            ),
        )
    return router


ActFunction = Callable[[Request, Principal, str, str, "ActionRequest | None"], InvitationPublic]


def _action_endpoint(act: ActFunction, action: str) -> Callable[..., InvitationPublic]:
    def endpoint(
        request: Request,
        principal: CurrentPrincipal,
        invitation_id: InvitationId,
        body: Annotated[ActionRequest | None, Body()] = None,
    ) -> InvitationPublic:
        return act(request, principal, invitation_id, action, body)

    endpoint.__name__ = f"invitation_{action.replace('-', '_')}"
    return endpoint


__all__ = [
    "ActionRequest",
    "CandidatePublic",
    "IdentitySource",
    "InvitationPublic",
    "PatientIdentity",
    "VaultIdentities",
    "build_router",
]
