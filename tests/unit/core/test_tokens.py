"""Tokens that say what they may touch: key ids and rotation, ``nbf``, what a source token must
name, the revocation list (at once, across processes, and 503 when it cannot be read), and an
external OpenID Connect provider's tokens verified with its key set served by a real HTTP
server on loopback (and from a file)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.auth import (
    CurrentPrincipal,
    OidcProvider,
    SigningKeys,
    TokenCheckUnavailable,
    TokenError,
    TokenVerifier,
    issue,
    verify,
)
from core.http import install_problem_details
from core.revocation import RevocationList
from core.settings import Settings, parse_token_keys
from tests.jwks_server import (
    AUDIENCE,
    ISSUER,
    ProviderKey,
    provider_claims,
    serve_jwks,
)
from tests.unit.concierge.test_configuration import start

OLD, NEW = b"o" * 32, b"n" * 32
ROTATING = SigningKeys({"2025-06": OLD, "2026-01": NEW}, current="2026-01")


def _header(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# ------------------------------------------------------------------------------ this site's keys


def test_tokens_name_the_key_that_signed_them_and_carry_nbf() -> None:
    token = issue(ROTATING, "sponsor", "Acme")
    assert _header(token) == {"alg": "HS256", "typ": "JWT", "kid": "2026-01"}
    claims = _claims(token)
    assert claims["nbf"] == claims["iat"] and claims["exp"] > claims["iat"]
    assert verify(ROTATING, token).org == "Acme"
    # one raw key (CONCIERGE_TOKEN_KEY) is the key "default"
    assert _header(issue(OLD, "sponsor", "Acme"))["kid"] == "default"


def test_an_old_key_verifies_while_listed_and_not_once_removed() -> None:
    old_token = issue(ROTATING, "regulator", "MHRA", kid="2025-06")
    assert verify(ROTATING, old_token).org == "MHRA"
    after = SigningKeys({"2026-01": NEW}, current="2026-01")
    with pytest.raises(TokenError, match="does not hold"):
        verify(after, old_token)
    assert verify(after, issue(ROTATING, "regulator", "MHRA")).org == "MHRA"
    # a kid is a name, not a credential: the old key's token relabelled as the new key fails
    relabelled = jwt.encode(_claims(old_token), OLD, algorithm="HS256", headers={"kid": "2026-01"})
    with pytest.raises(TokenError, match="signature"):
        verify(ROTATING, relabelled)


def test_a_token_without_a_key_id_or_with_an_unknown_one_is_refused() -> None:
    claims = _claims(issue(ROTATING, "admin", "Site"))
    with pytest.raises(TokenError, match="kid"):
        verify(ROTATING, jwt.encode(claims, NEW, algorithm="HS256"))
    with pytest.raises(TokenError, match="does not hold"):
        verify(ROTATING, jwt.encode(claims, NEW, algorithm="HS256", headers={"kid": "nope"}))


def test_not_before_in_the_future_is_refused_beyond_the_leeway() -> None:
    soon = issue(ROTATING, "sponsor", "Acme", not_before=int(time.time()) + 10)
    assert verify(ROTATING, soon, leeway_seconds=30).org == "Acme"  # clock skew
    later = issue(ROTATING, "sponsor", "Acme", not_before=int(time.time()) + 3600)
    with pytest.raises(TokenError, match="not yet valid"):
        verify(ROTATING, later, leeway_seconds=30)


def test_unsigned_tokens_are_refused_whatever_they_claim() -> None:
    claims = _claims(issue(ROTATING, "admin", "Site"))
    for header in ({"kid": "2026-01"}, {}):
        unsigned = jwt.encode(claims, None, algorithm="none", headers=header)
        with pytest.raises(TokenError, match="algorithm"):
            verify(ROTATING, unsigned)
        with pytest.raises(TokenError, match="algorithm"):
            TokenVerifier(ROTATING).verify(unsigned)


def test_a_source_token_names_its_source_system_and_only_a_source_token_does() -> None:
    with pytest.raises(TokenError, match="source system"):
        issue(ROTATING, "source", "EHR A")
    with pytest.raises(TokenError, match="only a source token"):
        issue(ROTATING, "clinician", "GP", source_system="urn:ehr:a")
    with pytest.raises(TokenError, match=r"\|"):
        issue(ROTATING, "source", "EHR A", source_system="urn:a|Patient")
    token = issue(ROTATING, "source", "EHR A", source_system="urn:ehr:a")
    assert verify(ROTATING, token).source_system == "urn:ehr:a"
    # a correctly signed source token that does not say which system it writes as is refused
    claims = {k: v for k, v in _claims(token).items() if k != "source_system"}
    forged = jwt.encode(claims, NEW, algorithm="HS256", headers={"kid": "2026-01"})
    with pytest.raises(TokenError, match="source system"):
        verify(ROTATING, forged)


# ------------------------------------------------------------------------------ configuration


def test_token_keys_are_read_as_pairs_or_json_in_order() -> None:
    pairs = parse_token_keys(f"b={'x' * 32}, a={'y' * 40}")
    assert list(pairs) == ["b", "a"] and pairs["a"] == b"y" * 40
    assert parse_token_keys(json.dumps({"k1": "z" * 32})) == {"k1": b"z" * 32}
    settings = Settings(token_keys=f"2025={'o' * 32},2026={'n' * 32}", token_key_id="2026")
    keys = SigningKeys.from_settings(settings)
    assert (list(keys.keys), keys.current) == (["2025", "2026"], "2026")
    assert Settings(token_keys=f"first={'o' * 32},second={'n' * 32}").signing_key_id() == "first"
    single = SigningKeys.from_settings(Settings())
    assert list(single.keys) == ["default"]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"token_keys": "a=short"}, "at least 32 bytes"),
        ({"token_keys": "no-separator"}, "kid=key"),
        ({"token_keys": f"a b={'x' * 32}"}, "key id"),
        ({"token_keys": f"a={'x' * 32},a={'y' * 32}"}, "twice"),
        ({"token_keys": "{not json"}, "JSON"),
        ({"token_keys": f"a={'x' * 32}", "token_key_id": "b"}, "names no signing key"),
        ({"token_key_id": "other"}, "names no signing key"),
        ({"token_keys": f"a={'x' * 32}", "token_key": "k" * 32}, "not both"),
        ({"oidc_issuer": ISSUER}, "together"),
        ({"oidc_issuer": ISSUER, "oidc_jwks_url": "ftp://x/jwks"}, "https://"),
        ({"oidc_issuer": "urn:concierge:token-issuer", "oidc_jwks_url": "https://x"}, "differ"),
        ({"oidc_algorithms": "RS256,HS256"}, "HS256"),
    ],
)
def test_a_bad_token_setting_is_refused_with_the_reason(
    values: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValidationError, match=reason):
        Settings(**values)


# ------------------------------------------------------------------------------ revocation


def test_a_revoked_token_is_refused_at_once_by_every_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    api_side = TokenVerifier(ROTATING, revocations=RevocationList(url))
    token = issue(ROTATING, "sponsor", "Acme")
    other = issue(ROTATING, "sponsor", "Acme")
    assert api_side.verify(token).org == "Acme"
    cli_side = RevocationList(url)  # another process: `concierge token revoke`
    jti = _claims(token)["jti"]
    first = cli_side.revoke(jti, "laptop stolen", "cli:test", _claims(token)["exp"])
    assert cli_side.revoke(jti, "again") == first  # the first revocation stands
    with pytest.raises(TokenError, match="revoked"):
        api_side.verify(token)  # the same verifier, no restart
    assert api_side.verify(other).org == "Acme"
    [entry] = cli_side.entries()
    assert (entry.jti, entry.reason, entry.revoked_by) == (jti, "laptop stolen", "cli:test")
    assert cli_side.prune(int(time.time())) == 0  # not expired yet
    assert cli_side.prune(entry.expires_at + 1) == 1 and cli_side.entries() == []


def test_an_unreadable_revocation_list_answers_503_not_a_guess(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    revocations = RevocationList(url)
    app = FastAPI()
    app.state.token_verifier = TokenVerifier(ROTATING, revocations=revocations)
    install_problem_details(app)

    @app.get("/v1/whoami")
    def whoami(principal: CurrentPrincipal) -> dict[str, str]:
        return {"org": principal.org}

    client = TestClient(app)
    headers = {"Authorization": f"Bearer {issue(ROTATING, 'sponsor', 'Acme')}"}
    assert client.get("/v1/whoami", headers=headers).json() == {"org": "Acme"}
    with revocations.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE revoked_token"))
    with pytest.raises(TokenCheckUnavailable):
        app.state.token_verifier.verify(headers["Authorization"][7:])
    refused = client.get("/v1/whoami", headers=headers)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "revocation list" in refused.json()["detail"]


# ------------------------------------------------------------------------------ the provider


def provider(url: str, **overrides: Any) -> OidcProvider:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "jwks_url": url,
        "audience": AUDIENCE,
        "algorithms": ["RS256", "ES256"],
        "refresh_cooldown_seconds": 0,
        **overrides,
    }
    return OidcProvider(**values)


def test_provider_tokens_are_verified_with_its_published_keys() -> None:
    rsa_key, ec_key = ProviderKey.rsa("rsa-1"), ProviderKey.ec("ec-1")
    with serve_jwks([rsa_key, ec_key]) as jwks:
        verifier = TokenVerifier(ROTATING, provider=provider(jwks.url))
        rsa_token = rsa_key.sign(provider_claims("regulator", "MHRA"))
        assert verifier.verify(rsa_token).role == "regulator"
        clinician = provider_claims(
            "clinician", "Leeds GP", practitioner="ehr|Practitioner|p1", sites=["RR8"]
        )
        principal = verifier.verify(ec_key.sign(clinician))
        assert (principal.practitioner, principal.sites) == ("ehr|Practitioner|p1", ("RR8",))
        assert jwks.fetches == 1  # the key set is cached
        # this site's own tokens still verify beside the provider's
        assert verifier.verify(issue(ROTATING, "admin", "Site")).role == "admin"


def test_provider_tokens_that_are_not_right_are_refused() -> None:
    key, stranger = ProviderKey.rsa("rsa-1"), ProviderKey.rsa("rsa-1")
    with serve_jwks([key]) as jwks:
        verifier = TokenVerifier(ROTATING, provider=provider(jwks.url))
        cases = {
            "audience": key.sign(provider_claims("sponsor", "Acme", aud="urn:other:api")),
            "expired": key.sign(provider_claims("sponsor", "Acme", ttl=-3600)),
            "not yet valid": key.sign(
                provider_claims("sponsor", "Acme", nbf=int(time.time()) + 3600)
            ),
            "signature": stranger.sign(provider_claims("sponsor", "Acme")),  # same kid
            "does not publish": ProviderKey.rsa("rsa-2").sign(provider_claims("sponsor", "Acme")),
            "'jti'": key.sign(
                {k: v for k, v in provider_claims("sponsor", "Acme").items() if k != "jti"}
            ),
            "source system": key.sign(provider_claims("source", "EHR")),
            "kid": jwt.encode(provider_claims("sponsor", "Acme"), key.private, algorithm="RS256"),
        }
        for reason, token in cases.items():
            with pytest.raises(TokenError, match=reason):
                verifier.verify(token)
        # an issuer that is neither this site nor the provider is checked as this site's: no
        with pytest.raises(TokenError):
            verifier.verify(key.sign(provider_claims("sponsor", "Acme", iss="https://evil")))


def _hs256_by_hand(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = ".".join(
        b64(json.dumps(part).encode())
        for part in ({"alg": "HS256", "typ": "JWT", "kid": kid}, claims)
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_the_provider_issuer_cannot_be_used_with_a_symmetric_or_no_algorithm() -> None:
    """The classic confusion: HS256 "signed" with the provider's public key as the secret."""
    key = ProviderKey.rsa("rsa-1")
    with serve_jwks([key]) as jwks:
        verifier = TokenVerifier(ROTATING, provider=provider(jwks.url))
        claims = provider_claims("admin", "Site")
        public_pem = key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        forged = _hs256_by_hand(claims, public_pem, kid="rsa-1")  # PyJWT will not make one
        with pytest.raises(TokenError, match="algorithm"):
            verifier.verify(forged)
        unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "rsa-1"})
        with pytest.raises(TokenError, match="algorithm"):
            verifier.verify(unsigned)
        # this site's key does not sign for the provider's issuer either
        ours = jwt.encode(claims, NEW, algorithm="HS256", headers={"kid": "2026-01"})
        with pytest.raises(TokenError, match="algorithm"):
            verifier.verify(ours)
    with pytest.raises(ValueError, match="asymmetric"):
        provider("https://x/jwks", algorithms=["HS256"])


