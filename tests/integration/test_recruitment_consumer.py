"""The recruitment consumer on the real broker: exactly-once effect across crashes and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Message, Producer, TopicPartition

from infra.topics import COHORT, FACTS, REFERENCE, TRIALS
from recruitment.consumer import RecruitmentConsumer
from recruitment.models import (
    Candidate,
    CohortMembership,
    ConsumerOffset,
    Invitation,
    InvitationEvent,
    OutboxMessage,
    SkippedMessage,
)
from recruitment.notify import MemoryChannel
from recruitment.runtime import Runtime, build_runtime
from recruitment.service import UnitOfWork
from recruitment.settings import RecruitmentSettings
from tests.faults import free_port
from tests.recruitment_helpers import (
    BACKENDS,
    Clock,
    as_json,
    cohort,
    consent_facts,
    fresh_database,
    patient_facts,
    practitioner,
    practitioner_key,
    trial,
)

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
GP = practitioner_key("gp1")
PATIENTS = [f"p-{i:02d}" for i in range(40)]
OPTED_OUT = "p-05"
LEAVERS = ("p-01", "p-02", "p-03")


class Crash(BaseException):
    """Stands for the process dying: nothing in the consumer catches it."""


@dataclass
class Topics:
    bootstrap: str
    prefix: str

    def produce(self, messages: list[tuple[str, str | None, bytes | None]]) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})
        for topic, key, value in messages:
            producer.produce(
                self.prefix + topic, key=key.encode() if key is not None else None, value=value
            )
        assert producer.flush(30) == 0

    def setup_messages(self) -> list[tuple[str, str | None, bytes | None]]:
        """The trial, the GP, and every patient's facts (some in fact batches)."""
        messages: list[tuple[str, str | None, bytes | None]] = [
            (TRIALS, "t1", as_json(trial())),
            (REFERENCE, GP, as_json(practitioner("gp1"))),
        ]
        for i, patient in enumerate(PATIENTS):
            envelopes = [patient_facts(patient, gps=[GP])]
            if patient == OPTED_OUT:
                envelopes.append(consent_facts(patient))
            if i % 2:
                batch = {
                    "schema": "concierge.factbatch/1",
                    "patient": patient,
                    "envelopes": [json.loads(e.to_json()) for e in envelopes],
                }
                messages.append((FACTS, patient, json.dumps(batch).encode()))
            else:
                messages += [(FACTS, patient, e.to_json()) for e in envelopes]
        return messages

    def cohort_messages(self) -> list[tuple[str, str | None, bytes | None]]:
        """Entries for everyone, replays, leavers, bookkeeping, one unreadable message."""
        messages: list[tuple[str, str | None, bytes | None]] = []
        for patient in PATIENTS:
            messages.append((COHORT, f"t1|{patient}", as_json(cohort("t1", patient, 1))))
        for patient in PATIENTS[:10]:  # replays of the same change
            messages.append((COHORT, f"t1|{patient}", as_json(cohort("t1", patient, 1))))
        for patient in LEAVERS:
            record = cohort("t1", patient, 2, member=False)
            messages.append((COHORT, f"t1|{patient}", as_json(record)))
        messages.append((COHORT, "\u0000watermark|0", b'{"stream_time": 1, "facts_offset": 5}'))
        messages.append((COHORT, "t1|p-bad", b"{not json"))
        return messages


@pytest.fixture
def topics(kafka_bootstrap: str, topic_prefix: str) -> Topics:
    return Topics(kafka_bootstrap, topic_prefix)


def _runtime(url: str, notify: bool = True) -> Runtime:
    channels = {"email": MemoryChannel()} if notify else {}
    return build_runtime(RecruitmentSettings(url=url), url=url, channels=channels, clock=Clock())


def _consumer(
    runtime: Runtime, topics: Topics, group: str, cls: type[RecruitmentConsumer] | None = None
) -> RecruitmentConsumer:
    return (cls or RecruitmentConsumer)(
        runtime.service,
        topics.bootstrap,
        prefix=topics.prefix,
        group=group,
        batch_size=10,
        poll_timeout=0.1,
        config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
    )


