"""The follow-up API over the real app and stores (``tests/api_world.py``): a plan declared and
checked, the feed by cursor, the ``$export`` kick-off, status and NDJSON files, safety events and
endpoint counts, the arm at enrolment; a token for another trial sees nothing of this one."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.contracts.facts import (
    AdverseEventFact,
    Coding,
    ConditionFact,
    ConsentFact,
    Provenance,
    ResourceFacts,
)
from followup.engine import FollowupEngine, Outcome
from followup.plans import SERIOUSNESS
from followup.pseudonym import trial_pseudonym
from tests.api_world import World, build_world
from tests.followup_helpers import SECRET, enrol

TRIAL = "FU1"
SOURCE = "urn:test:ehr"
PLAN = {
    "scope": ["condition", "adverse_event"],
    "outcomes": [
        {"name": "SAE", "kind": "serious_adverse_event"},
        {"name": "MI", "kind": "coded", "codes": [{"system": "snomed", "code": "22298006"}]},
    ],
    "safety_contact": {"channel": "webhook", "address": "https://safety.example/hook"},
    "endpoint": "MI",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with build_world(tmp_path_factory.mktemp("followup-api")) as built:
        yield built


def headers(world: World, role: str, trial: str = TRIAL) -> dict[str, str]:
    return world.headers(role, "Acme Trials", trials=(trial,))  # type: ignore[arg-type]


def envelope(key: str, patient: str, seq: int, *facts: object) -> ResourceFacts:
    kind, ident = key.split("|")
    return ResourceFacts(
        key=f"{SOURCE}|{key}",
        patient=patient,
        seq=seq,
        provenance=Provenance(
            source=SOURCE,
            resource_type=kind,
            resource_id=ident,
            version=str(seq),
            ingested_at=datetime.now(UTC),
        ),
        facts=tuple(facts),  # type: ignore[arg-type]
    )


def test_the_trial_team_works_through_the_api(world: World, tmp_path: Path) -> None:
    client, runtime = world.client, world.runtime
    assert runtime is not None
    dm = headers(world, "trial_data_manager")
    bad = dict(PLAN, endpoint="nothing")
    response = client.put(f"/v1/followup/trials/{TRIAL}/plan", json=bad, headers=dm)
    assert response.status_code == 422 and "endpoint" in response.text
    response = client.put(f"/v1/followup/trials/{TRIAL}/plan", json=PLAN, headers=dm)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1

    # two participants, arms recorded at enrolment, consent, and some facts
    invitations = {p: enrol(runtime.sessions, TRIAL, p) for p in ("fu-a", "fu-b")}
    for patient, arm in (("fu-a", "active"), ("fu-b", "placebo")):
        response = client.put(
            f"/v1/followup/enrolments/{invitations[patient]}/arm", json={"arm": arm}, headers=dm
        )
        assert response.status_code == 200, response.text
    engine = FollowupEngine(SECRET, "https://concierge.example")
    serious = AdverseEventFact(
        codes=(Coding(system="http://snomed.info/sct", code="1"),),
        actuality="actual",
        seriousness=(Coding(system=SERIOUSNESS, code="serious"),),
    )
    mi = ConditionFact(codes=(Coding(system="http://snomed.info/sct", code="22298006"),))
    out = Outcome()
    with runtime.sessions.begin() as session:
        for patient in ("fu-a", "fu-b"):
            permit = ConsentFact(status="active", research_opt_out=False, follow_up_trials=(TRIAL,))
            engine.apply_one(session, envelope(f"Consent|k-{patient}", patient, 1, permit), out)
        engine.apply_one(session, envelope("Condition|mi-a", "fu-a", 1, mi), out)
        engine.apply_one(session, envelope("AdverseEvent|ae-b", "fu-b", 1, serious), out)
        for n in range(5):
            cond = ConditionFact(codes=(Coding(system="http://snomed.info/sct", code=str(n)),))
            engine.apply_one(session, envelope(f"Condition|x{n}", "fu-b", 1, cond), out)

    # the feed, page by page
    entries, after = [], 0
    while True:
        page = client.get(
            f"/v1/followup/trials/{TRIAL}/feed", params={"after": after, "limit": 4}, headers=dm
        ).json()
        entries.extend(page["entries"])
        after = page["next"]
        if not page["more"]:
            break
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert {e["participant"] for e in entries} == {
        trial_pseudonym(SECRET, TRIAL, p) for p in ("fu-a", "fu-b")
    }
    assert "fu-a" not in json.dumps(entries) and "fu-b" not in json.dumps(entries)

    # $export: 202 with Content-Location, then the manifest and the files
    kick = client.post(f"/v1/followup/trials/{TRIAL}/$export", headers=dm)
    assert kick.status_code == 202, kick.text
    status_url = kick.headers["Content-Location"]
    deadline = time.monotonic() + 30
    while True:
        status = client.get(status_url, headers=dm)
        if status.status_code == 200 or time.monotonic() > deadline:
            break
        assert status.status_code == 202 and status.headers["Retry-After"]
        time.sleep(0.1)
    assert status.status_code == 200, status.text
    manifest = status.json()
    assert manifest["extension"]["entries"] == len(entries)
    lines = []
    for output in manifest["output"]:
        file = client.get(output["url"], headers=dm)
        assert file.status_code == 200
        lines.extend(json.loads(line) for line in file.text.splitlines())
    assert lines == entries
    # the export is its requester's: another data manager of the trial is told 404
    other = world.headers("trial_data_manager", "Acme Trials", subject="dm-2", trials=(TRIAL,))
    assert client.get(status_url, headers=other).status_code == 404

    # safety events for the safety contact, endpoint counts for the statistician
    events = client.get(
        f"/v1/followup/trials/{TRIAL}/safety-events", headers=headers(world, "safety_contact")
    ).json()["events"]
    assert [(e["outcome"], e["status"]) for e in events] == [
        ("MI", "notified"),
        ("SAE", "notified"),
    ]
    counts = client.get(
        f"/v1/followup/trials/{TRIAL}/endpoints",
        params={"drill": "true"},
        headers=headers(world, "statistician"),
    ).json()
    assert [(a["arm"], a["participants"], a["with_endpoint"]) for a in counts["arms"]] == [
        ("active", 1, 1),
        ("placebo", 1, 0),
    ]
    assert counts["arms"][0]["provenance"][0]["resources"] == [
        {"key": f"{SOURCE}|Condition|mi-a", "seq": 1}
    ]

    # a token for another trial sees nothing of this one
    for role, path in (
        ("trial_data_manager", f"/v1/followup/trials/{TRIAL}/feed"),
        ("trial_data_manager", f"/v1/followup/trials/{TRIAL}/plan"),
        ("statistician", f"/v1/followup/trials/{TRIAL}/endpoints"),
        ("safety_contact", f"/v1/followup/trials/{TRIAL}/safety-events"),
    ):
        response = client.get(path, headers=headers(world, role, trial="OTHER"))
        assert response.status_code == 404, (role, path, response.status_code)
    response = client.put(
        f"/v1/followup/enrolments/{invitations['fu-a']}/arm",
        json={"arm": "x"},
        headers=headers(world, "trial_data_manager", trial="OTHER"),
    )
    assert response.status_code == 404
