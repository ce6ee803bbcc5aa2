"""Who may call what: every route of the app against every kind of caller, from one table.

A plain unit test, not an integration one: the whole app runs in process over real SQLite stores
and a real feasibility snapshot (``tests/api_world.py``), so no broker is needed and the matrix
runs on every ``check``.

``MATRIX`` classifies every (method, route) of :func:`concierge.api.create_app`; the test fails
when the app has a route the table does not classify, or the table names a route the app does
not have, so a new endpoint cannot ship unclassified. Each (route, caller) is then called with
real ids and a valid body and must answer in its class; no response to anyone but the patient's
own clinician may carry the patient's identifiable values; the patient's own clinician must see
them where identity is resolved, and each such read must leave an audit record naming the
patient's pseudonym. Invariant 6 of the design: identity stays home.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from tests.api_world import (
    CRITERIA,
    GP_A,
    GP_B,
    IDENTITY,
    RETIRE,
    SERVED_IDENTITY,
    SITE_A,
    SITE_B,
    SPONSOR_ORG,
    TRIAL,
    World,
    build_world,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"


class Outcome(Enum):
    """Status classes. ``ALLOWED``: authorisation passed (2xx, or 404/409/422 about the
    request itself); ``OK``: 2xx; ``HIDDEN``: 404, the caller may not know the thing exists."""

    OK = "2xx"
    ALLOWED = "2xx/404/409/422"
    HIDDEN = "404"
    FORBIDDEN = "403"
    UNAUTHENTICATED = "401"

    def admits(self, status: int) -> bool:
        if self is Outcome.OK:
            return 200 <= status < 300
        if self is Outcome.ALLOWED:
            return 200 <= status < 300 or status in (404, 409, 422)
        return status == {"404": 404, "403": 403, "401": 401}[self.value]


OK, ALLOWED, HIDDEN = Outcome.OK, Outcome.ALLOWED, Outcome.HIDDEN
FORBIDDEN, UNAUTHENTICATED = Outcome.FORBIDDEN, Outcome.UNAUTHENTICATED

#: The callers. ``own_clinician`` is the patient's GP at site A; ``other_clinician`` works at
#: site B and is nobody's clinician here.
CALLERS = (
    "anonymous",
    "sponsor",
    "own_clinician",
    "other_clinician",
    "regulator",
    "source",
    "admin",
)


@dataclass(frozen=True)
class Rule:
    expect: Mapping[str, Outcome]
    #: JSON body (POST/PUT): valid, so an allowed caller gets past validation too.
    body: Any = None
    #: Path parameters, beyond the defaults in ``PARAMS``.
    params: Mapping[str, str] = field(default_factory=dict)
    #: The route resolves the patient's identity for their own clinician.
    identity: bool = False


def only(*allowed: str, identity: bool = False, body: Any = None, **special: Outcome) -> Rule:
    """Anonymous callers 401, the ``allowed`` callers ALLOWED, everyone else 403;
    ``special`` overrides single callers."""
    expect = {c: ALLOWED if c in allowed else FORBIDDEN for c in CALLERS}
    expect["anonymous"] = UNAUTHENTICATED
    expect.update(special)
    return Rule(expect, body=body, identity=identity)


def public() -> Rule:
    return Rule(dict.fromkeys(CALLERS, OK))


def _with(rule: Rule, **changes: Any) -> Rule:
    return Rule(**{**rule.__dict__, **changes})


ACTION = {"note": "checked by the authorisation matrix"}
TRIAL_BODY = {
    "id": "matrix-new",
    "title": "Registered by the matrix",
    "criteria": CRITERIA,
    "recruiting_sites": [SITE_A],
}
PRACTITIONER = {"resourceType": "Practitioner", "id": "matrix-pr", "name": [{"family": "Matrix"}]}
BUNDLE = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [{"resource": {**PRACTITIONER, "id": "matrix-pr-2"}}],
}


def fhir(body: Any = None) -> Rule:
    """FHIR ingest: only source systems write."""
    return only("source", body=body)


# The clinician's own patient's invitation: own clinician ALLOWED (2xx, or 409 once the
# invitation has moved on), another site's clinician HIDDEN (404 as if it did not exist).
def invitation_action() -> Rule:
    return only("own_clinician", "other_clinician", body=ACTION, other_clinician=HIDDEN)


#: Every (method, route) of the app, and the outcome per caller.
MATRIX: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): public(),
    ("GET", "/readyz"): public(),
    # the clinician page (recruitment/page.py): static, no patient data; its script calls the API
    ("GET", "/clinician"): public(),
    # -- FHIR ingest (role source)
    ("POST", "/fhir"): fhir(BUNDLE),
    ("POST", "/fhir/{resource_type}"): fhir(PRACTITIONER),
    ("PUT", "/fhir/{resource_type}/{resource_id}"): fhir(PRACTITIONER),
    ("DELETE", "/fhir/{resource_type}/{resource_id}"): fhir(),
    # -- sponsors (aggregates only)
    ("POST", "/v1/feasibility/ask"): only("sponsor", body=CRITERIA),
    ("POST", "/v1/feasibility/ask-group"): only(
        "sponsor", body=json.loads((EXAMPLES / "fhir" / "t2dm-group.json").read_text())
    ),
    ("POST", "/v1/feasibility/check"): only("sponsor", body=CRITERIA),
    ("GET", "/v1/feasibility/criteria-schema"): only("sponsor"),
    ("GET", "/v1/feasibility/budget"): only("sponsor"),
    ("GET", "/v1/feasibility/status"): only("sponsor"),
    ("POST", "/v1/feasibility/saved-questions"): only("sponsor", body=TRIAL_BODY),
    ("GET", "/v1/feasibility/saved-questions"): only("sponsor"),
    ("GET", "/v1/feasibility/saved-questions/{trial_id}"): only("sponsor"),
    ("DELETE", "/v1/feasibility/saved-questions/{trial_id}"): _with(
        only("sponsor"), params={"trial_id": RETIRE}
    ),
    ("GET", "/v1/feasibility/saved-questions/{trial_id}/answer"): only("sponsor"),
    ("POST", "/v1/feasibility/import/atlas"): only(
        "sponsor", body=json.loads((EXAMPLES / "atlas" / "t2dm-metformin.json").read_text())
    ),
    # -- sponsors: terminology (reference data, no patient data)
    ("GET", "/v1/terminology/search"): only("sponsor"),
    ("GET", "/v1/terminology/status"): only("sponsor"),
    ("GET", "/v1/terminology/{system}/{code}"): _with(
        only("sponsor"), params={"system": "snomed", "code": "73211009"}
    ),
    # -- site admins
    ("GET", "/v1/admin/saved-questions/{trial_id}/live"): only("admin"),
    ("POST", "/v1/admin/budgets/{org}/unlock"): only("admin"),
    # -- clinicians (their own patients only)
    ("GET", "/v1/clinician/candidates"): only("own_clinician", "other_clinician", identity=True),
    ("GET", "/v1/clinician/invitations"): only("own_clinician", "other_clinician", identity=True),
    ("GET", "/v1/clinician/invitations/{invitation_id}"): only(
        "own_clinician", "other_clinician", identity=True, other_clinician=HIDDEN
    ),
    ("POST", "/v1/clinician/invitations/{invitation_id}/approve"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/reject"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/contacted"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/interested"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/declined"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/no-response"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/consented"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/enrolled"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/screen-failed"): invitation_action(),
    ("POST", "/v1/clinician/invitations/{invitation_id}/withdraw"): invitation_action(),
    # regulators: device-safety surveillance
    ("GET", "/v1/surveillance/status"): only("regulator"),
    ("GET", "/v1/surveillance/signals"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}/history"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}/breakdown"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}/provenance"): only("regulator"),
    ("POST", "/v1/surveillance/signals/{signal_id}/actions"): only(
        "regulator", body={"action": "review", "reason": "checked by the authorisation matrix"}
    ),
}


#: The documentation routes (FastAPI's, served offline by concierge.docs_offline, with their
#: static files): not part of the product's API surface.
DOCS_ROUTES = frozenset(
    {
        "openapi",
        "swagger_ui_html",
        "swagger_ui_redirect",
        "redoc_html",
        "redoc_offline_js",
        "docs-static",
    }
)


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every APIRoute of the app; anything else that is not one of
    the documentation routes is reported as unclassifiable."""
    try:  # FastAPI >= 0.16x keeps included routers lazily; this walks them
        from fastapi.routing import iter_route_contexts

        routes = [ctx.original_route for ctx in iter_route_contexts(app.routes)]
    except ImportError:  # pragma: no cover - older FastAPI: the routes are flat already
        routes = list(app.routes)
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, APIRoute):
            for method in route.methods or ():
                found.add((method, route.path))
            continue
        name = getattr(route, "name", None)
        if name not in DOCS_ROUTES:
            found.add(("?", f"{type(route).__name__} {getattr(route, 'path', name)}"))
    return found


