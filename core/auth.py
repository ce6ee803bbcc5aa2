"""OAuth2 bearer tokens with roles, issued locally (``concierge token create``).

Tokens are JWTs signed with HS256 by the site's key (``CONCIERGE_TOKEN_KEY``), carrying the role,
the organisation and, for clinicians, the practitioner reference and site. In production an
external authorisation server can issue the same claims; the API only verifies them.

Roles: ``sponsor`` (aggregate feasibility only), ``clinician`` (their own patients), ``regulator``
(device-safety signals), ``source`` (pushes FHIR), ``admin``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

Role = Literal["sponsor", "clinician", "regulator", "source", "admin"]
ROLES: tuple[str, ...] = ("sponsor", "clinician", "regulator", "source", "admin")


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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(
    key: bytes,
    role: Role,
    org: str,
    subject: str | None = None,
    practitioner: str | None = None,
    sites: tuple[str, ...] = (),
    ttl_seconds: int = 30 * 24 * 3600,
) -> str:
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    claims = Principal(
        sub=subject or f"{role}:{org}",
        role=role,
        org=org,
        practitioner=practitioner,
        sites=sites,
        exp=int(time.time()) + ttl_seconds,
        jti=str(uuid.uuid4()),
    )
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(claims.model_dump_json().encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def verify(key: bytes, token: str, now: float | None = None) -> Principal:
    try:
        header, payload, signature = token.split(".")
    except ValueError:
        raise TokenError("malformed token") from None
    expected = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    try:
        given = _unb64(signature)
    except ValueError:
        raise TokenError("malformed token signature") from None
    if not hmac.compare_digest(expected, given):
        raise TokenError("bad token signature")
    try:
        if json.loads(_unb64(header)).get("alg") != "HS256":
            raise TokenError("unsupported token algorithm")
        principal = Principal.model_validate_json(_unb64(payload))
    except (ValueError, ValidationError):
        raise TokenError("malformed token claims") from None
    if principal.exp < (now or time.time()):
        raise TokenError("token expired")
    return principal


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
    key: bytes = request.app.state.token_key
    try:
        principal = verify(key, credentials.credentials)
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
