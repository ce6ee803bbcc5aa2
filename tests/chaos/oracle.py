"""The chaos suite's oracle: what the running system must equal, computed in batch from the log.

Everything is read back from the broker with a plain consumer (to the high watermarks) and
folded here, independently of the worker and the API: patient state by highest ``seq``, the
saved question's cohort with the reference engine, device contributions with the batch
contribution function. The running system must equal it once its views have caught up.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from core.contracts.facts import decode_resource_facts, envelopes_of
from feasibility.criteria import Question
from feasibility.engines.reference import ReferenceEngine
from feasibility.engines.results import cohort
from fhir_adapters.extract import REFERENCE_TYPES
from surveillance_stream import patient_state
from surveillance_stream.devices import Counters, contribution

from .load import Ledger


def read_topic(bootstrap: str, topic: str) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every message of ``topic`` up to its high watermarks: (partition, offset, key, value)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "chaos-oracle", "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for p in metadata.partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        seen = {p: 0 for p in ends}
        out = []
        deadline = time.monotonic() + 120
        while any(seen[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"reading {topic} timed out at {seen} of {ends}"
            for message in consumer.consume(5000, timeout=0.5):
                if message.error() is not None:
                    continue
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                if offset >= ends[partition]:
                    continue
                seen[partition] = offset + 1
                out.append((partition, offset, message.key(), message.value()))
        return out
    finally:
        consumer.close()


@dataclass
class Truth:
    """The batch fold of the facts topic."""

    envelopes: list[Any]  # decoded ResourceFacts, in log order
    raw: list[dict[str, Any]]
    high: dict[int, int]
    #: (partition, offset) of each raw envelope's message
    positions: list[tuple[int, int]]

    @classmethod
    def read(cls, bootstrap: str, facts_topic: str) -> Truth:
        raw: list[dict[str, Any]] = []
        positions: list[tuple[int, int]] = []
        high: dict[int, int] = defaultdict(int)
        for partition, offset, _, value in read_topic(bootstrap, facts_topic):
            high[partition] = max(high[partition], offset + 1)
            if value is not None:
                batch = envelopes_of(value)
                raw.extend(batch)
                positions.extend((partition, offset) for _ in batch)
        envelopes = [decode_resource_facts(orjson.dumps(e)) for e in raw]
        return cls(envelopes, raw, dict(high), positions)

    def where(self) -> dict[str, list[tuple[int, int, int]]]:
        """Resource key -> [(partition, offset, seq)] of its envelopes on the log."""
        out: dict[str, list[tuple[int, int, int]]] = {}
        for envelope, (partition, offset) in zip(self.raw, self.positions, strict=True):
            out.setdefault(str(envelope["key"]), []).append(
                (partition, offset, int(envelope["seq"]))
            )
        return out

    def fold(self) -> dict[str, Any]:
        return patient_state.fold(self.envelopes)

    def digest(self) -> dict[str, Any]:
        return patient_state.digest(self.fold().items())

    def patients(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, entry in self.fold().items():
            patient, resource = patient_state.split_key(key)
            out.setdefault(patient, {})[resource] = entry
        return out

    def cohort(self, question: Question, at: Any) -> frozenset[str]:
        return cohort(question, ReferenceEngine().evaluate(question, self.patients(), at))

    def contributions(self) -> dict[str, Any]:
        out = {}
        for patient, entries in self.patients().items():
            found = contribution(patient, entries)
            if found.keys or found.person_time:
                out[patient] = found
        return out

    def counters(self) -> Counters:
        return Counters.rebuild(contribution(p, e) for p, e in self.patients().items())

    # ------------------------------------------------------------------ the log itself

    def conflicting_duplicates(self) -> list[tuple[str, int]]:
        """(key, seq) pairs published with different content: never allowed. The same envelope
        twice (a publish retried after a crash before its index commit) is harmless and
        allowed: the fold keeps the highest seq."""
        seen: dict[tuple[str, int], bytes] = {}
        bad = []
        for envelope in self.raw:
            body = {k: v for k, v in envelope.items() if k != "provenance"}
            provenance = dict(envelope.get("provenance") or {})
            provenance.pop("ingested_at", None)
            canonical = orjson.dumps([body, provenance], option=orjson.OPT_SORT_KEYS)
            key = (str(envelope["key"]), int(envelope["seq"]))
            if key in seen and seen[key] != canonical:
                bad.append(key)
            seen.setdefault(key, canonical)
        return bad

    def exact_duplicates(self) -> int:
        keys = [(str(e["key"]), int(e["seq"])) for e in self.raw]
        return len(keys) - len(set(keys))

    def public_keys(
        self, ledger: Ledger, source: str, pseudonyms: dict[str, str]
    ) -> dict[tuple[str, str], str]:
        """The facts-topic key of each acknowledged patient-scoped resource. A Patient is keyed
        by its pseudonym, not its logical id (the id can be an identifier at the source)."""
        with ledger.lock:
            acked = list(ledger.acked)
        keys = {}
        for rtype, rid in acked:
            if rtype in REFERENCE_TYPES:
                continue
            public = pseudonyms[rid] if rtype == "Patient" else rid
            keys[(rtype, rid)] = f"{source}|{rtype}|{public}"
        return keys

    def missing_acknowledged(
        self, ledger: Ledger, source: str, pseudonyms: dict[str, str]
    ) -> list[str]:
        """Acknowledged resources whose last acknowledged version is not what the log ends
        with (absent, still live after an acknowledged DELETE, or an older version)."""
        latest: dict[str, dict[str, Any]] = {}
        for envelope in self.raw:
            key = str(envelope["key"])
            if key not in latest or int(latest[key]["seq"]) <= int(envelope["seq"]):
                latest[key] = envelope
        problems = []
        with ledger.lock:
            acked = dict(ledger.acked)
        for resource, key in self.public_keys(ledger, source, pseudonyms).items():
            ack = acked[resource]
            found = latest.get(key)
            if found is None:
                problems.append(f"{key}: acknowledged, not on the facts topic")
                continue
            if bool(found.get("retracted")) != ack.deleted:
                problems.append(f"{key}: retracted={found.get('retracted')}, acked {ack}")
            version = (found.get("provenance") or {}).get("version")
            if ack.version is not None and not ack.deleted and version != ack.version:
                problems.append(f"{key}: version {version} on the topic, {ack.version} acked")
        return problems[:20]

    def phantoms(self, ledger: Ledger, source: str, pseudonyms: dict[str, str]) -> list[str]:
        """Keys on the facts topic that the load never had acknowledged (nothing invents
        resources, and nothing refused is published later)."""
        sent = set(self.public_keys(ledger, source, pseudonyms).values())
        with ledger.lock:
            # a Device with a patient is a reference record and a patient's fact too
            sent |= {f"{source}|Device|{rid}" for (rtype, rid) in ledger.acked if rtype == "Device"}
        return sorted({str(e["key"]) for e in self.raw} - sent)[:10]


def device_contributions_on_topic(bootstrap: str, topic: str) -> dict[str, Any]:
    """The device-contribution topic's latest value per patient (None: a tombstone)."""
    from surveillance_stream.monitor import _decode

    latest: dict[str, Any] = {}
    for _, _, key, value in read_topic(bootstrap, topic):
        raw = key or b""
        patient = orjson.loads(raw) if raw.startswith(b'"') else raw.decode()
        latest[patient] = _decode(value)
    return latest