def test_a_key_the_provider_rotates_in_is_fetched_and_one_it_withdraws_stops_working() -> None:
    first, second = ProviderKey.rsa("k1"), ProviderKey.ec("k2")
    with serve_jwks([first]) as jwks:
        verifier = TokenVerifier(ROTATING, provider=provider(jwks.url, lifespan_seconds=0.5))
        assert verifier.verify(first.sign(provider_claims("sponsor", "Acme"))).org == "Acme"
        jwks.keys.append(second)
        assert verifier.verify(second.sign(provider_claims("sponsor", "Acme"))).org == "Acme"
        assert jwks.fetches == 2  # the unknown kid fetched the set again
        jwks.keys.remove(first)
        time.sleep(0.6)  # past the cache's lifespan
        with pytest.raises(TokenError, match="does not publish"):
            verifier.verify(first.sign(provider_claims("sponsor", "Acme")))


def test_a_provider_that_cannot_be_reached_answers_unavailable_not_refused() -> None:
    key = ProviderKey.rsa("rsa-1")
    with serve_jwks([key]) as jwks:
        url = jwks.url
    verifier = TokenVerifier(ROTATING, provider=provider(url, timeout_seconds=1))
    with pytest.raises(TokenCheckUnavailable, match="cannot be read"):
        verifier.verify(key.sign(provider_claims("sponsor", "Acme")))


