from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.audit import AuditLog, audit_table
from core.auth import CurrentPrincipal, TokenError, issue, require_role, verify
from core.http import install_audit, install_problem_details

KEY = b"k" * 32


def test_token_round_trip_and_tampering() -> None:
    token = issue(KEY, "clinician", "Leeds GP", practitioner="src|Practitioner|p1", sites=("RR8",))
    principal = verify(KEY, token)
    assert principal.role == "clinician" and principal.sites == ("RR8",)
    header, payload, signature = token.split(".")
    with pytest.raises(TokenError, match="signature"):
        verify(KEY, f"{header}.{payload[:-2]}xx.{signature}")
    with pytest.raises(TokenError, match="signature"):
        verify(b"other" * 8, token)
    with pytest.raises(TokenError, match="expired"):
        verify(KEY, token, now=time.time() + 40 * 24 * 3600)
    with pytest.raises(TokenError):
        issue(KEY, "patient", "x")  # type: ignore[arg-type]


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
