"""OAuth2 bearer tokens with roles: issued locally (``concierge token create``) or by an external
OpenID Connect provider, and refused from the next request on once revoked.

Tokens are JWTs (RFC 7519), checked by PyJWT. A token names what it may touch: its role, its
organisation, for clinicians their practitioner reference and sites, and for ``source`` tokens
the source system whose resources it may write and retract (``source_system``; a source's
resource keys are ``source_system|Type|id``, so a token for one source system never reaches
another's resources). Every token is for one audience (``CONCIERGE_TOKEN_AUDIENCE``) and says
its issuer, which decides how it is verified:

* **this site's tokens** (``iss`` = ``CONCIERGE_TOKEN_ISSUER``) are HS256-signed by one of the
  site's keys, named by the ``kid`` header (:class:`SigningKeys`: ``CONCIERGE_TOKEN_KEYS``, or
  ``CONCIERGE_TOKEN_KEY`` as the one key ``default``). Several keys are active at once so keys
  rotate without a flag day: new tokens are signed with the current one
  (``CONCIERGE_TOKEN_KEY_ID``), tokens of a key still listed keep working, and a key taken out of
  the list takes every token it signed with it. They must carry ``kid``, ``aud``, ``iss``,
  ``exp``, ``nbf``, ``iat`` and ``jti``;
* **an external provider's tokens** (``iss`` = ``CONCIERGE_OIDC_ISSUER``) are verified with the
  provider's published keys (:class:`OidcProvider`, its JWKS at ``CONCIERGE_OIDC_JWKS_URL``),
  asymmetric algorithms only (``CONCIERGE_OIDC_ALGORITHMS``), and must carry the same claims the
  API relies on (``nbf`` is checked when present);
* anything else is refused. The algorithm lists of the two never overlap, so a token cannot be
  verified with the wrong kind of key (no HS256 "signed" with a public key, no ``alg: none``).

Expiry and ``nbf`` allow ``CONCIERGE_TOKEN_LEEWAY_SECONDS`` of clock skew. A verified token whose
``jti`` is on the revocation list (:mod:`core.revocation`) is refused; a list that cannot be read
answers 503, never "not revoked". :class:`TokenVerifier` is the whole check; the API keeps one in
``app.state.token_verifier``.

Roles: ``sponsor`` (aggregate feasibility only), ``clinician`` (their own patients), ``regulator``
(device-safety signals), ``source`` (pushes FHIR), ``admin``; the trial team, each for the
trials its token names: ``trial_data_manager`` (a trial's follow-up plan, feed and export),
``statistician`` (endpoint counts per arm), ``safety_contact`` (safety events).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import unquote, urlparse

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError, model_validator

from core.roles import ROLES, TRIAL_ROLES, Role
from core.settings import DEFAULT_KEY_ID, KEY_ID_RE

if TYPE_CHECKING:
    from core.revocation import RevocationList
    from core.settings import Settings

ALGORITHM = "HS256"
#: Claims every token must carry; one without any of them is refused.
REQUIRED_CLAIMS = ("sub", "role", "org", "exp", "iat", "jti", "aud", "iss")
#: ... and, on this site's own tokens, a not-before time too.
LOCAL_REQUIRED_CLAIMS = (*REQUIRED_CLAIMS, "nbf")
#: How long a refusal because a part is down asks the caller to wait.
RETRY_AFTER_SECONDS = 5


class Principal(BaseModel):
    """Who is calling: the verified claims of a token."""

    sub: str
    role: Role
    org: str
    #: Clinicians: their Practitioner reference key and the sites they work at.
    practitioner: str | None = None
    sites: tuple[str, ...] = ()
    #: Sources: the source system whose resources the holder writes and retracts (the first
    #: part of every resource key it reaches).
    source_system: str | None = None
    #: The trial team (data manager, statistician, safety contact): the trials they serve.
    trials: tuple[str, ...] = ()
    exp: int
    jti: str

    @model_validator(mode="after")
    def _source_names_its_system(self) -> Principal:
        if self.role == "source" and not self.source_system:
            raise ValueError("a source token names its source system (source_system)")
        if self.role != "source" and self.source_system is not None:
            raise ValueError("only a source token names a source system")
        if self.role in TRIAL_ROLES and not self.trials:
            raise ValueError(f"a {self.role} token names the trials it serves (trials)")
        if self.role not in TRIAL_ROLES and self.trials:
            raise ValueError("only a trial team token names trials")
        if self.source_system is not None and "|" in self.source_system:
            raise ValueError("a source system may not contain '|' (it is part of resource keys)")
        return self


class TokenError(ValueError):
    """A token is refused (401); ``str()`` is a short reason, safe to show the caller."""


class TokenCheckUnavailable(RuntimeError):
    """Whether a token is good cannot be told now (the revocation list or the provider's keys
    cannot be read): 503 with Retry-After, never a guess."""


@dataclass(frozen=True)
class SigningKeys:
    """This site's token keys by key id; ``current`` signs new tokens, all of them verify."""

    keys: Mapping[str, bytes]
    current: str = DEFAULT_KEY_ID

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("no signing key")
        if self.current not in self.keys:
            raise ValueError(f"the current key id {self.current!r} is not among the keys")
        for kid, key in self.keys.items():
            if not KEY_ID_RE.match(kid):
                raise ValueError(f"bad key id {kid!r}")
            if len(key) < 32:
                raise ValueError(f"key {kid!r} is shorter than 32 bytes (RFC 7518 3.2)")

    @classmethod
    def of(cls, key: bytes | SigningKeys) -> SigningKeys:
        """``key`` itself, or one raw key as the key ``default`` (``CONCIERGE_TOKEN_KEY``)."""
        return key if isinstance(key, SigningKeys) else cls({DEFAULT_KEY_ID: key})

    @classmethod
    def from_settings(cls, settings: Settings) -> SigningKeys:
        return cls(settings.signing_keys(), settings.signing_key_id())


