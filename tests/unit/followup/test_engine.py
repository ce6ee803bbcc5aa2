"""The follow-up engine on SQLite (real migrations), envelopes made by hand: consent rules,
scope, corrections, withdrawal, safety events and endpoint counts; plans and pseudonyms."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from core.contracts.facts import (
    AdverseEventFact,
    Coding,
    ConditionFact,
    ConsentFact,
    ObservationFact,
    PatientFact,
    Provenance,
    ResourceFacts,
)
from core.db import current_revision, head_revision, make_engine, make_sessionmaker
from followup import db
from followup.engine import FollowupEngine, Outcome
from followup.plans import SERIOUSNESS, Plan
from followup.pseudonym import trial_pseudonym
from followup.service import FollowupService, NotFound
from followup.tables import Base, SafetyEvent
from recruitment.models import OutboxMessage
from tests.followup_helpers import SECRET, enrol, plan

SOURCE = "urn:test:ehr"
NOW = datetime.now(UTC)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'followup.sqlite'}"
    db.upgrade(url)
    engine = make_engine(url, immediate_writes=True)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_migrations_create_exactly_the_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.sqlite'}"
    db.upgrade(url)
    engine = make_engine(url)
    try:
        assert current_revision(db.SCHEMA, engine) == head_revision(db.SCHEMA) == "0003"
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "version_table": db.SCHEMA.version_table,
                    # recruitment's tables share the database: compare the follow-up ones
                    "include_name": lambda name, kind, _parent: (
                        kind != "table" or str(name).startswith("followup_")
                    ),
                },
            )
            diff = list(compare_metadata(context, Base.metadata))
        assert diff == []
    finally:
        engine.dispose()


def envelope(key: str, patient: str, seq: int, *facts: object, retracted: bool = False,
             ingested: datetime | None = None) -> ResourceFacts:  # fmt: skip
    kind = key.split("|")[1]
    return ResourceFacts(
        key=f"{SOURCE}|{key}",
        patient=patient,
        seq=seq,
        retracted=retracted,
        provenance=Provenance(source=SOURCE, resource_type=kind, resource_id=key.split("|")[1],
                              version=str(seq), ingested_at=ingested or datetime.now(UTC)),
        facts=tuple(facts),  # type: ignore[arg-type]
    )  # fmt: skip


def permit(*trials: str, **changes: object) -> ConsentFact:
    return ConsentFact(status="active", research_opt_out=False, follow_up_trials=trials,
                       **changes)  # type: ignore[arg-type]  # fmt: skip


def cond(code: str) -> ConditionFact:
    return ConditionFact(codes=(Coding(system="http://snomed.info/sct", code=code),))


def run(engine: FollowupEngine, sessions: sessionmaker[Session], *envelopes: ResourceFacts
        ) -> Outcome:  # fmt: skip
    out = Outcome()
    with sessions.begin() as session:
        engine.apply(session, envelopes, out)
    return out


def feed(sessions: sessionmaker[Session], trial: str = "T1") -> list[dict[str, object]]:
    return list(FollowupService(sessions).feed(trial, 0, 1000)["entries"])


def test_enrolment_without_consent_forwards_nothing_and_consent_starts_it(
    sessions: sessionmaker[Session],
) -> None:
    FollowupService(sessions).put_plan("T1", plan(), "dm")
    enrol(sessions, "T1", "p-1")
    engine = FollowupEngine(SECRET, "https://x.example")
    run(engine, sessions, envelope("Condition|c0", "p-1", 1, cond("1")))
    assert feed(sessions) == []
    # a consent for another trial does not authorise this one
    run(engine, sessions, envelope("Consent|k0", "p-1", 1, permit("T2")))
    run(engine, sessions, envelope("Condition|c1", "p-1", 1, cond("1")))
    assert feed(sessions) == []
    run(engine, sessions, envelope("Consent|k1", "p-1", 1, permit("T1")))
    run(engine, sessions, envelope("Condition|c2", "p-1", 1, cond("2")))
    entries = feed(sessions)
    assert [e["type"] for e in entries] == ["started", "fact"]
    assert entries[1]["participant"] == trial_pseudonym(SECRET, "T1", "p-1")


def test_a_consent_period_that_has_not_begun_does_not_authorise(
    sessions: sessionmaker[Session],
) -> None:
    FollowupService(sessions).put_plan("T1", plan(), "dm")
    enrol(sessions, "T1", "p-1")
    engine = FollowupEngine(SECRET, "https://x.example")
    later = NOW + timedelta(days=30)
    run(engine, sessions, envelope("Consent|k1", "p-1", 1, permit("T1", period_start=later)))
    run(engine, sessions, envelope("Condition|c2", "p-1", 1, cond("2")))
    assert feed(sessions) == []


def test_a_consent_period_that_ends_withdraws_once_without_a_new_event(
    sessions: sessionmaker[Session],
) -> None:
    FollowupService(sessions).put_plan("T1", plan(), "dm")
    enrol(sessions, "T1", "p-1")
    enrol(sessions, "T1", "p-2")
    now = [NOW]
    engine = FollowupEngine(SECRET, "https://x.example", clock=lambda: now[0])
    end = NOW + timedelta(hours=1)
    run(engine, sessions, envelope("Consent|k1", "p-1", 1, permit("T1", period_end=end)),
        envelope("Consent|k2", "p-2", 1, permit("T1")),  # no end: stays
        envelope("Condition|c1", "p-1", 1, cond("1")))  # fmt: skip

    def expire() -> Outcome:
        out = Outcome()
        with sessions.begin() as session:
            engine.expire(session, out)
        return out

    assert expire().withdrawn == 0  # not ended yet
    now[0] = end - timedelta(seconds=1)
    assert expire().withdrawn == 0
    now[0] = end
    assert expire().withdrawn == 1
    now[0] = end + timedelta(minutes=5)
    assert expire().withdrawn == 0, "once: a second run finds nothing to do"
    p1 = trial_pseudonym(SECRET, "T1", "p-1")
    mine = [e for e in feed(sessions) if e["participant"] == p1]
    assert [e["type"] for e in mine] == ["started", "fact", "withdrawn"]
    assert "period" in str(mine[-1]["reason"])
    # the feed is stopped: the participant's next fact is not forwarded, and no second event
    run(engine, sessions, envelope("Condition|c2", "p-1", 1, cond("2")))
    assert [e["type"] for e in feed(sessions) if e["participant"] == p1] == [
        "started", "fact", "withdrawn"
    ]  # fmt: skip
    # a new consent covering now starts it again
    later = end + timedelta(days=365)
    run(engine, sessions, envelope("Consent|k1", "p-1", 2, permit("T1", period_end=later)))
    assert [e["type"] for e in feed(sessions) if e["participant"] == p1][-1] == "started"


def test_scope_limits_what_is_forwarded_and_patients_give_only_death(
    sessions: sessionmaker[Session],
) -> None:
    FollowupService(sessions).put_plan(
        "T1",
        plan(scope=["adverse_event", "death"], outcomes=[], safety_contact=None, endpoint=None),
        "dm",
    )
    enrol(sessions, "T1", "p-1")
    engine = FollowupEngine(SECRET, "https://x.example")
    run(engine, sessions, envelope("Consent|k1", "p-1", 1, permit("T1")))
    run(engine, sessions, envelope("Condition|c1", "p-1", 1, cond("1")),
        envelope("Patient|p", "p-1", 2, PatientFact(deceased=True, site="RA3",
                                                     deceased_date=NOW)))  # fmt: skip
    entries = feed(sessions)
    assert [e["type"] for e in entries] == ["started", "fact"]
    assert entries[1]["facts"] == [{"kind": "death", "date": NOW.isoformat()}]
    assert "RA3" not in str(entries)


def test_facts_ingested_before_follow_up_started_are_not_forwarded(
    sessions: sessionmaker[Session],
) -> None:
    FollowupService(sessions).put_plan("T1", plan(), "dm")
    enrol(sessions, "T1", "p-1")
    engine = FollowupEngine(SECRET, "https://x.example")
    run(engine, sessions, envelope("Consent|k1", "p-1", 1, permit("T1")))
    old = NOW - timedelta(days=400)
    run(engine, sessions, envelope("Condition|c1", "p-1", 1, cond("1"), ingested=old))
    assert [e["type"] for e in feed(sessions)] == ["started"]


def test_replayed_envelopes_change_nothing(sessions: sessionmaker[Session]) -> None:
    FollowupService(sessions).put_plan("T1", plan(), "dm")
    enrol(sessions, "T1", "p-1")
    engine = FollowupEngine(SECRET, "https://x.example")
    batch = [
        envelope("Consent|k1", "p-1", 1, permit("T1")),
        envelope("AdverseEvent|a1", "p-1", 1, AdverseEventFact(
            codes=(Coding(system="http://snomed.info/sct", code="1"),), actuality="actual",
            seriousness=(Coding(system=SERIOUSNESS, code="serious"),))),
        envelope("Condition|c1", "p-1", 2, cond("22298006")),
    ]  # fmt: skip
    run(engine, sessions, *batch)
    first = feed(sessions)
    run(engine, sessions, *batch)
    run(engine, sessions, *batch)
    assert feed(sessions) == first
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(SafetyEvent)) == 2
        assert session.scalar(sa.select(sa.func.count()).select_from(OutboxMessage)) == 2


def test_lab_threshold_compares_in_its_own_unit_and_reports_another(
    sessions: sessionmaker[Session],
) -> None:
    FollowupService(sessions).put_plan("T1", plan(), "dm")
    enrol(sessions, "T1", "p-1")
    engine = FollowupEngine(SECRET, "https://x.example")
    alt = Coding(system="http://loinc.org", code="1742-6")

    def obs(value: float, unit: str) -> ObservationFact:
        return ObservationFact(codes=(alt,), status="final", value=value, unit=unit)

    run(engine, sessions, envelope("Consent|k1", "p-1", 1, permit("T1")),
        envelope("Observation|o1", "p-1", 1, obs(120, "U/L")),  # 3 x 40 exactly: not above
        envelope("Observation|o2", "p-1", 1, obs(121, "U/L")),
        envelope("Observation|o3", "p-1", 1, obs(2.5, "ukat/L")))  # fmt: skip
    service = FollowupService(sessions)
    events = {e["resource"]["key"].rsplit("|", 1)[1]: e["status"] for e in
              service.safety_events("T1")}  # fmt: skip
    assert events == {"o2": "notified", "o3": "uninterpretable"}


def test_endpoint_counts_per_arm_follow_corrections(sessions: sessionmaker[Session]) -> None:
    service = FollowupService(sessions)
    service.put_plan("T1", plan(), "dm")
    engine = FollowupEngine(SECRET, "https://x.example")
    arms = {"p-1": "A", "p-2": "A", "p-3": "B"}
    for p, arm in arms.items():
        invitation = enrol(sessions, "T1", p)
        service.record_arm(invitation, arm)
        run(engine, sessions, envelope(f"Consent|k{p}", p, 1, permit("T1")))
    run(engine, sessions, envelope("Condition|m1", "p-1", 1, cond("22298006")),
        envelope("Condition|m3", "p-3", 1, cond("22298006")),
        envelope("Condition|x2", "p-2", 1, cond("1")))  # fmt: skip
    counts = service.endpoint_counts("T1")
    assert [(a["arm"], a["participants"], a["with_endpoint"]) for a in counts["arms"]] == [
        ("A", 2, 1), ("B", 1, 1)]  # fmt: skip
    # a correction that is no longer the endpoint moves the count
    run(engine, sessions, envelope("Condition|m3", "p-3", 2, cond("1")))
    drill = service.endpoint_counts("T1", drill=True)
    assert [(a["arm"], a["with_endpoint"]) for a in drill["arms"]] == [("A", 1), ("B", 0)]
    assert drill["arms"][0]["provenance"] == [{
        "participant": trial_pseudonym(SECRET, "T1", "p-1"),
        "resources": [{"key": f"{SOURCE}|Condition|m1", "seq": 1}]}]  # fmt: skip
    assert "p-1" not in str(drill)


def test_plans_are_checked_when_declared() -> None:
    with pytest.raises(ValidationError, match="names its codes"):
        Plan.model_validate({"scope": ["condition"], "outcomes": [{"name": "x", "kind": "coded"}],
                             "safety_contact": {"channel": "email", "address": "a@b"}})  # fmt: skip
    with pytest.raises(ValidationError, match="safety_contact"):
        plan(safety_contact=None)
    with pytest.raises(ValidationError, match="endpoint"):
        plan(endpoint="nothing")
    with pytest.raises(ValidationError, match="unknown code system"):
        plan(outcomes=[{"name": "x", "kind": "coded", "codes": [{"system": "bogus", "code": "1"}]}])


def test_a_missing_plan_or_endpoint_is_not_found(sessions: sessionmaker[Session]) -> None:
    service = FollowupService(sessions)
    with pytest.raises(NotFound):
        service.get_plan("T1")
    service.put_plan("T1", plan(endpoint=None), "dm")
    with pytest.raises(NotFound, match="no endpoint"):
        service.endpoint_counts("T1")


@given(
    trials=st.lists(st.text("abcdefgh0123456789-", min_size=1, max_size=12), min_size=2,
                    max_size=5, unique=True),
    patient=st.text("0123456789abcdef", min_size=8, max_size=32),
)  # fmt: skip
def test_trial_pseudonyms_differ_between_trials_and_are_stable(
    trials: list[str], patient: str
) -> None:
    names = [trial_pseudonym(SECRET, t, patient) for t in trials]
    assert len(set(names)) == len(names)
    assert names == [trial_pseudonym(SECRET, t, patient) for t in trials]
    assert all(patient not in n for n in names if len(patient) > 8)
