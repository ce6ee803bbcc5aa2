"""Helpers for follow-up tests: FHIR resources, enrolment rows, a stack of consumer and relay."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy.orm import Session, sessionmaker

from followup.plans import Plan
from recruitment.lifecycle import InvitationState
from recruitment.models import Candidate, Invitation, Trial

NHS = "https://fhir.nhs.uk/Id/nhs-number"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"
SECRET = b"a-test-follow-up-secret-of-32-bytes-or-more"


def patient(pid: str, nhs: str, family: str = "Testperson") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00Z"},
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"family": family, "given": ["Alex"]}],
        "gender": "female",
        "birthDate": "1961-04-12",
        "address": [{"postalCode": "SW1A 1AA"}],
    }


def consent(
    cid: str, pid: str, trials: list[str], status: str = "active", version: str = "1",
    decision: str = "permit",
) -> dict[str, Any]:  # fmt: skip
    return {
        "resourceType": "Consent",
        "id": cid,
        "meta": {"versionId": version},
        "status": status,
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2026-01-02T00:00:00Z",
        "provision": {
            "type": decision,
            "period": {"start": "2026-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"},
            "data": [
                {"meaning": "related", "reference": {"reference": f"ResearchStudy/{t}"}}
                for t in trials
            ],
        },
    }


def condition(rid: str, pid: str, code: str, version: str = "1", status: str = "confirmed"
              ) -> dict[str, Any]:  # fmt: skip
    return {
        "resourceType": "Condition",
        "id": rid,
        "meta": {"versionId": version},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": status,
                }
            ]
        },
        "code": {"coding": [{"system": SNOMED, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "onsetDateTime": "2026-02-01",
    }


def adverse_event(rid: str, pid: str, code: str = "62315008") -> dict[str, Any]:
    return {
        "resourceType": "AdverseEvent",
        "id": rid,
        "meta": {"versionId": "1"},
        "actuality": "actual",
        "event": {"coding": [{"system": SNOMED, "code": code}]},
        "seriousness": {"coding": [{"system": SERIOUSNESS, "code": "serious"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "date": "2026-02-03T10:00:00Z",
    }


def plan(**changes: Any) -> Plan:
    base: dict[str, Any] = {
        "scope": ["condition", "observation", "adverse_event", "death"],
        "outcomes": [
            {"name": "SAE", "kind": "serious_adverse_event"},
            {"name": "MI", "kind": "coded", "codes": [{"system": "snomed", "code": "22298006"}]},
            {
                "name": "ALT > 3x ULN",
                "kind": "lab_threshold",
                "codes": [{"system": "loinc", "code": "1742-6"}],
                "uln": 40,
                "unit": "U/L",
                "times_uln": 3,
            },
        ],
        "safety_contact": {"channel": "email", "address": "safety@trial.example"},
        "endpoint": "MI",
    }
    base.update(changes)
    return Plan.model_validate(base)


def enrol(sessions: sessionmaker[Session], trial_id: str, patient: str, at: datetime | None = None
          ) -> str:  # fmt: skip
    """A trial (if new), a candidate and an invitation in state enrolled; the invitation id."""
    at = at or datetime.now(UTC)
    with sessions.begin() as session:
        if session.get(Trial, trial_id) is None:
            session.add(Trial(id=trial_id, version=1, title=trial_id, sponsor="Acme",
                              status="active", target=None, registered_at=at,
                              updated_at=at))  # fmt: skip
            session.flush()
        candidate = Candidate(
            id=str(uuid.uuid4()), trial_id=trial_id, patient=patient, site="RA3",
            status="closed", routed_to="urn:test:ehr|Practitioner|gp", routing_via="gp",
            routing_reason="test", held_reasons=[], arrival=int(time.time() * 1000),
            created_at=at, updated_at=at,
        )  # fmt: skip
        session.add(candidate)
        session.flush()
        invitation = Invitation(
            id=str(uuid.uuid4()), candidate_id=candidate.id, trial_id=trial_id, patient=patient,
            site="RA3", practitioner="urn:test:ehr|Practitioner|gp",
            state=InvitationState.ENROLLED.value, active=False, created_at=at,
            state_changed_at=at, contacted_at=at, closed_at=at,
        )  # fmt: skip
        session.add(invitation)
        return invitation.id


@dataclass
class TopicRecord:
    key: str
    seq: int
    body: dict[str, Any]


def read_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> list[TopicRecord]:
    """Every committed record of a one-partition topic, read to its end."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4()}",
        "enable.auto.commit": False, "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })  # fmt: skip
    out: list[TopicRecord] = []
    try:
        if topic not in consumer.list_topics(timeout=10).topics:
            return []
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == -191:
                    break
                raise RuntimeError(str(message.error()))
            headers = dict(message.headers() or [])
            out.append(TopicRecord((message.key() or b"").decode(), int(headers["seq"]),
                                   json.loads(message.value() or b"{}")))  # fmt: skip
    finally:
        consumer.close()
    return out


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "a condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def running(target: Any, *args: Any) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop, *args), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)


def participants(sessions: sessionmaker[Session]) -> list[Any]:
    from followup.tables import Participant

    with sessions() as session:
        return list(session.scalars(sa.select(Participant)).all())
