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

The stream worker's status pages (Faust's web server, not the API) get the same treatment from
their own table, ``WORKER_PAGES``, over the real pages served in process
(``tests/stream_pages.py``); the signal monitor's status is checked for exact counts; and the
query budget's cases for saved questions (registration, new versions, saved answers, a spent
budget, a lockout) close the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from core.audit import AuditLog
from core.auth import Role, SigningKeys, TokenVerifier, issue
from core.revocation import RevocationList
from core.settings import Settings
from feasibility.disclosure.budget import QueryBudget
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import MemorySink
from tests.api_world import (
    CONDITION,
    CRITERIA,
    GP_A,
    GP_B,
    IDENTITY,
    PATIENT,
    RETIRE,
    SERVED_IDENTITY,
    SITE_A,
    SITE_B,
    SPONSOR_ORG,
    TRIAL,
    World,
    build_world,
    settings_for,
)
from tests.jwks_server import ISSUER, ProviderKey, provider_claims, serve_jwks
from tests.recruitment_helpers import SOURCE
from tests.stream_pages import Pages, serve_pages

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"


class Outcome(Enum):
    """Status classes. ``ALLOWED``: authorisation passed (2xx, or 404/409/422 about the
    request itself); ``OK``: 2xx; ``HIDDEN``: 404, the caller may not know the thing exists."""

    OK = "2xx"
    ALLOWED = "2xx/404/409/422"
    #: a readiness probe: 200 ready, 503 not ready (with Retry-After), whoever asks
    PROBE = "200/503"
    HIDDEN = "404"
    FORBIDDEN = "403"
    UNAUTHENTICATED = "401"

    def admits(self, status: int) -> bool:
        if self is Outcome.OK:
            return 200 <= status < 300
        if self is Outcome.ALLOWED:
            return 200 <= status < 300 or status in (404, 409, 422)
        if self is Outcome.PROBE:
            return status in (200, 503)
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
    "data_manager",
    "statistician",
    "safety_contact",
)
#: The trial team's callers and their roles (each token names the matrix trial).
TRIAL_TEAM: dict[str, Role] = {
    "data_manager": "trial_data_manager",
    "statistician": "statistician",
    "safety_contact": "safety_contact",
}


def role_of(caller: str) -> str:
    """The role an audit record names for ``caller``."""
    if caller == "anonymous":
        return "anonymous"
    return TRIAL_TEAM.get(caller, caller.split("_")[-1])


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


