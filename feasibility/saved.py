"""Saved questions: trials registered by sponsors, kept on the compacted trials topic.

The trials topic is the registry of record (``docs/reference/cohort-events.md``). The API
writes a new version of a trial's record for each registration, change or retirement and reads
the topic back into a :class:`SavedQuestions` view, so every API process agrees on the registry
and a restart loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from confluent_kafka import Message, Producer
from pydantic import BaseModel, ConfigDict, Field

from core.contracts.trials import TRIAL_ID_PATTERN, TrialRecord, TrialTerms
from core.db import NO_NUL
from infra.kafka_log import routed
from infra.mirror import ReaderStatus, TopicMirror

from .criteria import Question

log = logging.getLogger(__name__)


#: A site code as the recruitment store keeps it (``recruitment.models``: 128 characters).
SiteCode = Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
#: A recruiter, a Practitioner reference key as the recruitment store keeps it (512).
RecruiterKey = Annotated[str, Field(min_length=1, max_length=512, pattern=NO_NUL)]


class TrialCreate(TrialTerms[Question]):
    """What a sponsor sends to register (or change) a saved question. Its texts are what the
    recruitment store can keep: a record it could not would stop its consumer, which retries a
    batch the database refuses and then gives up."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TRIAL_ID_PATTERN, description="Slug, e.g. t2dm-sglt2-001")
    title: str = Field(min_length=1, max_length=300, pattern=NO_NUL)
    recruiting_sites: list[SiteCode] = Field(default_factory=list, description="ODS codes")
    site_targets: dict[SiteCode, int] = Field(default_factory=dict)
    #: Site ODS code -> Practitioner reference key of the site's named recruiter.
    recruiters: dict[SiteCode, RecruiterKey] = Field(default_factory=dict)


#: A saved question as kept on the trials topic, its criteria read as a :class:`Question`.
SavedTrial = TrialRecord[Question]


class TrialPublic(BaseModel):
    """A saved question as its sponsor sees it."""

    id: str
    version: int
    title: str
    status: str
    criteria: dict[str, Any]
    recruiting_sites: list[str]
    target: int | None
    site_targets: dict[str, int]
    registered_at: datetime

    @classmethod
    def of(cls, record: SavedTrial) -> TrialPublic:
        return cls(
            id=record.id,
            version=record.version,
            title=record.title,
            status=record.status,
            criteria=orjson.loads(record.criteria.to_json()),
            recruiting_sites=record.recruiting_sites,
            target=record.target,
            site_targets=record.site_targets,
            registered_at=record.registered_at,
        )


class NotYours(PermissionError):
    pass


class SavedQuestions:
    """The registry view: a background reader of the trials topic plus a writer."""

    def __init__(
        self, bootstrap: str, topic: str, *, stale_after: float = 5.0, max_staleness: float = 5.0
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.trials: dict[str, SavedTrial] = {}
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self.mirror = TopicMirror(
            "trials",
            bootstrap,
            topic,
            self._absorb_messages,
            poll_batch=500,
            stale_after=stale_after,
            max_staleness=max_staleness,
        )

    def start(self) -> SavedQuestions:
        self.mirror.start()
        return self

    def stop(self) -> None:
        self.mirror.stop()
        if self._producer is not None:
            self._producer.flush(10)

    @property
    def error(self) -> str | None:
        return self.mirror.status().error

    def readiness(self) -> ReaderStatus:
        return self.mirror.status()

    def wait_loaded(self, timeout: float) -> bool:
        """Wait until the registry is connected and has read the trials topic to a fresh end."""
        return self.mirror.wait_ready(timeout)

    def _absorb_messages(self, messages: list[Message]) -> None:
        for message in messages:
            value = message.value()
            if value is not None:
                self._absorb(value)

    def _absorb(self, value: bytes) -> None:
        try:
            record = SavedTrial.model_validate_json(value)
        except ValueError as exc:
            log.error("unreadable trial record skipped: %s", exc)
            return
        with self._lock:
            current = self.trials.get(record.id)
            if current is None or current.version < record.version:
                self.trials[record.id] = record

    def _publish(self, record: SavedTrial) -> None:
        if self._producer is None:
            self._producer = Producer(
                routed(
                    {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "acks": "all"}
                )
            )
        errors: list[str] = []
        self._producer.produce(
            self.topic,
            key=record.id.encode(),
            value=record.to_json(),
            on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
        )
        remaining = self._producer.flush(30)
        if remaining or errors:
            raise RuntimeError(f"trial record not delivered: {errors or remaining}")
        self._absorb(record.to_json())

    def register(self, create: TrialCreate, sponsor: str) -> SavedTrial:
        with self._lock:
            current = self.trials.get(create.id)
        if current is not None and current.sponsor != sponsor:
            raise NotYours(f"trial {create.id} belongs to another sponsor")
        record = SavedTrial(
            **create.model_dump(),
            version=(current.version + 1) if current else 1,
            sponsor=sponsor,
            status="active",
            registered_at=datetime.now(UTC),
        )
        self._publish(record)
        return record

    def retire(self, trial_id: str, sponsor: str) -> SavedTrial:
        current = self.get(trial_id, sponsor)
        record = current.model_copy(
            update={
                "version": current.version + 1,
                "status": "retired",
                "registered_at": datetime.now(UTC),
            }
        )
        self._publish(record)
        return record

    def revise(self, trial_id: str, criteria: Question) -> SavedTrial:
        """A new version of a trial with ``criteria`` (the same question compiled again, when
        a terminology load changed what its ECL or ValueSets expand to); everything else as
        it was. The stream re-evaluates every patient at the new version."""
        current = self.get(trial_id)
        record = current.model_copy(
            update={
                "version": current.version + 1,
                "criteria": criteria,
                "registered_at": datetime.now(UTC),
            }
        )
        self._publish(record)
        return record

    def get(self, trial_id: str, sponsor: str | None = None) -> SavedTrial:
        with self._lock:
            record = self.trials.get(trial_id)
        if record is None:
            raise KeyError(trial_id)
        if sponsor is not None and record.sponsor != sponsor:
            raise NotYours(f"trial {trial_id} belongs to another sponsor")
        return record

    def of_sponsor(self, sponsor: str) -> list[SavedTrial]:
        with self._lock:
            return sorted(
                (r for r in self.trials.values() if r.sponsor == sponsor), key=lambda r: r.id
            )

    def wait_version(self, trial_id: str, version: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                record = self.trials.get(trial_id)
            if record is not None and record.version >= version:
                return True
            time.sleep(0.05)
        return False


__all__ = ["NotYours", "SavedQuestions", "SavedTrial", "TrialCreate", "TrialPublic"]
