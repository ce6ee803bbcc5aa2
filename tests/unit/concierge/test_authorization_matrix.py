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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from core.audit import AuditLog
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


# --------------------------------------------------------------------------- worker pages


def admin_only() -> dict[str, Outcome]:
    expect = dict.fromkeys(CALLERS, FORBIDDEN)
    expect.update(anonymous=UNAUTHENTICATED, admin=OK)
    return expect


#: Every page of the stream worker's web port and the outcome per caller: the probes are open
#: (``/readyz`` answers 503 here: no broker), every state page is for site admins only.
WORKER_PAGES: dict[str, dict[str, Outcome]] = {
    "/health": dict.fromkeys(CALLERS, OK),
    "/readyz": dict.fromkeys(CALLERS, Outcome.PROBE),
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
        assert record["role"] == ("anonymous" if caller == "anonymous" else caller.split("_")[-1])
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
]
#: Sponsor routes that answer no count: free, and open to a locked-out organisation.
FREE: list[tuple[str, str]] = [
    ("GET", "/v1/feasibility/budget"),
    ("GET", "/v1/feasibility/saved-questions"),
    ("GET", f"/v1/feasibility/saved-questions/{TRIAL}"),
    ("GET", "/v1/feasibility/status"),
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
