"""The OpenAPI document is true: schemathesis against the running API, as every caller.

The real application (:func:`concierge.api.create_app`) over the world of
``tests/api_world.py`` (real SQLite stores, a columnar snapshot of a synthetic population, a saved
question with a member, an invitation routed to a GP; in a directory of its own, so nothing it
does reaches another test) is served by uvicorn on a loopback port. For every operation of the
document the app serves, schemathesis makes requests from the document: its explicit examples,
the coverage phase's boundary and missing-value cases, then positive and negative fuzzing, with a
fixed seed. Each request is sent as every caller: no token, and a token (:func:`core.auth.issue`)
for each role: sponsor, clinician, regulator, source, admin, and the trial team's
trial_data_manager, statistician and safety_contact (their ``trials`` claim names the world's
trial); a caller the operation refuses (401,
403) gets its first ``SCHEMATHESIS_REFUSALS`` cases (default 4), not every one, since the token
is checked before anything else is read. Where a path names an id, the same
request is sent again with an id the world holds (its saved question, its invitation, its
patient, the data manager's follow-up export), so answers other than 404 are checked too.

Every response must pass schemathesis' checks: no server error, a documented status, a
documented media type, a body that conforms to the documented schema, and the documented
required headers (``Retry-After`` on 429 and 503, ``WWW-Authenticate`` on 401). Every failure
is collected and reported (with a curl command to reproduce it); the run fails on any.

``SCHEMATHESIS_EXAMPLES`` (default 8) sets the fuzzed examples per operation, ``SCHEMATHESIS_SEED``
the seed, ``SCHEMATHESIS_REFUSALS`` the refused cases per caller (0: all); the counts (requests
per operation and caller, statuses) are printed at the end of the run and written to
``test-artifacts/openapi-contract.json``. See ``docs/reference/api-contract.md``.

Why this drives schemathesis itself rather than through its pytest plugin: the plugin's loader
for a schema that only a fixture can build (``schemathesis.pytest.from_fixture``) fails on the
pytest in the lock (it sets ``Function._nodeid``, which pytest 9 no longer has), and a schema
loaded at import would build an app at collection. Each operation's test is what the plugin
builds (:func:`schemathesis.generation.hypothesis.builder.create_test`), run here once per
operation, each case sent as every caller: the costly part, generating a case, is shared.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
import schemathesis.checks
import uvicorn
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation import derive_operation_seed
from schemathesis.generation.case import Case
from schemathesis.generation.hypothesis.builder import (
    HypothesisTestConfig,
    HypothesisTestMode,
    create_test,
)
from schemathesis.schemas import APIOperation

from feasibility.disclosure.budget import QueryBudget
from tests.api_world import (
    GP_A,
    PATIENT_RESOURCE,
    RETIRE,
    SITE_A,
    SPONSOR_ORG,
    TRIAL,
    World,
    build_world,
)
from tests.contract.calls import CALLS
from tests.faults import free_port

#: Fuzzed examples per operation (each sent as every caller); a longer run sets more.
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "8"))
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20261201"))
CALLERS = (
    "none",
    "sponsor",
    "clinician",
    "regulator",
    "source",
    "admin",
    "data_manager",
    "statistician",
    "safety_contact",
)
#: The trial team's callers: their roles, each with a ``trials`` claim naming the world's trial.
TRIAL_TEAM = {
    "data_manager": "trial_data_manager",
    "statistician": "statistician",
    "safety_contact": "safety_contact",
}
#: Cases of an operation sent as a caller the operation refuses (401, 403) before that caller is
#: left out of its remaining cases; 0 sends every case as every caller. A refusal comes from the
#: token check, before the body or parameters are read (only an undecodable body, 400, comes
#: first), so further refused cases repeat the same answer: most of a run's time went there
#: (6,873 of 10,590 requests were 403s).
REFUSALS = int(os.environ.get("SCHEMATHESIS_REFUSALS", "4"))
REFUSED = frozenset({401, 403})
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]
#: Operations whose body is a criteria tree (recursive, a discriminated union of 14 kinds):
#: each generated case takes about a second, and the coverage phase would enumerate the whole
#: recursive union (minutes per operation), so they get a quarter of the examples and no
#: coverage phase. Their criteria are also checked by the engines' generative tests.
CRITERIA_BODIES = frozenset(
    {
        "POST /v1/feasibility/ask",
        "POST /v1/feasibility/check",
        "POST /v1/feasibility/saved-questions",
        "POST /v1/feasibility/profile",
        "POST /v1/feasibility/impact",
    }
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(900, 60 * EXAMPLES))]


@dataclass
class Served:
    """The world's app on a loopback port, and a token per caller."""

    world: World
    base_url: str
    headers: dict[str, dict[str, str]]
    export_job: str
    session: requests.Session = field(default_factory=requests.Session)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with build_world(tmp_path_factory.mktemp("contract")) as world:
        # A budget that lasts the run: answers, not lockouts, are what is checked here (the
        # lockout's 429 has tests of its own: tests/integration/test_budget_attack.py).
        feasibility = world.app.state.feasibility
        feasibility.budget = QueryBudget(max_queries=1_000_000, lockout_after=1_000_000)
        headers = {
            "none": {},
            "sponsor": world.headers("sponsor", SPONSOR_ORG),
            "clinician": world.headers("clinician", "Leeds GP", practitioner=GP_A, sites=(SITE_A,)),
            "regulator": world.headers("regulator", "MHRA"),
            "source": world.headers("source", "Leeds EHR"),
            "admin": world.headers("admin", "Leeds site"),
        }
        for caller, role in TRIAL_TEAM.items():
            headers[caller] = world.headers(role, "Acme Trials", trials=(TRIAL,))  # type: ignore[arg-type]
        # a follow-up export of the data manager's, so its status URL answers beyond 404
        kick = world.client.post(
            f"/v1/followup/trials/{TRIAL}/$export", headers=headers["data_manager"]
        )
        assert kick.status_code == 202, kick.text
        export_job = kick.json()["job"]
        port = free_port()
        # the world's client has run the app's start-up already: uvicorn only serves it
        server = uvicorn.Server(
            uvicorn.Config(
                world.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
            )
        )
        thread = threading.Thread(target=server.run, name="contract-uvicorn", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
            yield Served(world, f"http://127.0.0.1:{port}", headers, export_job)
        finally:
            server.should_exit = True
            thread.join(30)


def world_ids(operation: APIOperation, served: Served) -> dict[str, str]:
    """Path parameters naming something the world holds, for the operation's path."""
    path = operation.path
    ids: dict[str, str] = {}
    if "{trial_id}" in path:
        # retire the saved question kept for retiring, never the one answers are read from
        ids["trial_id"] = RETIRE if operation.method.upper() == "DELETE" else TRIAL
    if "{invitation_id}" in path and served.world.invitation is not None:
        ids["invitation_id"] = served.world.invitation
    if "{org}" in path:
        ids["org"] = SPONSOR_ORG
    if "{resource_type}" in path:
        ids["resource_type"] = "Patient"
    if "{resource_id}" in path:
        ids["resource_id"] = PATIENT_RESOURCE
    if "{job_id}" in path:
        ids["job_id"] = served.export_job
    return ids


@dataclass
class Refusals:
    """Per operation and caller: how often refused, and whether ever let through."""

    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    let_through: set[tuple[str, str]] = field(default_factory=set)

    def record(self, operation: str, caller: str, status: int) -> None:
        key = (operation, caller)
        if status in REFUSED:
            self.refused[key] = self.refused.get(key, 0) + 1
        elif status != 400:  # an undecodable body is answered 400 before the token is checked
            self.let_through.add(key)

    def skip(self, operation: str, caller: str) -> bool:
        key = (operation, caller)
        return REFUSALS > 0 and key not in self.let_through and self.refused.get(key, 0) >= REFUSALS


@dataclass
class Findings:
    """Failures, one per (operation, caller, check failure), with a way to reproduce each."""

    found: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def add(self, operation: str, caller: str, failure: Failure, curl: str) -> None:
        key = (operation, caller, failure.title)
        if key not in self.found:
            self.found[key] = f"{operation} as {caller}: {failure.title}\n{failure.message}\n{curl}"

    def __bool__(self) -> bool:
        return bool(self.found)

    def report(self) -> str:
        return f"{len(self.found)} contract failures:\n\n" + "\n\n".join(self.found.values())


def send_as_every_caller(
    case: Case, served: Served, ids: dict[str, str], findings: Findings, refusals: Refusals
) -> None:
    label = case.operation.label
    if case.meta is not None:
        CALLS.cases[f"{case.meta.phase.name.value} {case.meta.generation.mode.value}"] += 1
    variants: list[dict[str, Any] | None] = [None]
    if ids:
        variants.append({**(case.path_parameters or {}), **ids})
    for path_parameters in variants:
        if path_parameters is not None:
            case.path_parameters = path_parameters
        variant = label if path_parameters is None else f"{label} (world ids)"
        for caller in CALLERS:
            if refusals.skip(variant, caller):
                CALLS.skipped += 1
                continue
            headers = served.headers[caller]
            response = case.call(base_url=served.base_url, session=served.session, headers=headers)
            CALLS.record(label, caller, response.status_code)
            refusals.record(variant, caller, response.status_code)
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except FailureGroup as group:
                for failure in group.exceptions:
                    findings.add(label, caller, failure, case.as_curl_command(headers=headers))
            except Failure as failure:
                findings.add(label, caller, failure, case.as_curl_command(headers=headers))


def sender(
    served: Served, ids: dict[str, str], findings: Findings, refusals: Refusals
) -> Callable[[Case], None]:
    """The test function schemathesis calls with each case of one operation."""

    def send(case: Case) -> None:
        send_as_every_caller(case, served, ids, findings, refusals)

    return send


def schema_of(served: Served) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            # methods the document does not list answer 405 (a problem): not what is checked
            "phases": {"coverage": {"unexpected-methods": []}},
            "generation": {
                "max-examples": EXAMPLES,
                "deterministic": True,
                "database": "none",
                "no-shrink": True,
                # callers send their own tokens (none: no Authorization header at all)
                "with-security-parameters": False,
            },
        }
    )
    document = requests.get(f"{served.base_url}/openapi.json", timeout=30)
    document.raise_for_status()
    return schemathesis.openapi.from_dict(document.json(), config=config)