FOLLOWUP_PLAN = {
    "scope": ["condition", "adverse_event"],
    "outcomes": [{"name": "SAE", "kind": "serious_adverse_event"}],
    "safety_contact": {"channel": "email", "address": "safety@matrix.example"},
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
    # Prometheus metrics: labels are route templates, topics, partitions (concierge/metrics.py)
    ("GET", "/metrics"): public(),
    # the clinician page (concierge/routes/clinician_page.py): static, no patient data; its
    # script calls the API
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
    # -- sponsors: the workspace (concierge/routes/workspace.py)
    ("POST", "/v1/feasibility/profile"): only("sponsor", body=CRITERIA),
    ("POST", "/v1/feasibility/impact"): only("sponsor", body=CRITERIA),
    ("GET", "/v1/feasibility/saved-questions/{trial_id}/profile"): only("sponsor"),
    ("GET", "/v1/feasibility/saved-questions/{trial_id}/impact"): only("sponsor"),
    ("GET", "/v1/feasibility/saved-questions/{trial_id}/sites"): only("sponsor"),
    ("GET", "/v1/feasibility/saved-questions/{trial_id}/forecast"): only("sponsor"),
    ("GET", "/v1/feasibility/history"): only("sponsor"),
    # another organisation's answer (or none) is 404 alike
    ("GET", "/v1/feasibility/history/{answer_id}"): _with(
        only("sponsor"), params={"answer_id": "1"}
    ),
    ("GET", "/v1/feasibility/history/{answer_id}/export.csv"): _with(
        only("sponsor"), params={"answer_id": "1"}
    ),
    ("GET", "/v1/feasibility/history/{answer_id}/report.html"): _with(
        only("sponsor"), params={"answer_id": "1"}
    ),
    ("GET", "/v1/feasibility/history/{answer_id}/report.pdf"): _with(
        only("sponsor"), params={"answer_id": "1"}
    ),
    # the sponsor page: static, no data; its script calls the API with the sponsor's token
    ("GET", "/sponsor"): public(),
    # -- sponsors: terminology (reference data, no patient data)
    ("GET", "/v1/terminology/search"): only("sponsor"),
    ("GET", "/v1/terminology/status"): only("sponsor"),
    ("GET", "/v1/terminology/{system}/{code}"): _with(
        only("sponsor"), params={"system": "snomed", "code": "73211009"}
    ),
    # -- a federation hub's signed questions: this app is no node, so nobody reaches them (a
    # node refuses every site token with 403: tests/integration/test_federation.py)
    ("POST", "/v1/federation/ask"): only(body=CRITERIA, **dict.fromkeys(CALLERS[1:], HIDDEN)),
    ("POST", "/v1/federation/exact"): only(body=CRITERIA, **dict.fromkeys(CALLERS[1:], HIDDEN)),
    ("POST", "/v1/federation/saved-questions"): only(
        body={"id": "fed-trial", "title": "T", "criteria": CRITERIA},
        **dict.fromkeys(CALLERS[1:], HIDDEN),
    ),
    ("POST", "/v1/federation/saved-questions/{trial_id}/answer"): only(
        body={"trial": TRIAL}, **dict.fromkeys(CALLERS[1:], HIDDEN)
    ),
    ("POST", "/v1/federation/saved-questions/{trial_id}/retire"): only(
        body={"trial": TRIAL}, **dict.fromkeys(CALLERS[1:], HIDDEN)
    ),
    ("POST", "/v1/federation/saved-questions/{trial_id}/sites"): only(
        body={"trial": TRIAL}, **dict.fromkeys(CALLERS[1:], HIDDEN)
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
    # -- the trial team: follow-up of enrolled participants (concierge/routes/followup.py); a
    # token serves only the trials it names (another trial is 404)
    ("PUT", "/v1/followup/trials/{trial_id}/plan"): only("data_manager", body=FOLLOWUP_PLAN),
    ("GET", "/v1/followup/trials/{trial_id}/plan"): only(
        "data_manager", "statistician", "safety_contact"
    ),
    # the matrix invitation is not enrolled: 404 for the data manager
    ("PUT", "/v1/followup/enrolments/{invitation_id}/arm"): only("data_manager", body={"arm": "A"}),
    ("GET", "/v1/followup/trials/{trial_id}/feed"): only("data_manager"),
    ("POST", "/v1/followup/trials/{trial_id}/$export"): only("data_manager"),
    ("GET", "/v1/followup/exports/{job_id}"): only("data_manager"),
    ("GET", "/v1/followup/exports/{job_id}/{name}"): only("data_manager"),
    ("GET", "/v1/followup/trials/{trial_id}/safety-events"): only("safety_contact"),
    ("GET", "/v1/followup/trials/{trial_id}/endpoints"): only("statistician"),
    # regulators: device-safety surveillance
    # the monitor's status: its patient count is exact for admins only (see below)
    ("GET", "/v1/surveillance/status"): only("regulator", "admin"),
    ("GET", "/v1/surveillance/signals"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}/history"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}/breakdown"): only("regulator"),
    ("GET", "/v1/surveillance/signals/{signal_id}/provenance"): only("regulator"),
    ("POST", "/v1/surveillance/signals/{signal_id}/actions"): only(
        "regulator", body={"action": "review", "reason": "checked by the authorisation matrix"}
    ),
    ("GET", "/v1/surveillance/signals/{signal_id}/report"): only("regulator"),
    ("GET", "/v1/surveillance/scan"): only("regulator"),
    ("POST", "/v1/surveillance/scan"): only("regulator", body={"seed": 1}),
    ("POST", "/v1/surveillance/subscriptions"): only(
        "regulator", body={"channel": "webhook", "address": "https://regulator.example/hook"}
    ),
    ("GET", "/v1/surveillance/subscriptions"): only("regulator"),
    ("DELETE", "/v1/surveillance/subscriptions/{subscription_id}"): _with(
        only("regulator"), params={"subscription_id": "matrix-subscription"}
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
    if caller in TRIAL_TEAM:
        return world.headers(TRIAL_TEAM[caller], "Matrix Trials", trials=(TRIAL,))
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
        "job_id": "0" * 32,
        "name": "feed-0001.ndjson",
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
        assert record["role"] == role_of(caller)
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


# --------------------------------------------------------------------------- worker pages


def admin_only() -> dict[str, Outcome]:
    expect = dict.fromkeys(CALLERS, FORBIDDEN)
    expect.update(anonymous=UNAUTHENTICATED, admin=OK)
    return expect


#: Every page of the stream worker's web port and the outcome per caller: the probes are open
#: (``/readyz`` answers 503 here: no broker), every state page is for site admins only.
WORKER_PAGES: dict[str, dict[str, Outcome]] = {
    "/health": dict.fromkeys(CALLERS, OK),
    "/healthz": dict.fromkeys(CALLERS, OK),
    "/readyz": dict.fromkeys(CALLERS, Outcome.PROBE),
    "/metrics": dict.fromkeys(CALLERS, OK),
    "/state/digest": admin_only(),
    "/state/patients/{patient}": admin_only(),
    "/state/cohorts": admin_only(),
    "/state/devices": admin_only(),
}
#: Keys no open page may carry: counts of patients or of a cohort's members.
PATIENT_COUNT_KEYS = {"patients", "members", "exposed_patients", "resources", "entries"}


@dataclass
class WorkerWorld:
    pages: Pages
    pseudonym: str
    audit: AuditLog


@pytest.fixture(scope="module")
def worker_world(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerWorld]:
    """The worker's pages holding the matrix patient's facts, with the API's token key."""
    home = tmp_path_factory.mktemp("worker-pages") / "home"
    settings = settings_for(home)
    assert settings.token_key == world.settings.token_key
    sink = MemorySink()
    ingestor = build_ingestor(settings, sink=sink)
    for resource in (PATIENT, CONDITION):
        assert ingestor.ingest_resource(resource, "test").status == "accepted"
    ingestor.commit()
    ingestor.vault.close()
    pseudonym = sink.published_facts[0].patient
    with serve_pages(settings, sink.published_facts) as pages:
        yield WorkerWorld(pages, pseudonym, AuditLog(settings.resolved_audit_url()))


def worker_records(audit: AuditLog) -> list[dict[str, Any]]:
    return [{**r, "detail": json.loads(r["detail"])} for r in audit.records()]


def keys_of(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


def test_every_worker_page_is_classified(worker_world: WorkerWorld) -> None:
    """A page the worker serves that the table does not classify fails (Faust's own /table and
    /router pages are off: they would serve table values and the cluster's addresses)."""
    assert worker_world.pages.paths() == set(WORKER_PAGES)
    for path in ("/table/cohort/x/", "/router/", "/stats/"):
        response = httpx.get(f"{worker_world.pages.url}{path}", timeout=10)
        assert response.status_code == 404, path


def _worker_cases() -> Iterator[Any]:
    for template in WORKER_PAGES:
        for caller in CALLERS:
            yield pytest.param(template, caller, id=f"worker {template} {caller}")


@pytest.mark.parametrize(("template", "caller"), list(_worker_cases()))
def test_worker_page_answers_each_caller_as_the_table_says(
    world: World, worker_world: WorkerWorld, template: str, caller: str
) -> None:
    expected = WORKER_PAGES[template][caller]
    path = template.format(patient=worker_world.pseudonym)
    before = len(worker_records(worker_world.audit))
    response = httpx.get(
        f"{worker_world.pages.url}{path}", headers=caller_headers(world, caller), timeout=10
    )
    where = f"GET {template} as {caller}"
    if template == "/readyz":  # no broker here: not ready, and says so
        assert response.status_code == 503 and response.headers["Retry-After"], where
    assert expected.admits(response.status_code), (
        f"{where}: expected {expected.value}, got {response.status_code}: {response.text[:300]}"
    )
    text = response.text
    served = caller == "admin" and template == "/state/patients/{patient}"
    if served:
        # the admin reads the patient's pseudonymised facts (birth date among them): audited
        assert response.json()["resources"], where
        assert IDENTITY["birth_date"] in text
    else:
        assert worker_world.pseudonym not in text, f"{where}: the pseudonym was served"
        assert IDENTITY["birth_date"] not in text, f"{where}: a birth date was served"
    if response.status_code in (401, 403):
        assert response.headers["content-type"].startswith("application/problem+json"), where
        assert set(response.json()) == {"type", "title", "status", "detail"}, where
    if response.status_code == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    if template in ("/health", "/readyz"):
        # liveness and readiness only: no count of patients, no pseudonym
        assert not keys_of(response.json()) & PATIENT_COUNT_KEYS, f"{where}: {text[:300]}"

    records = worker_records(worker_world.audit)[before:]
    if template.startswith("/state/"):
        assert len(records) == 1, f"{where}: {len(records)} audit records"
        record = records[0]
        assert record["action"] == f"GET {path}"
        assert record["role"] == role_of(caller)
        assert record["detail"]["status"] == response.status_code
        assert record["detail"]["service"] == "worker"
        read = record["detail"].get("pseudonyms_read", [])
        assert read == ([worker_world.pseudonym] if served else []), where
    else:
        assert not records, f"{where}: probes are not audited"
    assert worker_world.audit.verify().ok


def test_a_worker_state_page_is_not_served_when_its_read_cannot_be_audited(
    world: World, tmp_path: Path
) -> None:
    """No unaudited read: an audit log that cannot be written makes the page answer 503."""
    settings = settings_for(tmp_path / "home")
    with serve_pages(settings) as pages:
        pages.stream.access.audit_url = f"sqlite:///{tmp_path / 'missing' / 'audit.sqlite'}"
        response = httpx.get(
            f"{pages.url}/state/digest", headers=caller_headers(world, "admin"), timeout=30
        )
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert "entries" not in response.text


# ----------------------------------------------------------------- the signal monitor's status


def test_the_monitor_status_counts_patients_exactly_for_admins_only(world: World) -> None:
    monitor = world.app.state.surveillance
    saved = dict(monitor.contributions)
    monitor.contributions.update({f"p-{i}": object() for i in range(3)})
    try:
        shown = {
            caller: world.client.get(
                "/v1/surveillance/status", headers=caller_headers(world, caller)
            ).json()["patients"]
            for caller in ("regulator", "admin")
        }
    finally:
        monitor.contributions.clear()
        monitor.contributions.update(saved)
    assert shown == {"regulator": "<10", "admin": 3}


# ------------------------------------------------------------------ saved questions and budget


@pytest.fixture
def budgeted(tmp_path: Path) -> Iterator[World]:
    """A world of its own whose budget shares the publication registry's database (as the
    API's do: one URL), so overlap control's fires count towards the lockout."""
    with build_world(tmp_path) as built:
        service = built.app.state.feasibility
        service.budget = QueryBudget(service.registry.engine, max_queries=200, lockout_after=0)
        yield built


def used(world: World) -> int:
    response = world.client.get("/v1/feasibility/budget", headers=sponsor_of(world))
    assert response.status_code == 200, response.text
    count: int = response.json()["used"]
    return count


def sponsor_of(world: World) -> dict[str, str]:
    return caller_headers(world, "sponsor")


def last_budget(world: World) -> Any:
    return world.audit()[-1]["detail"].get("budget")


#: Every sponsor route that gives something new: each is charged, each refused when spent or
#: locked out. (method, path, body)
CHARGED: list[tuple[str, str, Any]] = [
    ("POST", "/v1/feasibility/ask", CRITERIA),
    (
        "POST",
        "/v1/feasibility/ask-group",
        json.loads((EXAMPLES / "fhir" / "t2dm-group.json").read_text()),
    ),
    ("POST", "/v1/feasibility/saved-questions", TRIAL_BODY),
    (  # a new version of an existing saved question
        "POST",
        "/v1/feasibility/saved-questions",
        {"id": TRIAL, "title": "Matrix trial, changed", "criteria": CRITERIA},
    ),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}/answer", None),
    ("POST", "/v1/feasibility/profile", CRITERIA),
    ("POST", "/v1/feasibility/impact", CRITERIA),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}/profile", None),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}/impact", None),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}/sites", None),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}/forecast", None),
]
#: Sponsor routes that answer no count: free, and open to a locked-out organisation.
FREE: list[tuple[str, str]] = [
    ("GET", "/v1/feasibility/budget"),
    ("GET", "/v1/feasibility/saved-questions"),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}"),
    ("GET", "/v1/feasibility/status"),
    ("GET", "/v1/feasibility/history"),
    ("DELETE", f"/v1/feasibility/saved-questions/{RETIRE}"),
]