# --------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with build_world(tmp_path_factory.mktemp("authz")) as built:
        yield built


def caller_headers(world: World, caller: str) -> dict[str, str]:
    if caller == "anonymous":
        return {}
    if caller == "own_clinician":
        return world.headers("clinician", "Practice A", practitioner=GP_A, sites=(SITE_A,))
    if caller == "other_clinician":
        return world.headers("clinician", "Practice B", practitioner=GP_B, sites=(SITE_B,))
    org = {"sponsor": SPONSOR_ORG, "regulator": "MHRA", "source": "EHR A", "admin": "Site A"}
    return world.headers(caller, org[caller])  # type: ignore[arg-type]


def fill(world: World, template: str, rule: Rule) -> str:
    params = {
        "trial_id": TRIAL,
        "invitation_id": world.invitation or "",
        "org": SPONSOR_ORG,
        "resource_type": "Practitioner",
        "resource_id": "matrix-pr",
        "signal_id": "matrix-signal",
        **rule.params,
    }
    return template.format(**params)


def forbidden_values(world: World) -> dict[str, str]:
    """What identifies the patient, and the patient's pseudonym (never served to anyone)."""
    return {**IDENTITY, "pseudonym": world.pseudonym}


# --------------------------------------------------------------------------- the tests


def test_every_route_is_classified_and_every_entry_is_a_route(world: World) -> None:
    routes = app_routes(world.app)
    table = MATRIX
    unclassified = sorted(routes - set(table))
    stale = sorted(set(table) - routes)
    assert not unclassified, f"routes missing from the authorisation matrix: {unclassified}"
    assert not stale, f"matrix entries that are not routes of the app: {stale}"
    for key, rule in table.items():
        assert set(rule.expect) == set(CALLERS), f"{key}: every caller needs an outcome"
        assert rule.expect["anonymous"] in (UNAUTHENTICATED, OK), key


