"""Per-patient state: the latest version of each of a patient's resources, folded idempotently.

State is keyed by ``patient|resource key`` and holds the envelope with the highest ``seq`` seen.
Applying an envelope is a pure function of (current entry, envelope), and the result depends only
on the set of envelopes applied, not on their order or multiplicity: replaying any part of the
facts topic after a crash cannot double or lose anything. Retractions are kept as tombstones (a
``seq`` with no facts) so an older version replayed later cannot resurrect a retracted resource.

The same fold serves the Faust worker and the tests' reference model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import orjson

from core.contracts.facts import ResourceFacts

SEP = "\x1f"


def state_key(patient: str, resource_key: str) -> str:
    return f"{patient}{SEP}{resource_key}"


def split_key(key: str) -> tuple[str, str]:
    patient, _, resource_key = key.partition(SEP)
    return patient, resource_key


def entry_of(envelope: ResourceFacts) -> dict[str, Any]:
    """The table value for an envelope: everything downstream evaluation needs, JSON-safe."""
    return {
        "seq": envelope.seq,
        "retracted": envelope.retracted,
        "facts": [fact.model_dump(mode="json") for fact in envelope.facts],
        "provenance": envelope.provenance.model_dump(mode="json", exclude={"ingested_at"}),
    }


def should_apply(current: Mapping[str, Any] | None, envelope: ResourceFacts) -> bool:
    return current is None or int(current["seq"]) < envelope.seq


def apply(table: MutableMapping[str, Any], envelope: ResourceFacts) -> bool:
    """Fold one envelope into a table; True when the state changed."""
    key = state_key(envelope.patient, envelope.key)
    if not should_apply(table.get(key), envelope):
        return False
    table[key] = entry_of(envelope)
    return True


def fold(envelopes: Iterable[ResourceFacts]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for envelope in envelopes:
        apply(table, envelope)
    return table


def digest(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A canonical summary of a state table: entry count, live patients and a SHA-256."""
    hasher = hashlib.sha256()
    count = 0
    patients: set[str] = set()
    for key, value in sorted(items, key=lambda kv: kv[0]):
        count += 1
        if not value.get("retracted"):
            patients.add(split_key(key)[0])
        hasher.update(orjson.dumps([key, value], option=orjson.OPT_SORT_KEYS))
    return {"entries": count, "patients": len(patients), "sha256": hasher.hexdigest()}
