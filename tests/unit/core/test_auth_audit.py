from __future__ import annotations

import base64
from pathlib import Path

import jwt
import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.audit import AuditLog, audit_table
from core.auth import CurrentPrincipal, TokenError, issue, require_role, verify
from core.http import install_audit, install_problem_details
from core.settings import get_settings
from tests.recruitment_helpers import BACKENDS, fresh_database

KEY = b"k" * 32


def test_token_round_trip_and_tampering() -> None:
    token = issue(KEY, "clinician", "Leeds GP", practitioner="src|Practitioner|p1", sites=("RR8",))
    principal = verify(KEY, token)
    assert principal.role == "clinician" and principal.sites == ("RR8",)
    header, payload, signature = token.split(".")
    with pytest.raises(TokenError, match="signature"):
        verify(KEY, f"{header}.{payload}.{signature[:-4]}AAAA")  # tampered signature
    with pytest.raises(TokenError, match="signature"):
        verify(b"other" * 8, token)
    forged = _b64(orjson.dumps({**_claims(token), "role": "admin"}))
    with pytest.raises(TokenError, match="signature"):
        verify(KEY, f"{header}.{forged}.{signature}")  # claims changed, signature kept
    with pytest.raises(TokenError):
        issue(KEY, "patient", "x")  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = orjson.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return claims


def test_tokens_carry_and_are_checked_for_audience_and_issuer() -> None:
    settings = get_settings()
    token = issue(KEY, "sponsor", "Acme")
    claims = _claims(token)
    assert (claims["aud"], claims["iss"]) == (settings.token_audience, settings.token_issuer)
    assert {"sub", "role", "org", "exp", "iat", "jti"} <= set(claims)
    other_api = issue(KEY, "sponsor", "Acme", audience="urn:elsewhere:api")
    with pytest.raises(TokenError, match="audience"):
        verify(KEY, other_api)
    other_issuer = issue(KEY, "sponsor", "Acme", issuer="urn:elsewhere:issuer")
    with pytest.raises(TokenError, match="issuer"):
        verify(KEY, other_issuer)
    # the API's own audience and issuer are configurable, and both sides follow them
    mine = issue(KEY, "sponsor", "Acme", audience="urn:trust:api", issuer="urn:trust:idp")
    assert verify(KEY, mine, audience="urn:trust:api", issuer="urn:trust:idp").org == "Acme"
    with pytest.raises(TokenError, match="audience"):
        verify(KEY, mine, issuer="urn:trust:idp")


def test_expiry_with_a_small_leeway() -> None:
    lapsed = issue(KEY, "sponsor", "Acme", ttl_seconds=-5)
    assert verify(KEY, lapsed, leeway_seconds=30).org == "Acme"  # clock skew within leeway
    with pytest.raises(TokenError, match="expired"):
        verify(KEY, lapsed, leeway_seconds=0)
    with pytest.raises(TokenError, match="expired"):
        verify(KEY, issue(KEY, "sponsor", "Acme", ttl_seconds=-3600))  # default leeway: 30 s


def test_unsigned_other_algorithm_and_incomplete_tokens_are_refused() -> None:
    claims = _claims(issue(KEY, "admin", "Site"))
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(TokenError, match="algorithm"):
        verify(KEY, unsigned)
    header = _b64(b'{"alg":"none","typ":"JWT"}')
    with pytest.raises(TokenError, match="algorithm"):
        verify(KEY, f"{header}.{_b64(orjson.dumps(claims))}.")
    hs512 = jwt.encode(claims, KEY * 2, algorithm="HS512")
    with pytest.raises(TokenError, match="algorithm"):
        verify(KEY * 2, hs512)
    kid = {"kid": "default"}
    for claim in ("aud", "iss", "exp", "nbf", "jti"):
        partial = {k: v for k, v in claims.items() if k != claim}
        with pytest.raises(TokenError, match=f"'{claim}'"):
            verify(KEY, jwt.encode(partial, KEY, algorithm="HS256", headers=kid))
    with pytest.raises(TokenError, match="kid"):
        verify(KEY, jwt.encode(claims, KEY, algorithm="HS256"))  # no key id
    with pytest.raises(TokenError, match="claims"):
        verify(KEY, jwt.encode({**claims, "role": "patient"}, KEY, algorithm="HS256", headers=kid))
    with pytest.raises(TokenError, match="malformed"):
        verify(KEY, "not-a-token")


def test_audit_chain_detects_alteration_and_removal(tmp_path: Path) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    for i in range(5):
        log.append("clinician:a", "clinician", "A", "GET /v1/candidates", {"i": i})
    assert log.verify().ok and log.verify().records == 5
    with log.engine.begin() as conn:
        conn.execute(sa.update(audit_table).where(audit_table.c.seq == 3).values(detail='{"i":99}'))
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3 and "altered" in (result.reason or "")
    log2 = AuditLog(f"sqlite:///{tmp_path / 'audit2.sqlite'}")
    for i in range(4):
        log2.append("x", "sponsor", "S", "GET /v1/x", {"i": i})
    with log2.engine.begin() as conn:
        conn.execute(sa.delete(audit_table).where(audit_table.c.seq == 2))
    assert log2.verify().first_bad_seq == 3


def test_roles_problem_details_and_audit_per_request(tmp_path: Path) -> None:
    app = FastAPI()
    app.state.token_key = KEY
    app.state.audit = AuditLog(f"sqlite:///{tmp_path / 'a.sqlite'}")
    install_problem_details(app)
    install_audit(app)

    @app.get("/v1/secret", dependencies=[require_role("regulator")])
    def secret(principal: CurrentPrincipal) -> dict[str, str]:
        return {"hello": principal.org}

    client = TestClient(app)
    anonymous = client.get("/v1/secret")
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    sponsor = issue(KEY, "sponsor", "Pharma")
    assert (
        client.get("/v1/secret", headers={"Authorization": f"Bearer {sponsor}"}).status_code == 403
    )
    regulator = issue(KEY, "regulator", "MHRA")
    ok = client.get("/v1/secret", headers={"Authorization": f"Bearer {regulator}"})
    assert ok.json() == {"hello": "MHRA"}
    records = list(app.state.audit.records())
    assert [(r["role"], r["action"]) for r in records] == [
        ("anonymous", "GET /v1/secret"),
        ("sponsor", "GET /v1/secret"),
        ("regulator", "GET /v1/secret"),
    ]
    assert app.state.audit.verify().ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nul_in_the_path_is_audited_escaped(backend: str, tmp_path: Path) -> None:
    """PostgreSQL keeps no U+0000 in text: a request to ``/v1/...%00...`` failed its audit
    record, and so answered 500 whatever the route said. The NUL is recorded as ``%00``."""
    with fresh_database(backend, tmp_path, migrate=False) as url:
        app = FastAPI()
        app.state.token_key = KEY
        app.state.audit = AuditLog(url)
        install_problem_details(app)
        install_audit(app)

        @app.get("/v1/things/{thing}")
        def thing(thing: str) -> dict[str, str]:
            return {"thing": thing}

        response = TestClient(app).get("/v1/things/a%00b")
        assert response.status_code == 200
        assert [r["action"] for r in app.state.audit.records()] == ["GET /v1/things/a%00b"]
        assert app.state.audit.verify().ok
        app.state.audit.engine.dispose()