def _cases() -> Iterator[Any]:
    for method, template in MATRIX:
        for caller in CALLERS:
            yield pytest.param(method, template, caller, id=f"{method} {template} {caller}")


@pytest.mark.parametrize(("method", "template", "caller"), list(_cases()))
def test_route_answers_each_caller_as_the_matrix_says(
    world: World, method: str, template: str, caller: str
) -> None:
    rule = MATRIX[(method, template)]
    expected = rule.expect[caller]
    path = fill(world, template, rule)
    before = len(world.audit())
    response = world.client.request(
        method,
        path,
        headers=caller_headers(world, caller),
        json=rule.body if method in ("POST", "PUT") else None,
    )
    where = f"{method} {template} as {caller}"
    assert expected.admits(response.status_code), (
        f"{where}: expected {expected.value}, got {response.status_code}: {response.text[:300]}"
    )

    # (b) identity stays home: nobody but the patient's own clinician sees identifiable values,
    # and nobody is served the pseudonym.
    text = response.text
    values = forbidden_values(world)
    shown_to = (
        {"pseudonym"} if caller == "own_clinician" else set(values)
    )  # own clinician: identity is theirs to see; the pseudonym still never leaves
    leaked = sorted(k for k in shown_to if values[k] in text)
    assert not leaked, f"{where}: response carries {leaked}"

    # Every /v1 request is audited, whoever asked and whatever the answer.
    records = world.audit()[before:]
    if path.startswith("/v1"):
        assert records, f"{where}: no audit record"
        record = records[-1]
        assert record["action"] == f"{method} {path}", where
        assert record["role"] == ("anonymous" if caller == "anonymous" else caller.split("_")[-1])
        assert record["detail"]["status"] == response.status_code, where
    read = [p for r in records for p in r["detail"].get("pseudonyms_read", [])]

    # (c) the patient's own clinician does see the identity where it is resolved, and that read
    # is audited with the patient's pseudonym; nobody else's request reads it.
    if rule.identity and caller == "own_clinician":
        assert response.status_code == 200, where
        missing = [k for k in SERVED_IDENTITY if IDENTITY[k] not in text]
        assert not missing, f"{where}: the patient's own clinician does not see {missing}"
        assert world.pseudonym in read, f"{where}: identity read without an audit record"
    else:
        assert world.pseudonym not in read, f"{where}: identity read for {caller}"
    assert world.app.state.audit.verify().ok


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with build_world(tmp_path_factory.mktemp("authz-bare"), services=False) as built:
        yield built


def test_authorisation_comes_before_availability(bare: World) -> None:
    """With the services not running (an API still starting), callers who may not use a route
    are still told 401/403, never 503: a refusal must not depend on, or reveal, what runs."""
    wrong: list[str] = []
    for (method, template), rule in MATRIX.items():
        if not template.startswith("/v1"):
            continue
        for caller, expected in rule.expect.items():
            if expected not in (FORBIDDEN, UNAUTHENTICATED):
                continue
            response = bare.client.request(
                method,
                fill(bare, template, _with(rule, params={**rule.params, "invitation_id": "x"})),
                headers=caller_headers(bare, caller),
                json=rule.body if method in ("POST", "PUT") else None,
            )
            if not expected.admits(response.status_code):
                wrong.append(f"{method} {template} as {caller}: {response.status_code}")
    assert not wrong, "\n".join(wrong)
