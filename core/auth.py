"""OAuth2 bearer tokens with roles, issued locally (``concierge token create``).

Tokens are JWTs (RFC 7519) signed with HS256 by the site's key (``CONCIERGE_TOKEN_KEY``) through
PyJWT, carrying the role, the organisation and, for clinicians, the practitioner reference and
site, for one audience (``CONCIERGE_TOKEN_AUDIENCE``) from one issuer
(``CONCIERGE_TOKEN_ISSUER``). Verification accepts only HS256, checks the signature, ``aud``,
``iss`` and ``exp`` (with ``CONCIERGE_TOKEN_LEEWAY_SECONDS`` for clock skew), and requires every
claim the API relies on. In production an external authorisation server can issue the same
claims; the API only verifies them.

Roles: ``sponsor`` (aggregate feasibility only), ``clinician`` (their own patients), ``regulator``
(device-safety signals), ``source`` (pushes FHIR), ``admin``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

Role = Literal["sponsor", "clinician", "regulator", "source", "admin"]
ROLES: tuple[str, ...] = ("sponsor", "clinician", "regulator", "source", "admin")
ALGORITHM = "HS256"
#: Claims a token must carry; one without any of them is refused.
REQUIRED_CLAIMS = ("sub", "role", "org", "exp", "iat", "jti", "aud", "iss")


class Principal(BaseModel):
    """Who is calling: the verified claims of a token."""

    sub: str
    role: Role
    org: str
    #: Clinicians: their Practitioner reference key and the sites they work at.
    practitioner: str | None = None
    sites: tuple[str, ...] = ()
    exp: int
    jti: str


class TokenError(ValueError):
    pass


def _configured(audience: str | None, issuer: str | None) -> tuple[str, str]:
    """The given audience and issuer, or this site's (``CONCIERGE_TOKEN_AUDIENCE``/``_ISSUER``)."""
    if audience is None or issuer is None:
        from core.settings import get_settings

        settings = get_settings()
        audience = settings.token_audience if audience is None else audience
        issuer = settings.token_issuer if issuer is None else issuer
    return audience, issuer


def issue(
    key: bytes,
    role: Role,
    org: str,
    subject: str | None = None,
    practitioner: str | None = None,
    sites: tuple[str, ...] = (),
    ttl_seconds: int = 30 * 24 * 3600,
    *,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A signed token for ``role`` at ``org``, valid for ``ttl_seconds``, for this site's
    audience from this site's issuer unless others are given."""
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    audience, issuer = _configured(audience, issuer)
    now = int(time.time())
    claims = Principal(
        sub=subject or f"{role}:{org}",
        role=role,
        org=org,
        practitioner=practitioner,
        sites=sites,
        exp=now + ttl_seconds,
        jti=str(uuid.uuid4()),
    ).model_dump(mode="json")
    claims |= {"iat": now, "aud": audience, "iss": issuer}
    return jwt.encode(claims, key, algorithm=ALGORITHM)


_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.InvalidAudienceError, "token not meant for this API (audience)"),
    (jwt.InvalidIssuerError, "token from an issuer this API does not trust"),
    (jwt.InvalidAlgorithmError, "unsupported token algorithm"),
)


def verify(
    key: bytes,
    token: str,
    *,
    audience: str | None = None,
    issuer: str | None = None,
    leeway_seconds: float | None = None,
) -> Principal:
    """The principal of a token this site signed for its audience; :class:`TokenError` (with a
    short reason, safe to show the caller) otherwise."""
    audience, issuer = _configured(audience, issuer)
    if leeway_seconds is None:
        from core.settings import get_settings

        leeway_seconds = get_settings().token_leeway_seconds
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            leeway=leeway_seconds,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"token lacks the {exc.claim!r} claim") from None
    except jwt.PyJWTError as exc:
        for kind, reason in _REFUSALS:
            if isinstance(exc, kind):
                raise TokenError(reason) from None
        raise TokenError("malformed token") from None
    try:
        return Principal.model_validate(claims)
    except ValidationError:
        raise TokenError("malformed token claims") from None


_bearer = HTTPBearer(auto_error=False, description="A token from `concierge token create`.")


def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    state = request.app.state
    try:
        principal = verify(
            state.token_key,
            credentials.credentials,
            audience=getattr(state, "token_audience", None),
            issuer=getattr(state, "token_issuer", None),
            leeway_seconds=getattr(state, "token_leeway_seconds", None),
        )
    except TokenError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_role(*roles: Role):  # type: ignore[no-untyped-def]
    """A dependency that admits only the given roles (admin is not implied)."""

    def check(principal: CurrentPrincipal) -> Principal:
        if principal.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the role {' or '.join(roles)}; you are {principal.role}",
            )
        return principal

    return Depends(check)