def test_a_key_set_in_a_file_is_read_and_read_again_when_it_changes(tmp_path: Path) -> None:
    first, second = ProviderKey.rsa("f1"), ProviderKey.ec("f2")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [first.jwk()]}))
    settings = Settings(
        home=tmp_path, oidc_issuer=ISSUER, oidc_jwks_url=f"file://{path}", token_audience=AUDIENCE
    )
    verifier = TokenVerifier.from_settings(settings)
    assert verifier.verify(first.sign(provider_claims("sponsor", "Acme"))).org == "Acme"
    with pytest.raises(TokenError, match="does not publish"):
        verifier.verify(second.sign(provider_claims("sponsor", "Acme")))
    time.sleep(0.01)
    path.write_text(json.dumps({"keys": [second.jwk()]}))
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime whatever the clock's grain
    assert verifier.verify(second.sign(provider_claims("sponsor", "Acme"))).org == "Acme"
    path.unlink()
    with pytest.raises(TokenCheckUnavailable):
        verifier.verify(second.sign(provider_claims("sponsor", "Acme")))


@pytest.mark.parametrize(
    ("name", "bad", "reason"),
    [
        ("CONCIERGE_TOKEN_KEY_ID", "retired", "names no signing key"),
        ("CONCIERGE_TOKEN_KEYS", "a=short", "at least 32 bytes"),
        ("CONCIERGE_OIDC_ALGORITHMS", "HS256", "RS256"),
    ],
)
def test_the_api_started_with_a_bad_token_setting_says_so_in_one_line(
    tmp_path: Path, name: str, bad: str, reason: str
) -> None:
    done = start(["api"], {name: bad}, tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"concierge: bad configuration: {name}") and reason in line, line
    if name == "CONCIERGE_TOKEN_KEYS":
        assert "short" not in line, "a key was shown"


