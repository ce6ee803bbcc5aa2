"""Topic definitions: the log of record.

Fact topics are keyed by patient pseudonym so one patient's facts stay in order on one partition;
reference data is compacted so the latest version of each key is kept forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


FACTS = "concierge.facts.v1"
REFERENCE = "concierge.reference.v1"
DEADLETTER = "concierge.deadletter.v1"
#: Saved questions (registered trials), keyed by trial id; compacted: the registry of record.
TRIALS = "concierge.trials.v1"
#: Stream control, co-partitioned with the facts topic: stream-time ticks and trial changes,
#: sent to every partition so each partition's state moves with them.
CONTROL = "concierge.control.v1"
#: Cohort membership per trial and patient (``trial|patient``), written by the stream worker on
#: the patient's partition; compacted, so it holds each patient's latest membership.
COHORT = "concierge.cohort.v1"

#: Each patient's contribution to the device counters (exposures, outcomes, person-time and
#: provenance), keyed by patient pseudonym on the patient's partition, written by the stream
#: worker; compacted, so it holds every patient's latest contribution and the counters are its sum.
DEVICES = "concierge.device-contrib.v1"
#: Device-safety signal lifecycle events (``concierge.signal-event/1``) keyed by signal id: every
#: state change, by the statistics or by a regulator; kept forever (the signals' history).
SIGNALS = "concierge.signals.v1"
#: Heads of the audit chain (``concierge.audit-anchor/1``) keyed by chain id, published by the
#: API; append-only and kept forever (never compacted: every anchor, not just the latest, is
#: what ``concierge audit verify --against-anchors`` checks the audit database against).
AUDIT_ANCHORS = "concierge.audit-anchors.v1"
_WEEK_MS = str(7 * 24 * 3600 * 1000)

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        FACTS,
        partitions=6,
        config={"cleanup.policy": "delete", "retention.ms": "-1", "max.message.bytes": "2097152"},
        doc="Resource fact envelopes keyed by patient pseudonym; kept forever (the log of record).",
    ),
    TopicSpec(
        REFERENCE,
        partitions=3,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        doc="Practitioners, roles, organisations and devices keyed by source/type/id; compacted.",
    ),
    TopicSpec(
        TRIALS,
        partitions=1,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        doc="Saved questions (trial registrations) keyed by trial id; compacted.",
    ),
    TopicSpec(
        CONTROL,
        partitions=6,
        config={"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3600 * 1000)},
        doc="Stream-time ticks and trial changes, one per facts partition; kept 30 days.",
    ),
    TopicSpec(
        COHORT,
        partitions=6,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        doc="Cohort membership keyed trial|patient on the patient's partition; compacted.",
    ),
    TopicSpec(
        DEVICES,
        partitions=6,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
        doc="Per-patient device-counter contributions keyed by patient on its partition.",
    ),
    TopicSpec(
        SIGNALS,
        partitions=1,
        config={"cleanup.policy": "delete", "retention.ms": "-1"},
        doc="Device-safety signal lifecycle events keyed by signal id, and the tree scan's "
        "looks keyed scan-look-<n>; kept forever.",
    ),
    TopicSpec(
        AUDIT_ANCHORS,
        partitions=1,
        config={"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        doc="Audit chain heads keyed by chain id; append-only, never compacted, kept forever.",
    ),
    TopicSpec(
        DEADLETTER,
        partitions=1,
        config={
            "cleanup.policy": "delete",
            "retention.ms": str(90 * 24 * 3600 * 1000),
            "max.message.bytes": "10485760",
        },
        doc="Rejected input: an OperationOutcome and the original payload, kept 90 days.",
    ),
)

__all__ = [
    "AUDIT_ANCHORS",
    "COHORT",
    "CONTROL",
    "DEADLETTER",
    "DEVICES",
    "FACTS",
    "REFERENCE",
    "SIGNALS",
    "TOPICS",
    "TRIALS",
    "TopicSpec",
]