def test_the_api_answers_as_its_openapi_document_says(served: Served) -> None:
    schema = schema_of(served)
    findings = Findings()
    refusals = Refusals()
    CALLS.callers = CALLERS
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 38, [op.label for op in operations]
    for operation in operations:
        criteria = operation.label in CRITERIA_BODIES
        modes = [HypothesisTestMode.EXAMPLES, HypothesisTestMode.FUZZING]
        if not criteria:
            modes.append(HypothesisTestMode.COVERAGE)
        settings = schema.config.get_hypothesis_settings(operation=operation, phase="fuzzing")
        if criteria:
            settings = hypothesis.settings(settings, max_examples=max(1, EXAMPLES // 4))
        test = create_test(
            operation=operation,
            test_func=sender(served, world_ids(operation, served), findings, refusals),
            config=HypothesisTestConfig(
                project=schema.config,
                modes=modes,
                settings=settings,
                # these settings, not a loaded Hypothesis profile's (HYPOTHESIS_PROFILE=long)
                explicit_settings=hypothesis.settings.get_profile("default"),
                seed=derive_operation_seed(SEED, operation.label),
            ),
        )
        test()
    seconds = time.monotonic() - started
    CALLS.about = {
        "examples per operation": EXAMPLES,
        "criteria bodies": max(1, EXAMPLES // 4),
        "refused cases per caller": REFUSALS or "all",
        "seed": SEED,
        "seconds": round(seconds, 1),
    }
    artifacts = Path(__file__).resolve().parents[2] / "test-artifacts"
    CALLS.write(artifacts / "openapi-contract.json")
    if findings:
        (artifacts / "openapi-contract-failures.txt").write_text(findings.report() + "\n")
    assert not findings, findings.report()
    assert CALLS.total > 0
