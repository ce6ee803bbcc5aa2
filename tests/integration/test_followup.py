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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from concierge.routes.followup import build_router as followup_router
from core.auth import issue
from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.service import build_ingestor
from followup.consumer import FollowupConsumer
from followup.db import upgrade
from followup.engine import FollowupEngine
from followup.progress import ConsumerProgress
from followup.pseudonym import trial_pseudonym
from followup.relay import Relay, trial_topic
from followup.service import FollowupService
from followup.tables import ConsumerBeat, SafetyEvent, TrialCursor
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

TOKEN_KEY = b"a-test-token-key-for-follow-up-routes-32b"
#: "Within seconds" on a quiet machine; CI runs this beside the chaos suite on two cores, where
#: the feed took over 15 s twice (clean-clone CI, stop 26). The latency is bench_followup's figure.
FEED_SECONDS = 45.0


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


def _start_service(
    settings: Settings, database: str, tmp_path: Path, level: str = "WARNING"
) -> subprocess.Popen[bytes]:
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
        [sys.executable, "-m", "concierge", "followup", "--log-level", level],
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


def _api(sessions: sessionmaker[Session], settings: Settings, progress: ConsumerProgress
         ) -> TestClient:  # fmt: skip
    """The follow-up routes on a bare app over the test's database and the real broker."""
    app = FastAPI()
    app.include_router(followup_router())
    app.state.token_key = TOKEN_KEY
    app.state.followup = FollowupService(sessions)
    app.state.followup_progress = progress
    return TestClient(app)


def test_the_routes_say_when_the_consumer_is_behind_or_down(
    settings: Settings, sessions: sessionmaker[Session], database: str, tmp_path: Path
) -> None:
    """No silent stale answers: with ``concierge followup`` never started the routes answer 503;
    running and caught up, complete; SIGSTOPped while facts arrive, ``partial`` with the lag,
    then 503 once its heartbeat is too old; SIGCONTinued, it catches up and the flag clears."""
    ingestor = build_ingestor(settings)
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    FollowupService(sessions).put_plan("TS", plan(), "dm")
    ingest(ingestor, patient("s1", "9000000041"))
    enrol(sessions, "TS", site_pseudonym(ingestor, "s1", "9000000041"))
    ingest(ingestor, consent("cs", "s1", ["TS"]))
    progress = ConsumerProgress(
        sessions, bootstrap, prefix, max_lag_seconds=1.0, down_after_seconds=6.0
    ).start()
    client = _api(sessions, settings, progress)
    dm = {"Authorization": "Bearer " + issue(TOKEN_KEY, "trial_data_manager", "Acme",
                                              trials=("TS",))}  # fmt: skip
    safety = {"Authorization": "Bearer " + issue(TOKEN_KEY, "safety_contact", "Acme",
                                                  trials=("TS",))}  # fmt: skip
    feed, events = "/v1/followup/trials/TS/feed", "/v1/followup/trials/TS/safety-events"

    # -- never started: 503 with Retry-After, and why
    response = client.get(feed, headers=dm)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    assert "never run" in response.text
    assert client.get(events, headers=safety).status_code == 503
    assert client.post("/v1/followup/trials/TS/$export", headers=dm).status_code == 503

    service = _start_service(settings, database, tmp_path)
    try:

        def answer(url: str, headers: dict[str, str]) -> dict[str, Any] | None:
            got = client.get(url, headers=headers)
            return got.json() if got.status_code == 200 else None

        def complete() -> dict[str, Any] | None:
            body = answer(feed, dm)
            return body if body is not None and body["partial"] is False else None

        body = wait_for(complete, FEED_SECONDS, "a complete feed")
        assert body["lag"] == 0 and body["as_of"] is not None
        assert [e["type"] for e in body["entries"]] == ["started"]
        high = body["consumer"]["high_watermarks"]
        assert high and body["consumer"]["offsets"] == high
        assert body["consumer"]["committed_at"] is not None

        # -- stopped while facts arrive: partial, with how far behind and as of when
        service.send_signal(signal.SIGSTOP)
        ingest(ingestor, adverse_event("ae-s", "s1"), condition("cond-s", "s1", "44054006"))

        def partial() -> dict[str, Any] | None:
            body = answer(feed, dm)
            return body if body is not None and body["partial"] and body["lag"] else None

        body = wait_for(partial, FEED_SECONDS, "the feed to say it is partial")
        assert body["lag"] >= 1 and sum(body["consumer"]["lags"].values()) == body["lag"]
        assert [e["type"] for e in body["entries"]] == ["started"]  # what it has, flagged
        stale_as_of = body["as_of"]
        assert stale_as_of is not None
        events_body = client.get(events, headers=safety).json()
        assert events_body["events"] == [] and events_body["partial"] is True

        # -- its heartbeat ages: down, 503 with Retry-After
        def down() -> bool:
            got = client.get(feed, headers=dm)
            return got.status_code == 503 and "down" in got.text

        wait_for(down, FEED_SECONDS, "the feed to say the consumer is down")
        response = client.get(events, headers=safety)
        assert response.status_code == 503 and response.headers["Retry-After"]

        # -- resumed: it catches up and the flag clears
        service.send_signal(signal.SIGCONT)
        body = wait_for(
            lambda: (b := complete()) is not None and len(b["entries"]) >= 4 and b,
            FEED_SECONDS, "the feed to catch up",
        )  # fmt: skip
        assert [e["type"] for e in body["entries"]] == ["started", "fact", "safety", "fact"]
        assert body["lag"] == 0 and body["as_of"] > stale_as_of
        events_body = client.get(events, headers=safety).json()
        assert events_body["partial"] is False and len(events_body["events"]) == 1
    finally:
        service.send_signal(signal.SIGCONT)
        service.send_signal(signal.SIGTERM)
        service.wait(60)
        progress.stop()
        ingestor.vault.close()