def test_the_cli_issues_a_source_token_only_for_a_named_source_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from concierge.commands.admin import token
    from core.settings import get_settings

    monkeypatch.setenv("CONCIERGE_HOME", str(tmp_path))
    monkeypatch.setenv("CONCIERGE_TOKEN_KEYS", f"a={'a' * 32},b={'b' * 32}")
    monkeypatch.setenv("CONCIERGE_TOKEN_KEY_ID", "b")
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        refused = runner.invoke(token, ["create", "--role", "source", "--org", "EHR"])
        assert refused.exit_code == 2 and "--source-system" in refused.output
        wrong = ["create", "--role", "sponsor", "--org", "x", "--source-system", "urn:a"]
        assert runner.invoke(token, wrong).exit_code == 2
        made = runner.invoke(
            token,
            ["create", "--role", "source", "--org", "EHR", "--source-system", "urn:a", "--json"],
        )
        assert made.exit_code == 0, made.output
        issued = json.loads(made.output)
        principal = verify(SigningKeys.from_settings(get_settings()), issued["token"])
        assert (principal.source_system, issued["kid"], issued["jti"]) == (
            "urn:a",
            "b",
            principal.jti,
        )
        revoked = runner.invoke(token, ["revoke", issued["token"], "--reason", "test"])
        assert json.loads(revoked.output)["expires_at"] == principal.exp
        listed = runner.invoke(token, ["list", "--json"])
        assert [json.loads(line)["jti"] for line in listed.output.splitlines()] == [principal.jti]
    finally:
        get_settings.cache_clear()


def test_the_cli_offers_every_role_the_api_knows_without_loading_the_api() -> None:
    """``concierge token create --role`` reads the one list of roles (core.roles), and the CLI
    module does not import FastAPI to get it."""
    import subprocess
    import sys

    probe = (
        "import sys, concierge.commands.admin as a, core.auth as auth\n"
        "choices = next(p.type.choices for p in a.create.params if p.name == 'role')\n"
        "assert tuple(choices) == auth.ROLES, choices\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
    alone = "import sys, concierge.commands.admin\nassert 'fastapi' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", alone], check=True)
