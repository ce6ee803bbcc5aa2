"""Tokens on the real thing: ``concierge api`` in a subprocess on the real broker, signing keys
from ``CONCIERGE_TOKEN_KEYS``, tokens revoked with ``concierge token revoke`` while it runs, and
two source systems pushing FHIR: one cannot retract what the other pushed, on the facts topic
itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from core.auth import SigningKeys, issue
from core.contracts.facts import envelopes_of
from infra.topics import FACTS
from tests.integration.surveillance_stack import ApiProcess
from tests.integration.test_ingest_kafka import read_all

pytestmark = pytest.mark.integration

OLD, NEW = "old-" + "o" * 32, "new-" + "n" * 32
BOTH = SigningKeys({"old": OLD.encode(), "new": NEW.encode()}, current="new")
EHR_A, EHR_B = "urn:it:ehr-a", "urn:it:ehr-b"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
FHIR = "application/fhir+json"


def environment(bootstrap: str, prefix: str, home: Path, keys: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}
    return {
        **env,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CONCIERGE_TOPIC_PREFIX": prefix,
        "CONCIERGE_HOME": str(home),
        "CONCIERGE_TOKEN_KEYS": keys,
        "CONCIERGE_TOKEN_KEY_ID": "new",
        "CONCIERGE_RECRUITMENT_API": "false",
        "CONCIERGE_SURVEILLANCE_MONITOR": "false",
    }


@pytest.fixture
def stack(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    env = environment(kafka_bootstrap, topic_prefix, tmp_path / "home", f"old={OLD},new={NEW}")
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        yield {"api": api, "env": env, "tmp": tmp_path, "prefix": topic_prefix}
    finally:
        api.stop()


def send(api: ApiProcess, method: str, path: str, token: str, body: Any = None) -> httpx.Response:
    return httpx.request(
        method,
        f"{api.url}{path}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR},
        content=None if body is None else orjson.dumps(body),
        timeout=30,
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "concierge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def facts_by_key(bootstrap: str, topic: str, expect_at_least: int) -> dict[str, list[Any]]:
    by_key: dict[str, list[Any]] = {}
    for _, value in read_all(bootstrap, topic, expect_at_least):
        for envelope in envelopes_of(value):
            by_key.setdefault(str(envelope["key"]), []).append(envelope)
    return by_key


def test_a_source_cannot_retract_what_another_source_pushed(
    stack: dict[str, Any], kafka_bootstrap: str
) -> None:
    api: ApiProcess = stack["api"]
    topic = f"{stack['prefix']}{FACTS}"
    token_a = issue(BOTH, "source", "Other EHR", source_system=EHR_A)
    token_b = issue(BOTH, "source", "Rel source", source_system=EHR_B)
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": NHS, "value": "9434765919"}],
    }
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-01-01T09:00:00Z",
        "valueQuantity": {"value": 5.5, "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    }
    assert send(api, "PUT", "/fhir/Patient/p1", token_b, patient).status_code == 201
    assert send(api, "PUT", "/fhir/Observation/o1", token_b, observation).status_code == 201

    # source A tries every way to retract B's observation
    deleted = send(api, "DELETE", "/fhir/Observation/o1", token_a)
    assert deleted.status_code == 200
    assert deleted.json()["issue"][0]["diagnostics"] == "nothing to delete"
    in_error = {**observation, "status": "entered-in-error"}
    assert send(api, "PUT", "/fhir/Observation/o1", token_a, in_error).status_code == 422
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "DELETE", "url": "Observation/o1"}},
            {"request": {"method": "DELETE", "url": "Patient/p1"}},
        ],
    }
    answer = send(api, "POST", "/fhir", token_a, bundle)
    assert [e["response"]["status"] for e in answer.json()["entry"]] == ["200 OK", "200 OK"]

    facts = facts_by_key(kafka_bootstrap, topic, 2)
    assert f"{EHR_B}|Observation|o1" in facts
    assert all(k.startswith(f"{EHR_B}|") for k in facts), sorted(facts)
    assert not any(e["retracted"] for envelopes in facts.values() for e in envelopes)
    assert {e["provenance"]["source"] for es in facts.values() for e in es} == {EHR_B}

    # B retracts its own
    assert (
        send(api, "DELETE", "/fhir/Observation/o1", token_b).json()["issue"][0]["diagnostics"]
        == "deleted"
    )
    facts = facts_by_key(kafka_bootstrap, topic, 3)
    assert [e["retracted"] for e in facts[f"{EHR_B}|Observation|o1"]] == [False, True]

    # and an id that is no FHIR id never becomes a path
    dots = send(api, "PUT", "/fhir/Patient/%2E%2E", token_b, {**patient, "id": ".."})
    assert dots.status_code == 400 and "location" not in dots.headers


def test_revocation_takes_effect_at_once_and_a_removed_key_takes_its_tokens(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    api: ApiProcess = stack["api"]
    env: dict[str, str] = stack["env"]
    schema = "/v1/feasibility/criteria-schema"
    sponsor, spare = (issue(BOTH, "sponsor", "Acme") for _ in range(2))
    old_kid = issue(BOTH, "sponsor", "Acme", kid="old")
    source = issue(BOTH, "source", "EHR A", source_system=EHR_A)
    practitioner = {"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Jones"}]}
    for token in (sponsor, spare, old_kid):
        assert send(api, "GET", schema, token).status_code == 200
    assert send(api, "PUT", "/fhir/Practitioner/pr1", source, practitioner).status_code == 201

    # revoked with the CLI, by the token itself and by its jti, while the API runs
    revoked = cli(env, "token", "revoke", sponsor, "--reason", "left the company")
    assert revoked.returncode == 0, revoked.stderr
    created = json.loads(
        cli(env, "token", "create", "--role", "sponsor", "--org", "x", "--json").stdout
    )
    assert created["kid"] == "new" and created["jti"] == _jti(created["token"])
    jti = _jti(source)
    assert cli(env, "token", "revoke", jti).returncode == 0
    refused = send(api, "GET", schema, sponsor)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    refused = send(api, "PUT", "/fhir/Practitioner/pr1", source, practitioner)
    assert refused.status_code == 401 and "revoked" in refused.json()["issue"][0]["diagnostics"]
    assert send(api, "GET", schema, spare).status_code == 200
    listed = [json.loads(line) for line in cli(env, "token", "list", "--json").stdout.splitlines()]
    assert {e["jti"] for e in listed} == {_jti(sponsor), jti}
    assert next(e for e in listed if e["jti"] == _jti(sponsor))["reason"] == "left the company"

    # the old key taken out of the list (a restart with the new configuration)
    api.stop()
    restarted = ApiProcess(
        {**env, "CONCIERGE_TOKEN_KEYS": f"new={NEW}"}, tmp_path / "api-restarted.log"
    ).start()
    try:
        assert send(restarted, "GET", schema, old_kid).status_code == 401
        assert send(restarted, "GET", schema, spare).status_code == 200
        assert send(restarted, "GET", schema, sponsor).status_code == 401  # still revoked
    finally:
        restarted.stop()


def _jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])