def _consume_until_idle(consumer: RecruitmentConsumer, idle: float = 0.5) -> None:
    try:
        consumer.run(idle_exit=idle)
    finally:
        consumer.close()


def _state(runtime: Runtime) -> dict[str, Any]:
    with runtime.sessions() as session:

        def count(model: Any, *where: Any) -> int:
            query = sa.select(sa.func.count()).select_from(model).where(*where)
            return int(session.scalar(query) or 0)

        statuses = dict(session.execute(sa.select(Candidate.patient, Candidate.status)).all())
        invitations = session.execute(sa.select(Invitation.patient, Invitation.state)).all()
        return {
            "candidates": count(Candidate),
            "statuses": statuses,
            "invitations": sorted(invitations),
            "events": count(InvitationEvent),
            "alerts": count(OutboxMessage, OutboxMessage.kind == "alert"),
            "pending_alerts": count(OutboxMessage, OutboxMessage.failed_at.is_(None)),
            "skipped": count(SkippedMessage),
            "members": count(CohortMembership, CohortMembership.member.is_(True)),
        }


def _assert_exactly_once(state: dict[str, Any], notify: bool = True) -> None:
    assert state["candidates"] == len(PATIENTS)
    expected = {p: "invited" for p in PATIENTS}
    expected[OPTED_OUT] = "excluded"
    expected.update({p: "withdrawn" for p in LEAVERS})
    assert state["statuses"] == expected
    invited = sorted(set(PATIENTS) - {OPTED_OUT})
    assert [p for p, _ in state["invitations"]] == invited  # one invitation each, no more
    # with a channel an invitation waits for its alert; without, it is shown in the app at once
    waiting = "proposed" if notify else "sent_to_clinician"
    assert dict(state["invitations"]) == {
        p: ("withdrawn" if p in LEAVERS else waiting) for p in invited
    }
    per_invitation = 1 if notify else 2  # proposed (and sent_to_clinician)
    assert state["events"] == per_invitation * len(invited) + len(LEAVERS)
    if notify:
        assert state["alerts"] == len(invited)  # one per invitation, however often replayed
        assert state["pending_alerts"] == len(invited) - len(LEAVERS)  # leavers' cancelled
    else:
        assert state["alerts"] == 0
    assert state["skipped"] == 1  # the unreadable message, recorded once
    assert state["members"] == len(PATIENTS) - len(LEAVERS)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def test_a_crash_mid_batch_loses_nothing_and_applies_nothing_twice(
    topics: Topics, db_url: str
) -> None:
    group = f"recruitment-{uuid.uuid4().hex[:8]}"
    runtime = _runtime(db_url)
    try:
        topics.produce(topics.setup_messages())
        _consume_until_idle(_consumer(runtime, topics, group))
        assert _state(runtime)["candidates"] == 0  # no cohort yet

        topics.produce(topics.cohort_messages())

        class CrashesMidBatch(RecruitmentConsumer):
            seen = 0

            def apply(self, work: UnitOfWork, kind: str, message: Message) -> bool:
                CrashesMidBatch.seen += 1
                if CrashesMidBatch.seen == 25:  # the 5th message of the 3rd batch of 10
                    raise Crash
                return super().apply(work, kind, message)

        crashing = _consumer(runtime, topics, group, CrashesMidBatch)
        with pytest.raises(Crash):
            _consume_until_idle(crashing, idle=10)
        partial = _state(runtime)["candidates"]
        assert 0 < partial < len(PATIENTS)  # two batches committed, the third rolled back

        _consume_until_idle(_consumer(runtime, topics, group))
        _assert_exactly_once(_state(runtime))

        # replaying the whole topic from the start (a new group) changes nothing either
        _consume_until_idle(_consumer(runtime, topics, f"{group}-replay"))
        _assert_exactly_once(_state(runtime))
    finally:
        runtime.close()