def device_history(bootstrap: str, topic: str, patients: set[str]) -> dict[str, list[Any]]:
    """(partition, offset, value or None) of every record of these patients (for a report)."""
    out: dict[str, list[Any]] = {}
    for partition, offset, key, value in read_topic(bootstrap, topic):
        raw = key or b""
        patient = orjson.loads(raw) if raw.startswith(b'"') else raw.decode()
        if patient in patients:
            out.setdefault(patient, []).append((partition, offset, value is not None))
    return out


def device_counters_on_topic(bootstrap: str, topic: str) -> Counters:
    """The device-contribution topic's latest value per patient, summed (as the monitor does)."""
    from surveillance_stream.monitor import _decode

    latest: dict[str, Any] = {}
    for _, _, key, value in read_topic(bootstrap, topic):
        raw = key or b""
        patient = orjson.loads(raw) if raw.startswith(b'"') else raw.decode()
        latest[patient] = _decode(value)
    return Counters.rebuild(c for c in latest.values() if c is not None)


def cohort_on_topic(bootstrap: str, topic: str, trial: str, version: int) -> set[str]:
    """Members of ``trial`` at ``version`` as the cohort topic ends."""
    records: dict[str, dict[str, Any] | None] = {}
    for _, _, key, value in read_topic(bootstrap, topic):
        text = (key or b"").decode()
        if text.startswith('"'):
            text = orjson.loads(text)
        if text.startswith("\x00") or not text.startswith(f"{trial}|"):
            continue
        patient = text.partition("|")[2]
        record = orjson.loads(value) if value else None
        current = records.get(patient)
        if record is None:
            records[patient] = None
        elif current is None or int(current["change"]) < int(record["change"]):
            records[patient] = record
    return {
        p
        for p, r in records.items()
        if r is not None and r.get("member") and int(r.get("trial_version", 0)) == version
    }


def cohort_record(bootstrap: str, topic: str, trial: str, patient: str) -> Any:
    """Every record of ``trial|patient`` on the cohort topic (for a failure's report)."""
    out = []
    for partition, offset, key, value in read_topic(bootstrap, topic):
        text = (key or b"").decode()
        if text.startswith('"'):
            text = orjson.loads(text)
        if text == f"{trial}|{patient}":
            out.append((partition, offset, orjson.loads(value) if value else None))
    return out


def eventually(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``check`` (True when it holds, else a description of the difference)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(1.0)
    raise AssertionError(f"{what} did not hold within {timeout:.0f} s; last: {last}")


__all__ = [
    "Truth",
    "cohort_on_topic",
    "device_counters_on_topic",
    "eventually",
    "read_topic",
]