def test_registering_and_reading_saved_questions_are_charged_and_audited(
    budgeted: World,
) -> None:
    client, sponsor = budgeted.client, sponsor_of(budgeted)
    assert used(budgeted) == 0
    created = client.post("/v1/feasibility/saved-questions", json=TRIAL_BODY, headers=sponsor)
    assert created.status_code == 201, created.text
    assert used(budgeted) == 1
    record = next(r for r in reversed(budgeted.audit()) if r["action"].startswith("POST"))
    assert record["detail"]["budget"] == {"charged": True, "used": 1}
    assert (record["detail"]["trial"], record["detail"]["version"]) == ("matrix-new", 1)

    again = client.post("/v1/feasibility/saved-questions", json=TRIAL_BODY, headers=sponsor)
    assert again.status_code == 201 and again.json()["version"] == 2
    assert used(budgeted) == 2  # a new version is a new question

    answer_path = f"/v1/feasibility/saved-questions/{TRIAL}/answer"
    first = client.get(answer_path, headers=sponsor)
    assert first.status_code == 200, first.text
    assert last_budget(budgeted) == {"charged": True, "used": 3}
    assert used(budgeted) == 3
    # the same answer again: a republication, free, and no overlap hit
    for _ in range(3):
        repeat = client.get(answer_path, headers=sponsor)
        assert repeat.status_code == 200
        assert {k: repeat.json()[k] for k in ("total", "funnel")} == {
            k: first.json()[k] for k in ("total", "funnel")
        }
        record = budgeted.audit()[-1]
        assert record["detail"]["republished"] is True
        assert record["detail"]["budget"] == {"charged": False, "used": 3}
        assert record["detail"]["overlap_hits"] == 0
    assert used(budgeted) == 3
    assert budgeted.app.state.feasibility.budget.overlap_fires(SPONSOR_ORG) == 0