def _configured(audience: str | None, issuer: str | None) -> tuple[str, str]:
    """The given audience and issuer, or this site's (``CONCIERGE_TOKEN_AUDIENCE``/``_ISSUER``)."""
    if audience is None or issuer is None:
        from core.settings import get_settings

        settings = get_settings()
        audience = settings.token_audience if audience is None else audience
        issuer = settings.token_issuer if issuer is None else issuer
    return audience, issuer


def _leeway(leeway_seconds: float | None) -> float:
    if leeway_seconds is not None:
        return leeway_seconds
    from core.settings import get_settings

    return get_settings().token_leeway_seconds


def issue(
    key: bytes | SigningKeys,
    role: Role,
    org: str,
    subject: str | None = None,
    practitioner: str | None = None,
    sites: tuple[str, ...] = (),
    ttl_seconds: int = 30 * 24 * 3600,
    *,
    source_system: str | None = None,
    trials: tuple[str, ...] = (),
    audience: str | None = None,
    issuer: str | None = None,
    not_before: int | None = None,
    kid: str | None = None,
) -> str:
    """A signed token for ``role`` at ``org``, valid from ``not_before`` (default: now) for
    ``ttl_seconds``, for this site's audience from this site's issuer unless others are given.
    ``key``: this site's keys (signed with the current one, or ``kid``), or one raw key (its key
    id ``default``). A ``source`` token must name its ``source_system``."""
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    keys = SigningKeys.of(key)
    kid = keys.current if kid is None else kid
    if kid not in keys.keys:
        raise TokenError(f"no signing key with id {kid!r}")
    audience, issuer = _configured(audience, issuer)
    now = int(time.time())
    try:
        principal = Principal(
            sub=subject or f"{role}:{org}",
            role=role,
            org=org,
            practitioner=practitioner,
            sites=sites,
            source_system=source_system,
            trials=trials,
            exp=now + ttl_seconds,
            jti=str(uuid.uuid4()),
        )
    except ValidationError as exc:
        raise TokenError(_first_error(exc)) from None
    claims = principal.model_dump(mode="json", exclude_none=True)
    claims |= {
        "iat": now,
        "nbf": now if not_before is None else not_before,
        "aud": audience,
        "iss": issuer,
    }
    return jwt.encode(claims, keys.keys[kid], algorithm=ALGORITHM, headers={"kid": kid})


def _first_error(exc: ValidationError) -> str:
    return str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")


_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.InvalidAudienceError, "token not meant for this API (audience)"),
    (jwt.InvalidIssuerError, "token from an issuer this API does not trust"),
    (jwt.InvalidAlgorithmError, "unsupported token algorithm"),
)