def test_a_crash_between_the_database_and_the_kafka_commit_resumes_from_the_database(
    topics: Topics, tmp_path: Path
) -> None:
    group = f"recruitment-{uuid.uuid4().hex[:8]}"
    with fresh_database("sqlite", tmp_path) as url:
        runtime = _runtime(url)
        try:
            topics.produce(topics.setup_messages())
            _consume_until_idle(_consumer(runtime, topics, group))
            messages = topics.cohort_messages()
            topics.produce(messages)
            with runtime.sessions() as session:
                start = sum(o for o in session.scalars(sa.select(ConsumerOffset.next_offset)))

            class DiesBeforeKafkaCommit(RecruitmentConsumer):
                commits = 0

                def commit_kafka(self, offsets: list[TopicPartition]) -> None:
                    DiesBeforeKafkaCommit.commits += 1
                    if DiesBeforeKafkaCommit.commits == 3:
                        raise Crash
                    super().commit_kafka(offsets)

            dying = _consumer(runtime, topics, group, DiesBeforeKafkaCommit)
            with pytest.raises(Crash):
                _consume_until_idle(dying, idle=10)
            with runtime.sessions() as session:
                stored = sum(o for o in session.scalars(sa.select(ConsumerOffset.next_offset)))
            read_before = stored - start  # the third batch is in the database, not in Kafka
            assert read_before > dying.total.messages

            resumed = _consumer(runtime, topics, group)
            _consume_until_idle(resumed)
            # resumed from the database's offsets: the third batch was not read again
            assert resumed.total.messages == len(messages) - read_before
            _assert_exactly_once(_state(runtime))
        finally:
            runtime.close()


def test_sigkill_mid_stream_then_restart_gives_exactly_once(topics: Topics, tmp_path: Path) -> None:
    group = f"recruitment-{uuid.uuid4().hex[:8]}"
    instance = f"recruitment-test-{uuid.uuid4().hex[:6]}"
    with fresh_database("sqlite", tmp_path) as url:
        setup = _runtime(url, notify=False)
        try:  # reference data and facts first (the topics are not ordered among themselves)
            topics.produce(topics.setup_messages())
            _consume_until_idle(_consumer(setup, topics, f"{group}-setup"))
        finally:
            setup.close()
        topics.produce(topics.cohort_messages())
        env = {
            **os.environ,
            "CONCIERGE_HOME": str(tmp_path / "home"),
            "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
            "CONCIERGE_TOPIC_PREFIX": topics.prefix,
            "CONCIERGE_RECRUITMENT_URL": url,
            "CONCIERGE_RECRUITMENT_CONSUMER_GROUP": group,
            "CONCIERGE_RECRUITMENT_INSTANCE_ID": instance,
            "CONCIERGE_RECRUITMENT_EMAIL_ENABLED": "false",
            "CONCIERGE_RECRUITMENT_STATUS_PORT": str(free_port()),
        }
        log = (tmp_path / "recruitment.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "concierge.commands.recruitment",
                "run",
                "--no-scheduler",
                "--no-migrate",
                "--batch-size",
                "1",
                "--idle-exit",
                "30",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        runtime = _runtime(url, notify=False)  # as the killed process (e-mail disabled)
        try:
            engine = sa.create_engine(url)  # plain reads, not queued behind the writer
            count = sa.select(sa.func.count()).select_from(Candidate)
            deadline = time.monotonic() + 30
            with engine.connect() as conn:
                while time.monotonic() < deadline and (conn.scalar(count) or 0) < 3:
                    conn.rollback()
                    assert process.poll() is None, (tmp_path / "recruitment.log").read_text()
                    time.sleep(0.005)
            engine.dispose()
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            killed_at = _state(runtime)["candidates"]
            assert 3 <= killed_at < len(PATIENTS), "killed too late to test anything"

            # the killed process's static membership: its partitions come back at once
            restarted = RecruitmentConsumer(
                runtime.service,
                topics.bootstrap,
                prefix=topics.prefix,
                group=group,
                batch_size=10,
                poll_timeout=0.1,
                config={"group.instance.id": instance},
            )
            _consume_until_idle(restarted)
            _assert_exactly_once(_state(runtime), notify=False)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
            runtime.close()