def test_a_spent_budget_refuses_every_charged_route(budgeted: World) -> None:
    service = budgeted.app.state.feasibility
    service.budget = QueryBudget(service.registry.engine, max_queries=1, lockout_after=0)
    sponsor = sponsor_of(budgeted)
    first = budgeted.client.post("/v1/feasibility/ask", json=CRITERIA, headers=sponsor)
    assert first.status_code == 200, first.text
    for method, path, body in CHARGED:
        response = budgeted.client.request(method, path, json=body, headers=sponsor)
        assert response.status_code == 429, f"{method} {path}: {response.text}"
        assert int(response.headers["Retry-After"]) > 0
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "query budget exceeded" in response.json()["detail"]
        assert last_budget(budgeted) == "exceeded"
    assert used(budgeted) == 1
    assert service.saved.get(TRIAL).version == 1  # no new version was registered
    for method, path in FREE:
        response = budgeted.client.request(method, path, headers=sponsor)
        assert response.status_code == 200, f"{method} {path}: {response.text}"


def test_a_locked_out_organisation_is_refused_every_charged_route(budgeted: World) -> None:
    service = budgeted.app.state.feasibility
    sponsor = sponsor_of(budgeted)
    assert budgeted.client.get(
        f"/v1/feasibility/saved-questions/{TRIAL}/answer", headers=sponsor
    ).is_success
    # overlap control fired in one answer of this organisation; lockout_after is 0
    service.registry.record([], SPONSOR_ORG, "differencing", overlap_hits=3)
    for method, path, body in CHARGED:
        response = budgeted.client.request(method, path, json=body, headers=sponsor)
        assert response.status_code == 429, f"{method} {path}: {response.text}"
        assert int(response.headers["Retry-After"]) > 0
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "suspended" in response.json()["detail"]
        assert last_budget(budgeted) == "locked"
    assert service.saved.get(TRIAL).version == 1
    assert "matrix-new" not in service.saved.trials  # nor a new saved question
    status = budgeted.client.get("/v1/feasibility/budget", headers=sponsor).json()
    assert status["locked"] is True and status["used"] == 1
    for method, path in FREE:
        response = budgeted.client.request(method, path, headers=sponsor)
        assert response.status_code == 200, f"{method} {path}: {response.text}"
    # another organisation is not affected; an administrator lifts the lockout
    rival = budgeted.headers("sponsor", "Rival Bio")
    assert budgeted.client.post("/v1/feasibility/ask", json=CRITERIA, headers=rival).is_success
    unlocked = budgeted.client.post(
        f"/v1/admin/budgets/{SPONSOR_ORG}/unlock", headers=caller_headers(budgeted, "admin")
    )
    assert unlocked.status_code == 200 and unlocked.json()["locked"] is False
    assert budgeted.client.get(
        f"/v1/feasibility/saved-questions/{TRIAL}/answer", headers=sponsor
    ).is_success