def _decode(
    token: str,
    key: Any,
    algorithms: list[str],
    audience: str,
    issuer: str,
    leeway_seconds: float,
    required: tuple[str, ...],
) -> Principal:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=audience,
            issuer=issuer,
            leeway=leeway_seconds,
            options={"require": list(required)},
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
    except ValidationError as exc:
        raise TokenError(f"malformed token claims: {_first_error(exc)}") from None


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed token") from None
    if header.get("alg") in (None, "", "none"):
        raise TokenError("unsupported token algorithm")
    return header


def verify(
    key: bytes | SigningKeys,
    token: str,
    *,
    audience: str | None = None,
    issuer: str | None = None,
    leeway_seconds: float | None = None,
) -> Principal:
    """The principal of a token this site signed (with one of ``key``, by its ``kid``) for its
    audience; :class:`TokenError` (with a short reason, safe to show the caller) otherwise.
    Revocation is :class:`TokenVerifier`'s."""
    keys = SigningKeys.of(key)
    audience, issuer = _configured(audience, issuer)
    header = _header(token)
    if header.get("alg") != ALGORITHM:
        raise TokenError("unsupported token algorithm")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenError("token lacks a key id (kid)")
    secret = keys.keys.get(kid)
    if secret is None:
        # a key taken out of the list, or never one of ours
        raise TokenError("token signed with a key this API does not hold (kid)")
    return _decode(
        token, secret, [ALGORITHM], audience, issuer, _leeway(leeway_seconds), LOCAL_REQUIRED_CLAIMS
    )


# ----------------------------------------------------------------------------- external provider


@dataclass
class _JwksFile:
    """A provider's key set read from a file (``file://``), read again when the file changes.
    (PyJWKClient fetches only over HTTP(S), on purpose.)"""

    path: Path
    _mtime: float | None = None
    _keys: jwt.PyJWKSet | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get_signing_key(self, kid: str) -> jwt.PyJWK:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
                if self._keys is None or mtime != self._mtime:
                    self._keys = jwt.PyJWKSet.from_json(self.path.read_text())
                    self._mtime = mtime
            except (OSError, jwt.PyJWTError, json.JSONDecodeError) as exc:
                raise jwt.PyJWKClientConnectionError(
                    f"cannot read the key set {self.path}: {exc}"
                ) from exc
            for jwk in self._keys.keys:
                if jwk.key_id == kid and jwk.public_key_use in ("sig", None):
                    return jwk
        raise jwt.PyJWKClientError(f"no signing key {kid!r} in the key set")


