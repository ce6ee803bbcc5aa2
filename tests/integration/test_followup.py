"""Issue 19's acceptance on the real broker and PostgreSQL: follow-up of enrolled participants.

FHIR resources go through the real adapters onto the facts topic; the follow-up consumer and
relay run in this process over a PostgreSQL schema of their own (the recruitment tables
beside the follow-up ones); the trials' topics are read back from the broker.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.service import build_ingestor
from followup.consumer import FollowupConsumer
from followup.db import upgrade
from followup.engine import FollowupEngine
from followup.pseudonym import trial_pseudonym
from followup.relay import Relay, trial_topic
from followup.service import FollowupService
from followup.tables import SafetyEvent, TrialCursor
from recruitment.models import OutboxMessage
from tests.followup_helpers import (
    NHS,
    SECRET,
    adverse_event,
    condition,
    consent,
    enrol,
    patient,
    plan,
    read_topic,
    running,
    wait_for,
)
from tests.recruitment_helpers import SOURCE, fresh_database

FEED_SECONDS = 15.0  # "within seconds", with room for a loaded shared machine


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path, migrate=False) as url:
        upgrade(url)
        yield url


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system=SOURCE,
    )


@pytest.fixture
def sessions(database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database)
    yield make_sessionmaker(engine)
    engine.dispose()


def ingest(ingestor: Ingestor, *resources: dict[str, object]) -> None:
    for resource in resources:
        outcome = ingestor.ingest_resource(resource, "test")
        assert outcome.status in ("accepted", "unchanged"), outcome
    ingestor.commit()


def site_pseudonym(ingestor: Ingestor, pid: str, nhs: str) -> str:
    return ingestor.pseudonymiser.for_patient([f"{NHS}|{nhs}"], SOURCE, pid)


def test_enrolled_participant_is_followed_up_with_consent_and_withdrawal_stops_it(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    ingestor = build_ingestor(settings)
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    service = FollowupService(sessions)
    service.put_plan("T1", plan(), "dm")
    service.put_plan("T2", plan(), "dm")

    ingest(ingestor, patient("p1", "9000000009"), patient("p2", "9000000017", "Other"),
           patient("p3", "9000000025", "Sentinel"))  # fmt: skip
    p1 = site_pseudonym(ingestor, "p1", "9000000009")
    p3 = site_pseudonym(ingestor, "p3", "9000000025")
    enrol(sessions, "T1", p1)
    enrol(sessions, "T2", p1)
    enrol(sessions, "T1", p3)  # a second participant of T1: the sentinel after withdrawal
    # p2 is not enrolled anywhere
    ingest(ingestor, consent("c1", "p1", ["T1", "T2"]), consent("c3", "p3", ["T1"]))

    engine = FollowupEngine(SECRET, "https://concierge.example")
    consumer = FollowupConsumer(sessions, engine, bootstrap, prefix, batch_size=200)
    consumer.start()
    relay = Relay(sessions, bootstrap, prefix, transactional_id=f"{prefix}relay")
    relay.start()
    t1, t2 = trial_topic("T1", prefix), trial_topic("T2", prefix)
    with running(consumer.run), running(relay.run, 0.1):
        # -- new facts reach the trial's feed within seconds, pseudonymised, without identity
        sent = time.monotonic()
        ingest(ingestor, condition("cond-1", "p1", "44054006"),
               condition("cond-2", "p2", "44054006"))  # fmt: skip
        records = wait_for(
            lambda: [r for r in read_topic(bootstrap, t1) if r.body["type"] == "fact"],
            FEED_SECONDS, "the condition on T1's topic",
        )  # fmt: skip
        assert time.monotonic() - sent < FEED_SECONDS
        pseudonym_t1 = trial_pseudonym(SECRET, "T1", p1)
        (fact,) = records
        assert fact.key == pseudonym_t1 == fact.body["participant"]
        assert fact.body["resource"]["id"] == "cond-1" and fact.body["resource"]["version"] == "1"
        assert fact.body["facts"][0]["codes"][0]["code"] == "44054006"
        raw = str([r.body for r in read_topic(bootstrap, t1)])
        for identity in ("9000000009", "Testperson", "1961-04-12", "SW1A", p1, "cond-2"):
            assert identity not in raw
        started = [r for r in read_topic(bootstrap, t1) if r.body["type"] == "started"]
        assert {r.key for r in started} == {pseudonym_t1, trial_pseudonym(SECRET, "T1", p3)}

        # -- a second trial sees the same patient under a different pseudonym
        t2_facts = wait_for(
            lambda: [r for r in read_topic(bootstrap, t2) if r.body["type"] == "fact"],
            FEED_SECONDS, "the condition on T2's topic",
        )  # fmt: skip
        assert t2_facts[0].key == trial_pseudonym(SECRET, "T2", p1) != pseudonym_t1
        assert t2_facts[0].body["resource"]["id"] == "cond-1"

        # -- a corrected resource: a retraction of the old version, then the new one
        ingest(ingestor, condition("cond-1", "p1", "73211009", version="2"))
        wait_for(lambda: len(read_topic(bootstrap, t1)) >= 5, FEED_SECONDS, "the correction")
        tail = [r.body for r in read_topic(bootstrap, t1)][-2:]
        assert tail[0]["type"] == "retraction"
        assert tail[0]["resource"]["key"] == f"{SOURCE}|Condition|cond-1"
        assert tail[0]["resource"]["seq"] == 1
        assert tail[1]["type"] == "fact" and tail[1]["resource"]["version"] == "2"
        assert tail[1]["facts"][0]["codes"][0]["code"] == "73211009"

        # -- withdrawal stops the feed at once and is itself an event
        ingest(ingestor, consent("c1", "p1", ["T1", "T2"], status="inactive", version="2"))
        withdrawn = wait_for(
            lambda: [r for r in read_topic(bootstrap, t1) if r.body["type"] == "withdrawn"],
            FEED_SECONDS, "the withdrawal on T1's topic",
        )  # fmt: skip
        assert withdrawn[0].key == pseudonym_t1
        assert "consent" in withdrawn[0].body["reason"]
        wait_for(
            lambda: [r for r in read_topic(bootstrap, t2) if r.body["type"] == "withdrawn"],
            FEED_SECONDS, "the withdrawal on T2's topic",
        )  # fmt: skip
        ingest(
            ingestor,
            condition("cond-4", "p1", "38341003"),
            condition("cond-1", "p1", "73211009", version="3", status="entered-in-error"),
        )
        ingest(ingestor, condition("cond-5", "p3", "38341003"))  # fmt: skip
        wait_for(
            lambda: any(r.body.get("resource", {}).get("id") == "cond-5"
                        for r in read_topic(bootstrap, t1)),
            FEED_SECONDS, "the sentinel participant's fact",
        )  # fmt: skip
        wait_for(lambda: consumer.readiness().caught_up, FEED_SECONDS, "the consumer to catch up")
        wait_for(lambda: relay.publish_once() == 0, FEED_SECONDS, "the relay to drain")
        after = [r.body for r in read_topic(bootstrap, t1) if r.key == pseudonym_t1]
        assert after[-1]["type"] == "withdrawn", "nothing of a withdrawn participant follows"
        assert not any(r.body.get("resource", {}).get("id") == "cond-4"
                       for r in read_topic(bootstrap, t2))  # fmt: skip

    # The API's cursor pages give the same entries as the topic, in the same order.
    topic_bodies = [r.body for r in read_topic(bootstrap, t1)]
    pages, after_seq = [], 0
    while True:
        page = service.feed("T1", after_seq, 3)
        pages.extend(page["entries"])
        after_seq = page["next"]
        if not page["more"]:
            break
    assert pages == topic_bodies
    assert [b["seq"] for b in topic_bodies] == list(range(1, len(topic_bodies) + 1))
    consumer.close()
    relay.close()
    ingestor.vault.close()


def test_a_research_opt_out_withdraws_and_safety_events_notify_once(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    ingestor = build_ingestor(settings)
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    FollowupService(sessions).put_plan("T9", plan(), "dm")
    ingest(ingestor, patient("q1", "9000000033"))
    q1 = site_pseudonym(ingestor, "q1", "9000000033")
    enrol(sessions, "T9", q1)
    ingest(ingestor, consent("cq", "q1", ["T9"]))
    engine = FollowupEngine(SECRET, "https://concierge.example")
    consumer = FollowupConsumer(sessions, engine, bootstrap, prefix)
    consumer.start()
    with running(consumer.run):
        ingest(ingestor, adverse_event("ae-1", "q1"))
        # a corrected version that is still serious: no second safety event
        corrected = adverse_event("ae-1", "q1") | {"meta": {"versionId": "2"}}
        ingest(ingestor, corrected | {"date": "2026-02-04T10:00:00Z"})
        wait_for(lambda: consumer.total.safety >= 1, FEED_SECONDS, "the safety event")
        # a research opt-out (a second Consent, deny) withdraws at once
        ingest(
            ingestor,
            {**consent("optout", "q1", [], decision="deny"), "provision": {"type": "deny"}},
        )
        wait_for(lambda: consumer.total.withdrawn >= 1, FEED_SECONDS, "the withdrawal")
        ingest(ingestor, adverse_event("ae-2", "q1"))
        wait_for(lambda: consumer.readiness().caught_up, FEED_SECONDS, "the consumer to catch up")
    consumer.close()
    ingestor.vault.close()
    with sessions() as session:
        events = session.scalars(sa.select(SafetyEvent)).all()
        rows = session.scalars(sa.select(OutboxMessage).where(OutboxMessage.kind == "safety")).all()
    assert [(e.outcome, e.key.rsplit("|", 1)[1], e.status) for e in events] == [
        ("SAE", "ae-1", "notified")
    ]
    (row,) = rows
    assert row.recipient == "safety@trial.example"
    assert q1 not in row.body and "9000000033" not in row.body
    assert row.payload["participant"] == trial_pseudonym(SECRET, "T9", q1)
    feed = FollowupService(sessions).feed("T9", 0, 100)["entries"]
    assert [e["type"] for e in feed] == ["started", "fact", "safety", "retraction", "fact",
                                         "withdrawn"]  # fmt: skip
    assert feed[-1]["reason"] == "research opt-out"


def _start_service(settings: Settings, database: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONCIERGE_TOPIC_PREFIX": settings.topic_prefix,
        "CONCIERGE_HOME": str(settings.home),
        "CONCIERGE_RECRUITMENT_URL": database,
        "CONCIERGE_FOLLOWUP_SECRET": SECRET.decode(),
        "CONCIERGE_FOLLOWUP_STATUS_PORT": "0",
        "CONCIERGE_FOLLOWUP_BATCH_SIZE": "5",  # small batches: kills land between them too
    }
    log = (tmp_path / "followup.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "concierge", "followup", "--log-level", "WARNING"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_a_serious_adverse_event_notifies_exactly_once_across_sigkills(
    settings: Settings, sessions: sessionmaker[Session], database: str, tmp_path: Path
) -> None:
    """``concierge followup`` is SIGKILLed three times while serious adverse events arrive; each
    event is notified exactly once, and the trial's topic holds the feed exactly once, in
    order."""
    ingestor = build_ingestor(settings)
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    FollowupService(sessions).put_plan("TK", plan(), "dm")
    people = [(f"k{i}", f"90000001{i:02d}") for i in range(4)]
    ingest(ingestor, *(patient(pid, nhs) for pid, nhs in people))
    for pid, nhs in people:
        enrol(sessions, "TK", site_pseudonym(ingestor, pid, nhs))
    ingest(ingestor, *(consent(f"c-{pid}", pid, ["TK"]) for pid, _ in people))
    events = 40
    rng = random.Random(20261207)
    service = _start_service(settings, database, tmp_path)
    kills = 0
    try:
        for n in range(events):
            pid = people[n % len(people)][0]
            ingest(ingestor, adverse_event(f"sae-{n}", pid),
                   condition(f"cond-{n}", pid, "44054006"))  # fmt: skip
            time.sleep(rng.uniform(0.02, 0.15))
            if n in (8, 20, 31):
                time.sleep(rng.uniform(0.0, 0.5))
                service.send_signal(signal.SIGKILL)
                service.wait(30)
                kills += 1
                service = _start_service(settings, database, tmp_path)

        def safety_rows() -> int:
            with sessions() as session:
                return int(session.scalar(sa.select(sa.func.count()).select_from(SafetyEvent)) or 0)

        wait_for(lambda: safety_rows() == events, 120, f"{events} safety events")
        with sessions() as session:
            written = session.scalar(
                sa.select(TrialCursor.written).where(TrialCursor.trial_id == "TK")
            )
        assert written is not None
        topic = trial_topic("TK", prefix)
        wait_for(lambda: len(read_topic(bootstrap, topic)) >= written, 120, "the relay")
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
    ingestor.vault.close()
    assert kills == 3
    with sessions() as session:
        notified = session.scalars(
            sa.select(OutboxMessage.dedupe_key).where(OutboxMessage.kind == "safety")
        ).all()
        safety = session.scalars(sa.select(SafetyEvent.key)).all()
    expected = {f"{SOURCE}|AdverseEvent|sae-{n}" for n in range(events)}
    assert sorted(safety) == sorted(expected)  # one each
    assert len(notified) == events == len(set(notified))
    records = read_topic(bootstrap, topic)
    assert [r.seq for r in records] == list(range(1, written + 1)), "each entry once, in order"
    assert [r.body for r in records] == FollowupService(sessions).feed("TK", 0, 1000)["entries"]
    facts = [r.body["resource"]["id"] for r in records if r.body["type"] == "fact"]
    assert sorted(facts) == sorted({*(f"sae-{n}" for n in range(events)),
                                    *(f"cond-{n}" for n in range(events))})  # fmt: skip