# --------------------------------------------------------------------------- tokens
#
# Every route that needs a token refuses one that is not right (expired, for another API or
# from another issuer, without or with an unknown key id, not valid yet, unsigned, signed with
# another key), one that was revoked (at once, no restart), and one signed with a key taken out
# of rotation; an external provider's tokens are honoured like the site's own.

#: Who each caller is, as token claims (role, organisation, the rest).
CALLER_CLAIMS: dict[str, tuple[Role, str, dict[str, Any]]] = {
    "sponsor": ("sponsor", SPONSOR_ORG, {}),
    "own_clinician": ("clinician", "Practice A", {"practitioner": GP_A, "sites": (SITE_A,)}),
    "other_clinician": ("clinician", "Practice B", {"practitioner": GP_B, "sites": (SITE_B,)}),
    "regulator": ("regulator", "MHRA", {}),
    "source": ("source", "EHR A", {"source_system": SOURCE}),
    "admin": ("admin", "Site A", {}),
    "data_manager": ("trial_data_manager", "Matrix Trials", {"trials": (TRIAL,)}),
    "statistician": ("statistician", "Matrix Trials", {"trials": (TRIAL,)}),
    "safety_contact": ("safety_contact", "Matrix Trials", {"trials": (TRIAL,)}),
}


def caller_token(key: bytes | SigningKeys, caller: str, **overrides: Any) -> str:
    role, org, claims = CALLER_CLAIMS[caller]
    return issue(key, role, org, **{**claims, **overrides})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def protected() -> Iterator[tuple[str, str, Rule, str]]:
    """Every route that needs a token, with a caller it admits (ALLOWED or OK)."""
    for (method, template), rule in MATRIX.items():
        if rule.expect["anonymous"] is not UNAUTHENTICATED:
            continue
        caller = next((c for c in CALLER_CLAIMS if rule.expect[c] in (ALLOWED, OK)), None)
        if caller is None:  # no site token is admitted (a federation hub's signed questions)
            continue
        yield method, template, rule, caller