def test_a_consent_period_that_ends_withdraws_once_across_restarts(
    settings: Settings, sessions: sessionmaker[Session], database: str, tmp_path: Path
) -> None:
    """The end of a consent's period withdraws the participant with no new event of theirs,
    once: ``concierge followup`` SIGKILLed before the end and again after the withdrawal, the
    trial's feed and topic hold one ``withdrawn``, and nothing of the participant after it."""
    ingestor = build_ingestor(settings)
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    service_api = FollowupService(sessions)
    service_api.put_plan("TP", plan(), "dm")
    ingest(ingestor, patient("e1", "9000000058"))
    e1 = site_pseudonym(ingestor, "e1", "9000000058")
    enrol(sessions, "TP", e1)

    def heartbeat() -> bool:
        with sessions() as session:
            return session.scalar(sa.select(sa.func.count()).select_from(ConsumerBeat)) == 1

    def types() -> list[str]:
        return [e["type"] for e in service_api.feed("TP", 0, 100)["entries"]]

    def waited(predicate: Any, timeout: float, what: str) -> Any:
        try:
            return wait_for(predicate, timeout, what)
        except AssertionError as exc:  # what the service said, for a failure on a busy machine
            said = (tmp_path / "followup.log").read_text(errors="replace")[-4000:]
            raise AssertionError(
                f"{exc}; feed {types()}; concierge followup said:\n{said}"
            ) from None

    def start() -> subprocess.Popen[bytes]:
        return _start_service(settings, database, tmp_path, "INFO")

    service = start()
    try:
        wait_for(heartbeat, 60, "concierge followup to run")
        end = datetime.now(UTC) + timedelta(seconds=6)
        limited = consent("ce", "e1", ["TP"])
        limited["provision"]["period"] = {  # type: ignore[index]
            "start": "2026-01-01T00:00:00Z",
            "end": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        ingest(ingestor, limited, condition("cond-e1", "e1", "44054006"))
        waited(lambda: types() == ["started", "fact"], FEED_SECONDS, "follow-up to start")
        assert datetime.now(UTC) < end, "the machine was too slow for this test's period"
        service.send_signal(signal.SIGKILL)  # before the end
        service.wait(30)
        service = start()
        waited(
            lambda: "withdrawn" in types(),
            FEED_SECONDS * 3,
            "the period's end (a restart on a busy machine)",
        )
        (withdrawn,) = [e for e in service_api.feed("TP", 0, 100)["entries"]
                        if e["type"] == "withdrawn"]  # fmt: skip
        assert "period" in withdrawn["reason"]
        assert datetime.fromisoformat(withdrawn["at"]) >= end.replace(microsecond=0)
        service.send_signal(signal.SIGKILL)  # after the withdrawal
        service.wait(30)
        service = start()
        ingest(ingestor, condition("cond-e2", "e1", "38341003"))  # after the end: not forwarded
        topic = trial_topic("TP", prefix)
        waited(lambda: len(read_topic(bootstrap, topic)) >= 3, FEED_SECONDS, "the relay")
        progress = ConsumerProgress(sessions, bootstrap, prefix, max_lag_seconds=1.0).start()
        try:
            seen: list[Any] = []
            waited(lambda: seen.append(progress.standing()) or not seen[-1].partial,
                   FEED_SECONDS * 2, "the consumer to catch up")  # fmt: skip
        finally:
            progress.stop()
        time.sleep(3.0)  # a few more rounds of the timer
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)
        ingestor.vault.close()
    assert types() == ["started", "fact", "withdrawn"]
    assert [r.body["type"] for r in read_topic(bootstrap, topic)] == types()