class OidcProvider:
    """Verifies tokens of an external OpenID Connect provider with its published key set (a
    JWKS, fetched over HTTP(S) by PyJWT's :class:`~jwt.PyJWKClient`, cached for
    ``lifespan_seconds`` and fetched again for a key id it does not know, at most once per
    ``refresh_cooldown_seconds``; or a ``file://``, read again when it changes)."""

    def __init__(
        self,
        issuer: str,
        jwks_url: str,
        audience: str,
        algorithms: list[str],
        leeway_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
        lifespan_seconds: float = 300.0,
        refresh_cooldown_seconds: float = 30.0,
    ) -> None:
        if not algorithms or any(a.startswith("HS") or a == "none" for a in algorithms):
            raise ValueError("an external provider's tokens are verified with asymmetric keys")
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.audience = audience
        self.algorithms = list(algorithms)
        self.leeway_seconds = leeway_seconds
        self._keys: jwt.PyJWKClient | _JwksFile
        if jwks_url.startswith("file://"):
            self._keys = _JwksFile(Path(unquote(urlparse(jwks_url).path)))
        else:
            self._keys = jwt.PyJWKClient(
                jwks_url,
                cache_keys=False,  # its per-kid cache never expires: a withdrawn key would live on
                lifespan=lifespan_seconds,
                timeout=timeout_seconds,
                # an unknown kid fetches the set again at most this often (a flood of made-up
                # kids must not become a flood of requests to the provider)
                cooldown_duration=refresh_cooldown_seconds,
            )

    def verify(self, token: str) -> Principal:
        header = _header(token)
        if header.get("alg") not in self.algorithms:
            raise TokenError("unsupported token algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("token lacks a key id (kid)")
        try:
            signing_key = self._keys.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenCheckUnavailable(
                f"the identity provider's keys cannot be read now ({exc})"
            ) from None
        except jwt.PyJWKClientError:
            raise TokenError(
                "token signed with a key the identity provider does not publish"
            ) from None
        return _decode(
            token,
            signing_key,
            self.algorithms,
            self.audience,
            self.issuer,
            self.leeway_seconds,
            REQUIRED_CLAIMS,
        )


# ----------------------------------------------------------------------------- the whole check


class TokenVerifier:
    """Every check a bearer token goes through: its issuer picks this site's keys or the
    provider's; then its ``jti`` must not be revoked."""

    def __init__(
        self,
        keys: bytes | SigningKeys,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_seconds: float | None = None,
        provider: OidcProvider | None = None,
        revocations: RevocationList | None = None,
    ) -> None:
        self.keys = SigningKeys.of(keys)
        self.audience, self.issuer = _configured(audience, issuer)
        self.leeway_seconds = _leeway(leeway_seconds)
        self.provider = provider
        self.revocations = revocations

    @classmethod
    def from_settings(
        cls, settings: Settings, revocations: RevocationList | None = None
    ) -> TokenVerifier:
        """The check as configured: this site's keys, the provider if one is set, and the
        revocation list (``revocations``, or opened at ``CONCIERGE_TOKEN_REVOCATION_URL``)."""
        from core.revocation import RevocationList

        provider = None
        if settings.oidc_issuer and settings.oidc_jwks_url:
            provider = OidcProvider(
                settings.oidc_issuer,
                settings.oidc_jwks_url,
                settings.token_audience,
                settings.oidc_algorithm_list(),
                settings.token_leeway_seconds,
            )
        return cls(
            SigningKeys.from_settings(settings),
            audience=settings.token_audience,
            issuer=settings.token_issuer,
            leeway_seconds=settings.token_leeway_seconds,
            provider=provider,
            revocations=revocations or RevocationList(settings.resolved_token_revocation_url()),
        )

    def verify(self, token: str) -> Principal:
        """The principal; :class:`TokenError` (401) or :class:`TokenCheckUnavailable` (503)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        claimed_issuer = claims.get("iss")
        if self.provider is not None and claimed_issuer == self.provider.issuer:
            principal = self.provider.verify(token)
        else:
            principal = verify(
                self.keys,
                token,
                audience=self.audience,
                issuer=self.issuer,
                leeway_seconds=self.leeway_seconds,
            )
        if self.revocations is not None:
            from core.revocation import RevocationUnavailable

            try:
                revoked = self.revocations.is_revoked(principal.jti)
            except RevocationUnavailable as exc:
                raise TokenCheckUnavailable(str(exc)) from None
            if revoked:
                raise TokenError("token revoked")
        return principal


_bearer = HTTPBearer(auto_error=False, description="A token from `concierge token create`.")


def _verifier(request: Request) -> TokenVerifier:
    """The app's verifier; an app that only set ``state.token_key`` (a test's bare app) gets
    one over that key, without revocation or provider."""
    state = request.app.state
    found: TokenVerifier | None = getattr(state, "token_verifier", None)
    if found is None:
        found = TokenVerifier(
            state.token_key,
            audience=getattr(state, "token_audience", None),
            issuer=getattr(state, "token_issuer", None),
            leeway_seconds=getattr(state, "token_leeway_seconds", None),
        )
    return found


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
    try:
        principal = _verifier(request).verify(credentials.credentials)
    except TokenError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            str(exc),
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    except TokenCheckUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"the token cannot be checked now: {exc}",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_role(*roles: Role):  # type: ignore[no-untyped-def]
    """A dependency that admits only the given roles (admin is not implied)."""

    # async: a comparison, no I/O, so it runs on the event loop; a plain function would be
    # handed to a worker thread and back on every request (FastAPI runs sync dependencies in
    # its thread pool), which on a loaded machine costs more than the check
    async def check(principal: CurrentPrincipal) -> Principal:
        if principal.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the role {' or '.join(roles)}; you are {principal.role}",
            )
        return principal

    return Depends(check)


def caller_source_system(principal: CurrentPrincipal) -> str:
    """The source system a ``source`` caller writes as (its token's ``source_system``); 403
    for any other role."""
    if principal.role != "source" or principal.source_system is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this needs the role source; you are {principal.role}",
        )
    return principal.source_system