def call(world: World, method: str, template: str, rule: Rule, token: str) -> Any:
    return world.client.request(
        method,
        fill(world, template, rule),
        headers=bearer(token),
        json=rule.body if method in ("POST", "PUT") else None,
    )


@contextmanager
def verifying_with(world: World, verifier: TokenVerifier) -> Iterator[None]:
    """The app checks tokens with ``verifier`` (as a restart with other settings would)."""
    before = world.app.state.token_verifier
    world.app.state.token_verifier = verifier
    try:
        yield
    finally:
        world.app.state.token_verifier = before


def _unsigned_claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def bad_tokens(world: World, caller: str) -> dict[str, str]:
    """Tokens for ``caller`` that no route may accept, by what is wrong with them."""
    key = world.key
    claims = _unsigned_claims(caller_token(key, caller))
    return {
        "expired": caller_token(key, caller, ttl_seconds=-3600),
        "audience": caller_token(key, caller, audience="urn:elsewhere:api"),
        "issuer": caller_token(key, caller, issuer="urn:elsewhere:issuer"),
        "no kid": jwt.encode(claims, key, algorithm="HS256"),
        "unknown kid": jwt.encode(claims, key, algorithm="HS256", headers={"kid": "retired"}),
        "nbf in the future": caller_token(key, caller, not_before=int(time.time()) + 3600),
        "alg none": jwt.encode(claims, None, algorithm="none", headers={"kid": "default"}),
        "other key": caller_token(b"not-this-sites-key-0123456789abcdef", caller),
    }


BAD_KINDS = (
    "expired",
    "audience",
    "issuer",
    "no kid",
    "unknown kid",
    "nbf in the future",
    "alg none",
    "other key",
)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_route_refuses_a_token_that_is_not_right(world: World, kind: str) -> None:
    wrong: list[str] = []
    for method, template, rule, caller in protected():
        token = bad_tokens(world, caller)[kind]
        response = call(world, method, template, rule, token)
        if response.status_code != 401:
            wrong.append(f"{method} {template} as {caller}: {response.status_code}")
    assert not wrong, f"a token with {kind} was not refused:\n" + "\n".join(wrong)


def test_a_revoked_token_is_refused_by_every_route_at_once(world: World) -> None:
    """Revoked as ``concierge token revoke`` does (another connection to the shared list),
    while the app runs: the next request is refused, other tokens of the same caller are not."""
    tokens = {caller: caller_token(world.key, caller) for caller in CALLER_CLAIMS}
    admitted = {
        caller: (method, template, rule)
        for method, template, rule, caller in reversed(list(protected()))
        if method == "GET"
    }
    for caller, (method, template, rule) in admitted.items():
        status = call(world, method, template, rule, tokens[caller]).status_code
        assert rule.expect[caller].admits(status), (caller, template, status)
        if template.startswith("/v1"):  # the audit record names the token: revocable by it
            assert world.audit()[-1]["detail"]["jti"] == _unsigned_claims(tokens[caller])["jti"]
    revocations = RevocationList(world.settings.resolved_token_revocation_url())
    try:
        for token in tokens.values():
            revocations.revoke(_unsigned_claims(token)["jti"], "matrix", "test")
    finally:
        revocations.close()
    wrong: list[str] = []
    for method, template, rule, caller in protected():
        response = call(world, method, template, rule, tokens[caller])
        if response.status_code != 401 or "revoked" not in response.text:
            wrong.append(f"{method} {template} as {caller}: {response.status_code}")
    assert not wrong, "a revoked token was honoured:\n" + "\n".join(wrong)
    for caller, (method, template, rule) in admitted.items():
        status = call(world, method, template, rule, caller_token(world.key, caller)).status_code
        assert rule.expect[caller].admits(status), (caller, template, status)


OLD_KEY, NEW_KEY = "o" * 32 + "-old", "n" * 32 + "-new"


def test_tokens_of_a_rotated_key_work_while_it_is_listed_and_not_once_it_is_removed(
    world: World,
) -> None:
    home = world.settings.home
    both = Settings(home=home, token_keys=f"old={OLD_KEY},new={NEW_KEY}", token_key_id="new")
    only_new = Settings(home=home, token_keys=f"new={NEW_KEY}")
    old_tokens = {
        c: caller_token(SigningKeys.from_settings(both), c, kid="old") for c in CALLER_CLAIMS
    }
    new_tokens = {c: caller_token(SigningKeys.from_settings(only_new), c) for c in CALLER_CLAIMS}
    assert {jwt.get_unverified_header(t)["kid"] for t in new_tokens.values()} == {"new"}
    wrong: list[str] = []
    with verifying_with(world, TokenVerifier.from_settings(both)):
        for method, template, rule, caller in protected():
            for tokens in (old_tokens, new_tokens):
                status = call(world, method, template, rule, tokens[caller]).status_code
                if not rule.expect[caller].admits(status):
                    wrong.append(f"both keys: {method} {template} as {caller}: {status}")
    with verifying_with(world, TokenVerifier.from_settings(only_new)):
        for method, template, rule, caller in protected():
            status = call(world, method, template, rule, old_tokens[caller]).status_code
            if status != 401:
                wrong.append(f"old key removed: {method} {template} as {caller}: {status}")
            status = call(world, method, template, rule, new_tokens[caller]).status_code
            if not rule.expect[caller].admits(status):
                wrong.append(f"new key: {method} {template} as {caller}: {status}")
        # the site's former single key (kid "default") is gone with it
        assert (
            call(
                world,
                "GET",
                "/v1/feasibility/budget",
                MATRIX[("GET", "/v1/feasibility/budget")],
                caller_token(world.key, "sponsor"),
            ).status_code
            == 401
        )
    assert not wrong, "\n".join(wrong)