def test_several_instances_share_the_partitions_exactly_once(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """Two consumers in one group (``CONCIERGE_FOLLOWUP_GROUP``) split the facts topic's
    partitions, each seeking to the database's offsets when given one; when one leaves, the
    other takes its partitions over from those offsets: every fact reaches the feed once."""
    ingestor = build_ingestor(settings)
    bootstrap, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    FollowupService(sessions).put_plan("TG", plan(), "dm")
    people = [(f"g{i}", f"90000002{i:02d}") for i in range(8)]
    ingest(ingestor, *(patient(pid, nhs) for pid, nhs in people))
    for pid, nhs in people:
        enrol(sessions, "TG", site_pseudonym(ingestor, pid, nhs))
    ingest(ingestor, *(consent(f"c-{pid}", pid, ["TG"]) for pid, _ in people))
    group = f"{prefix}followup-group"

    def instance(name: str) -> FollowupConsumer:
        engine = FollowupEngine(SECRET, "https://concierge.example")
        return FollowupConsumer(sessions, engine, bootstrap, prefix, batch_size=3, name=name,
                                group=group)  # fmt: skip

    def facts() -> list[str]:
        entries = FollowupService(sessions).feed("TG", 0, 1000)["entries"]
        return [e["resource"]["id"] for e in entries if e["type"] == "fact"]

    first, second = instance("a"), instance("b")
    first.start()
    second.start()
    total = len(first.consumer.list_topics(first.topic, timeout=10).topics[first.topic].partitions)
    with running(first.run):
        with running(second.run):
            wait_for(
                lambda: first.assigned() and second.assigned()
                and len(first.assigned()) + len(second.assigned()) == total,
                60, "both instances to hold partitions",
            )  # fmt: skip
            assert not set(first.assigned()) & set(second.assigned())
            for n in range(16):
                ingest(ingestor, condition(f"cond-{n}", people[n % 8][0], "44054006"))
            wait_for(lambda: len(facts()) >= 16, 60, "16 facts")
        second.close()  # leaves the group: the first takes its partitions over
        wait_for(lambda: len(first.assigned()) == total, 60, "one instance with every partition")
        for n in range(16, 24):
            ingest(ingestor, condition(f"cond-{n}", people[n % 8][0], "44054006"))
        wait_for(lambda: len(facts()) >= 24, 60, "24 facts")
        time.sleep(2.0)  # anything read twice would show by now
    first.close()
    ingestor.vault.close()
    assert sorted(facts()) == sorted(f"cond-{n}" for n in range(24)), "each fact once"
    entries = FollowupService(sessions).feed("TG", 0, 1000)["entries"]
    assert sum(1 for e in entries if e["type"] == "started") == 8
