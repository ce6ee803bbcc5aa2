"""The clinician API: who sees whom, identity reads audited, actions, conflicts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concierge.routes.recruitment import build_router
from core.audit import AuditLog
from core.auth import issue
from core.http import install_audit, install_problem_details
from recruitment.runtime import Runtime, build_runtime
from recruitment.settings import RecruitmentSettings
from tests.recruitment_helpers import (
    BACKENDS,
    Clock,
    Identities,
    cohort,
    consent_facts,
    fresh_database,
    organization,
    patient_facts,
    practitioner,
    practitioner_key,
    recruiter_role,
    trial,
)

KEY = b"k" * 32
GP1, GP2 = practitioner_key("gp1"), practitioner_key("gp2")
NURSE, NAMED = practitioner_key("nurse"), practitioner_key("named")
PEOPLE = {
    "p1": {
        "given": "Ada",
        "family": "Lovelace",
        "nhs_number": "9434765919",
        "birth_date": "1960-01-01",
        "phone": "07700900001",
    },
    "p2": {"given": "Alan", "family": "Turing", "nhs_number": "9434765870"},
    "p3": {"given": "Grace", "family": "Hopper", "nhs_number": "9434765889"},
}


@dataclass
class Api:
    client: TestClient
    app: FastAPI
    runtime: Runtime
    identities: Identities

    def token(self, practitioner: str | None, sites: tuple[str, ...] = ()) -> dict[str, str]:
        token = issue(KEY, "clinician", "Test practice", practitioner=practitioner, sites=sites)
        return {"Authorization": f"Bearer {token}"}

    def audit(self) -> list[dict[str, Any]]:
        return [{**r, "detail": json.loads(r["detail"])} for r in self.app.state.audit.records()]


@pytest.fixture(params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    with fresh_database(request.param, tmp_path) as url:
        runtime = build_runtime(RecruitmentSettings(url=url), url=url, channels={}, clock=Clock())
        with runtime.sessions.begin() as session:
            work = runtime.service.unit_of_work(session)
            work.trial("t1", trial(recruiters={"RB1": NAMED}, sites=("RA3", "RB1")))
            for record in (
                practitioner("gp1"),
                practitioner("gp2"),
                practitioner("nurse"),
                practitioner("named"),
                organization("trust-a", "RA3"),
                recruiter_role("role-n", "nurse", "trust-a"),
            ):
                work.reference(record)
            work.facts(patient_facts("p1", gps=[GP1]))
            work.facts(patient_facts("p2", gps=[GP2]))
            work.facts(patient_facts("p3", gps=[GP1], site="RB1"))
            work.facts(patient_facts("p4", gps=[GP1]))
            work.facts(consent_facts("p4"))  # opted out: never shown
            for patient, site in (("p1", "RA3"), ("p2", "RA3"), ("p3", "RB1"), ("p4", "RA3")):
                work.cohort("t1", patient, cohort("t1", patient, 1, site=site))
            work.finish()
        app = FastAPI()
        app.state.token_key = KEY
        app.state.audit = AuditLog(f"sqlite:///{tmp_path / 'audit.sqlite'}")
        install_problem_details(app)
        install_audit(app)
        identities = Identities(people=dict(PEOPLE))
        app.include_router(build_router(runtime.service, identities))
        with TestClient(app) as client:
            yield Api(client, app, runtime, identities)
        runtime.close()


def test_a_gp_sees_their_own_patients_with_identity_and_the_read_is_audited(api: Api) -> None:
    response = api.client.get("/v1/clinician/invitations", headers=api.token(GP1))
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2  # p1 and p3; not p2 (another GP), not p4 (opted out)
    people = {item["patient"]["name"]: item for item in body["items"]}
    assert set(people) == {"Ada Lovelace", "Grace Hopper"}
    ada = people["Ada Lovelace"]["patient"]
    assert ada == {
        "name": "Ada Lovelace",
        "nhs_number": "9434765919",
        "birth_date": "1960-01-01",
        "phone": "07700900001",
    }
    assert sorted(api.identities.reads) == ["p1", "p3"]
    last = api.audit()[-1]
    assert last["action"] == "GET /v1/clinician/invitations" and last["role"] == "clinician"
    assert sorted(last["detail"]["pseudonyms_read"]) == ["p1", "p3"]
    assert api.app.state.audit.verify().ok

    candidates = api.client.get("/v1/clinician/candidates", headers=api.token(GP1)).json()
    assert {c["patient"]["name"] for c in candidates["items"]} == {"Ada Lovelace", "Grace Hopper"}
    assert all(c["status"] == "invited" and c["invitation"] for c in candidates["items"])


def test_other_clinicians_see_nothing_and_read_no_identity(api: Api) -> None:
    stranger = practitioner_key("stranger")
    for path in ("/v1/clinician/invitations", "/v1/clinician/candidates"):
        body = api.client.get(path, headers=api.token(stranger, sites=("RA3",))).json()
        assert body["count"] == 0 and body["items"] == []
    assert api.identities.reads == []
    assert api.audit()[-1]["detail"]["pseudonyms_read"] == []
    # a nurse with a trial-recruiter role at RA3 sees RA3 only when the token carries RA3
    assert (
        api.client.get("/v1/clinician/invitations", headers=api.token(NURSE)).json()["count"] == 0
    )
    at_ra3 = api.client.get("/v1/clinician/invitations", headers=api.token(NURSE, ("RA3",)))
    assert {i["patient"]["name"] for i in at_ra3.json()["items"]} == {"Ada Lovelace", "Alan Turing"}
    # the trial's named recruiter at RB1
    named = api.client.get("/v1/clinician/invitations", headers=api.token(NAMED, ("RB1",)))
    assert {i["patient"]["name"] for i in named.json()["items"]} == {"Grace Hopper"}


def test_roles_and_practitioner_claims_are_required(api: Api) -> None:
    sponsor = issue(KEY, "sponsor", "Acme")
    response = api.client.get(
        "/v1/clinician/invitations", headers={"Authorization": f"Bearer {sponsor}"}
    )
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    no_practitioner = api.client.get("/v1/clinician/invitations", headers=api.token(None))
    assert no_practitioner.status_code == 403
    assert api.client.get("/v1/clinician/invitations").status_code == 401


def _ada_invitation(api: Api) -> dict[str, Any]:
    items = api.client.get("/v1/clinician/invitations", headers=api.token(GP1)).json()["items"]
    return next(i for i in items if i["patient"]["name"] == "Ada Lovelace")


def test_actions_move_the_invitation_and_illegal_ones_answer_409(api: Api) -> None:
    invitation = _ada_invitation(api)
    assert invitation["state"] == "sent_to_clinician"  # no channel configured: app only
    assert invitation["allowed_actions"] == ["approve", "reject", "withdraw"]
    url = f"/v1/clinician/invitations/{invitation['id']}"
    approved = api.client.post(f"{url}/approve", json={"note": "Good fit"}, headers=api.token(GP1))
    assert approved.status_code == 200, approved.text
    assert approved.json()["state"] == "approved"
    assert approved.json()["allowed_actions"] == ["contacted", "withdraw"]
    assert approved.json()["patient"] is None  # actions do not read identity
    audit = api.audit()[-1]
    assert audit["detail"]["transition"] == "sent_to_clinician->approved"
    assert audit["detail"]["pseudonym"] == "p1" and "pseudonyms_read" not in audit["detail"]

    again = api.client.post(f"{url}/approve", headers=api.token(GP1))
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    problem = again.json()
    assert problem["status"] == 409 and problem["title"] == "Conflict"
    assert "from approved" in problem["detail"] and "patient_contacted" in problem["detail"]
    enrolled = api.client.post(f"{url}/enrolled", headers=api.token(GP1))
    assert enrolled.status_code == 409

    stale = api.client.post(
        f"{url}/contacted", json={"version": invitation["version"]}, headers=api.token(GP1)
    )
    assert stale.status_code == 409 and "version" in stale.json()["detail"]
    for action in ("contacted", "interested", "consented", "screen-failed"):
        assert api.client.post(f"{url}/{action}", headers=api.token(GP1)).status_code == 200
    detail = api.client.get(url, headers=api.token(GP1)).json()
    assert detail["state"] == "screen_failed" and detail["allowed_actions"] == []
    assert [e["to_state"] for e in detail["history"]] == [
        "proposed",
        "sent_to_clinician",
        "approved",
        "patient_contacted",
        "interested",
        "consented",
        "screen_failed",
    ]
    assert detail["history"][2]["note"] == "Good fit"
    assert detail["patient"]["name"] == "Ada Lovelace"


def test_someone_elses_invitation_is_not_found(api: Api) -> None:
    invitation = _ada_invitation(api)
    url = f"/v1/clinician/invitations/{invitation['id']}"
    assert api.client.get(url, headers=api.token(GP2)).status_code == 404
    response = api.client.post(f"{url}/reject", headers=api.token(GP2))
    assert response.status_code == 404
    assert api.client.get(url, headers=api.token(GP1)).json()["state"] == "sent_to_clinician"
    assert api.client.get("/v1/clinician/invitations/nope", headers=api.token(GP1)).status_code == (
        404
    )


def test_two_concurrent_approvals_exactly_one_wins(api: Api) -> None:
    invitation = _ada_invitation(api)
    url = f"/v1/clinician/invitations/{invitation['id']}/approve"
    headers = api.token(GP1)
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def approve() -> None:
        with TestClient(api.app) as client:
            barrier.wait()
            statuses.append(client.post(url, headers=headers).status_code)

    threads = [threading.Thread(target=approve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 409, 409, 409]


def test_a_nul_in_what_reaches_the_database_is_a_422_and_is_audited(api: Api) -> None:
    """Seen probing the API's contract on PostgreSQL, which keeps no U+0000 in text: a NUL in a
    query, an invitation id or a note answered 500 from the driver, and one in the path broke
    the audit record too. Each is refused with a 422 naming the parameter, and audited."""
    gp = api.token(GP1)
    invitation = api.client.get("/v1/clinician/invitations", headers=gp).json()["items"][0]
    refused = {
        "GET /v1/clinician/candidates?trial=t%001": ["query", "trial"],
        "GET /v1/clinician/candidates?status=%00": ["query", "status"],
        "GET /v1/clinician/invitations?trial=%00": ["query", "trial"],
        "GET /v1/clinician/invitations/x%00y": ["path", "invitation_id"],
        "POST /v1/clinician/invitations/x%00y/approve": ["path", "invitation_id"],
        f"POST /v1/clinician/invitations/{invitation['id']}/approve": ["body", "note"],
    }
    for request, loc in refused.items():
        method, url = request.split(" ")
        response = api.client.request(
            method, url, headers=gp, json={"note": "a\u0000b"} if method == "POST" else None
        )
        assert response.status_code == 422, (request, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"][0]["loc"] == loc, request
    actions = [r["action"] for r in api.audit()]
    assert "GET /v1/clinician/invitations/x%00y" in actions  # the NUL kept escaped
    assert api.app.state.audit.verify().ok
    still = api.client.get(f"/v1/clinician/invitations/{invitation['id']}", headers=gp).json()
    assert still["state"] == invitation["state"]  # nothing was done


@pytest.mark.parametrize("path", ["/v1/clinician/invitations", "/v1/clinician/candidates"])
def test_pages_by_cursor_cover_the_list_once_each_and_audit_every_page(api: Api, path: str) -> None:
    whole = api.client.get(path, headers=api.token(GP1)).json()
    assert whole["next"] is None and len(whole["items"]) == whole["count"] == 2
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 1} | ({"after": after} if after else {})
        body = api.client.get(path, headers=api.token(GP1), params=params).json()
        assert body["count"] == 2 and body["limit"] == 1
        seen.extend(item["id"] for item in body["items"])
        pages += 1
        after = body["next"]
        if after is None:
            break
    assert seen == [item["id"] for item in whole["items"]]  # same order, nothing twice
    assert pages == 2
    reads = [r for r in api.audit() if r["action"] == f"GET {path}"]
    assert [len(r["detail"]["pseudonyms_read"]) for r in reads[-2:]] == [1, 1]
    assert api.app.state.audit.verify().ok


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/v1/clinician/invitations", "bm90LWpzb24"),  # base64 of "not-json"
        ("/v1/clinician/invitations", "WzEsIngiXQ"),  # [1, "x"]: a candidates cursor
        ("/v1/clinician/candidates", "WyJ4IiwieCJd"),  # ["x", "x"]
        ("/v1/clinician/candidates", "WzEsMiwzXQ"),  # [1, 2, 3]
        ("/v1/clinician/candidates", "!!"),  # not base64url at all
    ],
)
def test_a_cursor_this_api_did_not_hand_out_is_a_422_naming_after(
    api: Api, path: str, cursor: str
) -> None:
    response = api.client.get(path, headers=api.token(GP1), params={"after": cursor})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [e["loc"] for e in response.json()["detail"]] == [["query", "after"]]
    assert api.identities.reads == []