def test_an_identity_providers_tokens_are_honoured_like_the_sites_own(world: World) -> None:
    """Tokens of an external OpenID Connect provider (RS256 and ES256, its key set on a real
    HTTP server) get every route's answer the matrix gives each caller, identity included."""
    keys = [ProviderKey.rsa("idp-rsa"), ProviderKey.ec("idp-ec")]
    with serve_jwks(keys) as jwks:
        settings = Settings(home=world.settings.home, oidc_issuer=ISSUER, oidc_jwks_url=jwks.url)
        wrong: list[str] = []
        with verifying_with(world, TokenVerifier.from_settings(settings)):
            for index, ((method, template), rule) in enumerate(MATRIX.items()):
                for caller in CALLER_CLAIMS:
                    role, org, extra = CALLER_CLAIMS[caller]
                    claims = provider_claims(
                        role,
                        org,
                        **{k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()},
                    )
                    token = keys[index % 2].sign(claims)
                    response = call(world, method, template, rule, token)
                    expected = rule.expect[caller]
                    if not expected.admits(response.status_code):
                        wrong.append(f"{method} {template} as {caller}: {response.status_code}")
                    if rule.identity and caller == "own_clinician":
                        assert IDENTITY["family"] in response.text, template
            # the site's own tokens keep working beside the provider's
            sponsor = call(
                world,
                "GET",
                "/v1/feasibility/budget",
                MATRIX[("GET", "/v1/feasibility/budget")],
                caller_token(world.key, "sponsor"),
            )
            assert sponsor.status_code == 200
        assert jwks.fetches == 1
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- sources
#
# A source token names its source system; the API ingests as that system, whose name is the
# first part of every resource key. So another source's resources are out of reach: a PUT to
# the same type and id makes the caller's own resource, a DELETE or an entered-in-error
# retracts only the caller's own, and the answers do not reveal whether another source holds
# the id (Patient ids can be NHS numbers).

OTHER_SOURCE = "urn:matrix:other-ehr"


def _fhir_request(world: World, method: str, path: str, token: str, body: Any = None) -> Any:
    return world.client.request(
        method,
        path,
        headers={**bearer(token), "Content-Type": "application/fhir+json"},
        content=None if body is None else json.dumps(body),
    )


