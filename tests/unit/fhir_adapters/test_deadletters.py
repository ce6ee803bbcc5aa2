"""Dead letters read back and replayed (in memory; the real broker: the integration test)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhir_adapters.deadletters import Letter, parse_since, replay
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import MemorySink
from fhir_adapters.vault import MemoryVault

SOURCE = "urn:test:ehr"
OTHER = "urn:test:other-ehr"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


def make(vault: MemoryVault, source: str = SOURCE) -> Ingestor:
    return Ingestor(vault, MemorySink(), Pseudonymiser(b"k" * 32), source)


def patient(rid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": rid, "identifier": [{"system": NHS, "value": rid}]}


def condition(rid: str, subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "subject": {"reference": f"Patient/{subject}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
    }


def letters_of(sink: MemorySink) -> list[Letter]:
    return [Letter.parse(0, i, letter.value) for i, letter in enumerate(sink.dead_letters)]


def test_a_letter_replays_once_its_cause_is_fixed_and_never_twice() -> None:
    vault = MemoryVault()
    adapter = make(vault, OTHER)  # the source that sent it, not the replayer's default
    assert adapter.ingest_resource(condition("c1", "late"), "file:1").status == "dead_lettered"
    assert adapter.ingest_resource(condition("c2", "ghost"), "file:2").status == "dead_lettered"
    adapter.commit()
    assert isinstance(adapter.sink, MemorySink)
    letters = letters_of(adapter.sink)
    assert [x.source for x in letters] == [OTHER, OTHER]
    assert all(x.matches("NOT-FOUND", None) for x in letters)
    assert not letters[0].matches("too-long", None)
    assert "payload" not in letters[0].summary()

    adapter.ingest_resource(patient("late"), "file:3")  # the fix
    adapter.commit()

    replayer = make(vault)
    report = replay(letters, replayer)
    assert [(r.resource_id, r.result) for r in report.rows] == [
        ("c1", "re-ingested"),
        ("c2", "still failing"),
    ]
    assert report.rows[1].reason is not None and "unknown patient" in report.rows[1].reason
    sink = replayer.sink
    assert isinstance(sink, MemorySink)
    assert [f.key for f in sink.published_facts] == [f"{OTHER}|Condition|c1"]
    assert sink.dead_letters == []  # what still fails is not dead-lettered again
    again = replay(letters, make(vault))
    assert again.counts == {
        "re-ingested": 0,
        "already present": 1,
        "skipped": 0,
        "still failing": 1,
        "not replayable": 0,
    }


def test_truncated_letters_are_not_replayable() -> None:
    vault = MemoryVault()
    adapter = Ingestor(vault, MemorySink(), Pseudonymiser(b"k" * 32), SOURCE, max_resource_bytes=50)
    big = {**patient("p1"), "name": [{"family": "x" * 200}]}
    adapter.ingest_document(big, str(big), "file:1")
    assert isinstance(adapter.sink, MemorySink)
    (letter,) = letters_of(adapter.sink)
    assert letter.payload_truncated
    report = replay([letter], make(vault))
    assert [r.result for r in report.rows] == ["not replayable"]


def test_since_takes_dates_times_and_durations() -> None:
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert parse_since("6h", now) == now - timedelta(hours=6)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_since("2026-12-01T10:00:00+01:00").hour == 10
    with pytest.raises(ValueError, match="--since"):
        parse_since("last tuesday")