def test_a_source_writes_and_retracts_only_its_own_source_systems_resources(
    world: World,
) -> None:
    ingestor = world.app.state.ingest.ingestor
    sink = ingestor.sink
    own = caller_token(world.key, "source")
    other = caller_token(world.key, "source", source_system=OTHER_SOURCE)
    condition_key = f"{SOURCE}|Condition|matrix-condition"
    pr_key, other_pr_key = (
        f"{SOURCE}|Practitioner|cross-pr",
        f"{OTHER_SOURCE}|Practitioner|cross-pr",
    )

    def entry(key: str) -> Any:
        return ingestor.vault.get_index([key]).get(key)

    practitioner = {"resourceType": "Practitioner", "id": "cross-pr", "name": [{"family": "Own"}]}
    assert (
        _fhir_request(world, "PUT", "/fhir/Practitioner/cross-pr", own, practitioner).status_code
        == 201
    )
    condition_before, pr_before = entry(condition_key), entry(pr_key)
    facts_before, references_before = len(sink.published_facts), len(sink.published_references)

    # DELETE another source's resource: nothing happens, and the answer is the one for an id
    # that nobody holds (no oracle of another source's ids)
    held = _fhir_request(world, "DELETE", "/fhir/Condition/matrix-condition", other)
    unheld = _fhir_request(world, "DELETE", "/fhir/Condition/nobody-has-this", other)
    assert (
        (held.status_code, held.json())
        == (unheld.status_code, unheld.json())
        == (
            200,
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "information",
                        "code": "informational",
                        "diagnostics": "nothing to delete",
                    }
                ],
            },
        )
    )
    # PUT over another source's resource: the caller's own resource, beside it
    theirs = {**practitioner, "name": [{"family": "Other"}]}
    put = _fhir_request(world, "PUT", "/fhir/Practitioner/cross-pr", other, theirs)
    assert (put.status_code, put.headers["location"]) == (201, "Practitioner/cross-pr/_history/1")
    assert [r.key for r in sink.published_references[references_before:]] == [other_pr_key]
    # ... which its own DELETE retracts, and only it
    assert _fhir_request(world, "DELETE", "/fhir/Practitioner/cross-pr", other).status_code == 200
    retraction = sink.published_references[-1]
    assert (retraction.key, retraction.retracted) == (other_pr_key, True)
    # entered-in-error and a DELETE in a Bundle reach only the caller's own resources too; a
    # reference by URL to another source's patient does not resolve (only by identifier)
    retract = {
        "resourceType": "Condition",
        "id": "matrix-condition",
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "entered-in-error",
                }
            ]
        },
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
        "subject": {"reference": "Patient/matrix-patient"},
    }
    by_url = _fhir_request(world, "PUT", "/fhir/Condition/matrix-condition", other, retract)
    assert by_url.status_code == 422 and "unknown patient" in by_url.text
    nhs = f"https://fhir.nhs.uk/Id/nhs-number|{IDENTITY['nhs_number']}"
    by_identifier = {**retract, "subject": {"reference": f"Patient?identifier={nhs}"}}
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": by_identifier,
                "request": {"method": "PUT", "url": "Condition/matrix-condition"},
            },
            {"request": {"method": "DELETE", "url": "Condition/matrix-condition"}},
            {"request": {"method": "DELETE", "url": "Practitioner/cross-pr"}},
        ],
    }
    answered = _fhir_request(world, "POST", "/fhir", other, bundle)
    assert answered.status_code == 200, answered.text
    published = sink.published_facts[facts_before:] + sink.published_references[references_before:]
    assert {p.key.split("|")[0] for p in published} == {OTHER_SOURCE}, (
        "another source's key was written"
    )
    assert entry(condition_key) == condition_before and not condition_before.retracted
    assert entry(pr_key) == pr_before and not pr_before.retracted
    assert entry(other_pr_key).retracted
    # the world's own source may retract its own (the control)
    assert _fhir_request(world, "DELETE", "/fhir/Practitioner/cross-pr", own).status_code == 200
    assert (sink.published_references[-1].key, sink.published_references[-1].retracted) == (
        pr_key,
        True,
    )
    # provenance names the source system that wrote, as the key does
    assert {p.provenance.source for p in published} == {OTHER_SOURCE}


def test_a_source_token_must_name_its_source_system(world: World) -> None:
    claims = _unsigned_claims(caller_token(world.key, "source"))
    del claims["source_system"]
    token = jwt.encode(claims, world.key, algorithm="HS256", headers={"kid": "default"})
    response = _fhir_request(world, "PUT", "/fhir/Practitioner/matrix-pr", token, PRACTITIONER)
    assert response.status_code == 401
    assert "source system" in response.json()["issue"][0]["diagnostics"]


def test_the_worker_pages_check_tokens_as_the_api_does(
    world: World, worker_world: WorkerWorld
) -> None:
    """The worker's state pages go through the API's whole check: a revoked admin token is
    refused at once, and keys are found by ``kid`` (a rotated key while it is listed)."""
    url = f"{worker_world.pages.url}/state/digest"
    token = caller_token(world.key, "admin")
    assert httpx.get(url, headers=bearer(token), timeout=10).status_code == 200
    # the worker's list (with the API's by default: both in the shared audit database)
    worker_settings = worker_world.pages.stream.settings
    revocations = RevocationList(worker_settings.resolved_token_revocation_url())
    try:
        revocations.revoke(_unsigned_claims(token)["jti"], "matrix", "test")
    finally:
        revocations.close()
    refused = httpx.get(url, headers=bearer(token), timeout=10)
    assert refused.status_code == 401 and "revoked" in refused.text, refused.text
    fresh = caller_token(world.key, "admin")
    assert httpx.get(url, headers=bearer(fresh), timeout=10).status_code == 200

    access = worker_world.pages.stream.access
    saved = access.verifier
    both = Settings(home=world.settings.home, token_keys=f"old={OLD_KEY},new={NEW_KEY}")
    only_new = Settings(home=world.settings.home, token_keys=f"new={NEW_KEY}")
    old = caller_token(SigningKeys.from_settings(both), "admin", kid="old")
    try:
        access.verifier = TokenVerifier.from_settings(both)
        assert httpx.get(url, headers=bearer(old), timeout=10).status_code == 200
        access.verifier = TokenVerifier.from_settings(only_new)
        assert httpx.get(url, headers=bearer(old), timeout=10).status_code == 401
    finally:
        access.verifier = saved
