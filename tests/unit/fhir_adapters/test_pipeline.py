"""The Ingestor's contract: four outcomes, version ordering, retraction, dead letters, streaming,
Subscription gaps, the Synthea samples, and the same flows on a SQLite vault across restarts."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.contracts.facts import ObservationFact, ResourceFacts, decode_resource_facts
from fhir_adapters.pipeline import EXCERPT_BYTES, RESTART_GAP, STATUSES, Ingestor, Outcome
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import DEADLETTER_MAX_BYTES, DeadLetter, DeliveryFailed, MemorySink
from fhir_adapters.vault import MemoryVault, SqlVault, Vault
from tests.adapter_helpers import public_key
from tests.recruitment_helpers import BACKENDS, fresh_database
from tests.samples import synthea_r4

SOURCE = "urn:test"
SECRET = b"k" * 32
SAMPLES = synthea_r4()
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def key(rtype: str, rid: str) -> str:
    return f"{SOURCE}|{rtype}|{rid}"


def make(vault: Vault | None = None, **kwargs: Any) -> Ingestor:
    return Ingestor(vault or MemoryVault(), MemorySink(), Pseudonymiser(SECRET), SOURCE, **kwargs)


def sink(ingestor: Ingestor) -> MemorySink:
    assert isinstance(ingestor.sink, MemorySink)
    return ingestor.sink


def patient(rid: str = "pat1", nhs: str = "9434765919", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": rid,
        "identifier": [{"system": NHS_SYSTEM, "value": nhs}],
        "name": [{"family": "Testperson"}],
        **extra,
    }


def observation(rid: str = "obs1", value: float = 5.0, subject: str = "pat1", **extra: Any) -> dict:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]},
        "subject": {"reference": f"Patient/{subject}"},
        "effectiveDateTime": "2024-01-01T09:00:00Z",
        "valueQuantity": {"value": value, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
        **extra,
    }


def one(
    ingestor: Ingestor, resource: dict[str, Any] | bytes, version: str | None = None
) -> Outcome:
    text = resource if isinstance(resource, bytes) else orjson.dumps(resource)
    outcomes = ingestor.ingest_text(text, "test", version)  # type: ignore[arg-type]
    assert len(outcomes) == 1
    return outcomes[0]


def published(ingestor: Ingestor, rkey: str) -> list[ResourceFacts]:
    rkey = public_key(ingestor, rkey)
    return [e for e in sink(ingestor).published_facts if e.key == rkey]


def letter(ingestor: Ingestor, index: int = -1) -> dict[str, Any]:
    return orjson.loads(sink(ingestor).dead_letters[index].value)


def pseudonym_of(ingestor: Ingestor, rid: str = "pat1") -> str:
    return published(ingestor, key("Patient", rid))[-1].patient


@pytest.fixture
def ingestor() -> Ingestor:
    ingestor = make()
    assert one(ingestor, patient()).status == "accepted"
    assert one(ingestor, patient("pat2", "9000000009")).status == "accepted"
    return ingestor


# --- idempotency and versions -------------------------------------------------------------


def test_same_resource_twice_is_unchanged_and_publishes_nothing(ingestor: Ingestor) -> None:
    first = one(ingestor, observation())
    count = len(sink(ingestor).published_facts)
    second = one(ingestor, observation())
    assert (first.status, first.seq) == ("accepted", 1)
    assert (second.status, second.seq) == ("unchanged", 1)
    assert len(sink(ingestor).published_facts) == count
    ingestor.commit()
    assert one(ingestor, observation()).status == "unchanged"  # also after the index is committed
    assert len(sink(ingestor).published_facts) == count


def test_meta_only_change_is_unchanged(ingestor: Ingestor) -> None:
    one(ingestor, observation())
    again = observation(meta={"lastUpdated": "2030-01-01T00:00:00Z", "versionId": "9"})
    assert one(ingestor, again).status == "unchanged"


def test_version_update_replaces_and_older_version_is_unchanged(ingestor: Ingestor) -> None:
    v1 = observation(value=5.0, meta={"versionId": "1"})
    v2 = observation(value=6.5, meta={"versionId": "2"})
    assert one(ingestor, v1).seq == 1
    update = one(ingestor, v2)
    assert (update.status, update.seq) == ("accepted", 2)
    latest = published(ingestor, key("Observation", "obs1"))[-1]
    assert latest.seq == 2 and latest.provenance.version == "2"
    fact = latest.facts[0]
    assert isinstance(fact, ObservationFact) and fact.value == 6.5
    count = len(sink(ingestor).published_facts)
    stale = one(ingestor, v1)
    assert (stale.status, stale.seq) == ("unchanged", 2)
    assert len(sink(ingestor).published_facts) == count


def test_versions_ordered_by_last_updated(ingestor: Ingestor) -> None:
    newer = observation(value=2.0, meta={"lastUpdated": "2024-02-01T00:00:00Z"})
    older = observation(value=1.0, meta={"lastUpdated": "2024-01-01T00:00:00+00:00"})
    assert one(ingestor, newer).status == "accepted"
    assert one(ingestor, older).status == "unchanged"
    # A different textual form of an instant later than the indexed one is newer.
    newest = observation(value=3.0, meta={"lastUpdated": "2024-02-01T01:00:00+00:30"})
    assert (one(ingestor, newest).status, one(ingestor, newest).seq) == ("accepted", 2)


def test_resent_earlier_content_without_meta_is_unchanged(ingestor: Ingestor) -> None:
    assert one(ingestor, observation(value=1.0)).seq == 1
    assert one(ingestor, observation(value=2.0)).seq == 2
    count = len(sink(ingestor).published_facts)
    replay = one(ingestor, observation(value=1.0))
    assert (replay.status, replay.seq) == ("unchanged", 2)
    assert len(sink(ingestor).published_facts) == count
    assert one(ingestor, observation(value=3.0)).seq == 3


def test_resource_moved_to_another_patient_is_retracted_from_the_old_one(
    ingestor: Ingestor,
) -> None:
    one(ingestor, observation(subject="pat1"))
    moved = one(ingestor, observation(subject="pat2"))
    assert (moved.status, moved.seq) == ("accepted", 3)
    retraction, current = published(ingestor, key("Observation", "obs1"))[1:]
    assert retraction.patient == pseudonym_of(ingestor, "pat1")
    assert (retraction.retracted, retraction.seq, retraction.facts) == (True, 2, ())
    assert current.patient == pseudonym_of(ingestor, "pat2")
    assert (current.retracted, current.seq) == (False, 3)
    assert current.facts


# --- retraction ---------------------------------------------------------------------------


def test_delete_retracts(ingestor: Ingestor) -> None:
    one(ingestor, observation())
    deleted = ingestor.delete("Observation", "obs1", "test")
    assert (deleted.status, deleted.seq) == ("accepted", 2)
    retraction = published(ingestor, key("Observation", "obs1"))[-1]
    assert (retraction.retracted, retraction.seq, retraction.facts) == (True, 2, ())
    assert retraction.patient == pseudonym_of(ingestor)
    assert decode_resource_facts(retraction.to_json()) == retraction
    again = ingestor.delete("Observation", "obs1", "test")
    assert again.status == "unchanged"
    assert ingestor.delete("Observation", "never-seen", "test").status == "unchanged"
    # A newer version after a delete brings the resource back.
    back = one(ingestor, observation(value=9.0, meta={"versionId": "7"}))
    assert (back.status, back.seq) == ("accepted", 3)
    assert published(ingestor, key("Observation", "obs1"))[-1].retracted is False


def test_delete_in_a_bundle(ingestor: Ingestor) -> None:
    one(ingestor, observation())
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": "Observation/obs1"}}],
    }
    [outcome] = ingestor.ingest_text(orjson.dumps(bundle), "test")
    assert (outcome.status, outcome.seq) == ("accepted", 2)
    assert published(ingestor, key("Observation", "obs1"))[-1].retracted is True


def test_delete_device_retracts_reference_record_and_exposure(ingestor: Ingestor) -> None:
    device = {
        "resourceType": "Device",
        "id": "d1",
        "status": "active",
        "patient": {"reference": "Patient/pat1"},
    }
    assert one(ingestor, device).status == "accepted"
    assert ingestor.delete("Device", "d1", "test").seq == 2
    assert published(ingestor, key("Device", "d1"))[-1].retracted is True
    record = sink(ingestor).published_references[-1]
    assert (record.key, record.retracted, record.record, record.seq) == (
        key("Device", "d1"),
        True,
        None,
        2,
    )


def test_deleted_patient_no_longer_resolves(ingestor: Ingestor) -> None:
    one(ingestor, observation("before"))
    assert ingestor.delete("Patient", "pat1", "test").status == "accepted"
    later = one(ingestor, observation("after"))
    assert later.status == "dead_lettered"
    assert later.outcome is not None and later.outcome["issue"][-1]["code"] == "not-found"
    # ...exactly as it is for a fresh process on the same vault.
    ingestor.commit()
    fresh = make(ingestor.vault)
    assert one(fresh, observation("after")).status == "dead_lettered"


# --- dead letters -------------------------------------------------------------------------


def test_unknown_patient_dead_letters_not_found_with_payload(ingestor: Ingestor) -> None:
    resource = observation(subject="nobody")
    text = orjson.dumps(resource)
    outcome = one(ingestor, text)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None
    issue = outcome.outcome["issue"][-1]
    assert (issue["code"], issue["expression"]) == ("not-found", ["Observation.subject"])
    dead = letter(ingestor)
    assert dead["operation_outcome"] == outcome.outcome
    assert dead["operation_outcome"]["resourceType"] == "OperationOutcome"
    assert orjson.loads(dead["payload"]) == resource
    assert (dead["resource_type"], dead["resource_id"], dead["source"]) == (
        "Observation",
        "obs1",
        SOURCE,
    )
    assert sink(ingestor).dead_letters[-1].key == "test"
    assert not published(ingestor, key("Observation", "obs1"))


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b'{"resourceType": "Observation", "id": "x"', "structure"),
        (b"\xff\xfe{}", "structure"),
        (b"", "structure"),
        (b"[]", "structure"),
        (b'"Patient"', "structure"),
        (b"42", "structure"),
        (b"null", "structure"),
    ],
)
def test_unparseable_documents_dead_letter_with_original_text(
    ingestor: Ingestor, text: bytes, code: str
) -> None:
    outcome = one(ingestor, text)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None and outcome.outcome["issue"][0]["code"] == code
    dead = letter(ingestor)
    assert dead["payload"] == text.decode("utf-8", errors="replace")
    assert dead["operation_outcome"]["issue"]


def test_oversize_resource_dead_letters() -> None:
    ingestor = make(max_resource_bytes=2_000)
    one(ingestor, patient())
    big = observation(note=[{"text": "x" * 5_000}])
    outcome = one(ingestor, big)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None and outcome.outcome["issue"][0]["code"] == "too-long"
    assert_excerpt(letter(ingestor), orjson.dumps(big))
    # In a Bundle only the oversize entry is dead-lettered, with an excerpt too.
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": big}, {"resource": observation("small")}],
    }
    statuses = [o.status for o in ingestor.ingest_text(orjson.dumps(bundle), "b")]
    assert statuses == ["dead_lettered", "accepted"]
    assert_excerpt(letter(ingestor, -1), orjson.dumps(big))


def assert_excerpt(body: dict[str, Any], payload: bytes) -> None:
    """A dead letter of something too large: an excerpt, the size and digest, never all of it."""
    assert body["payload_truncated"] is True
    assert len(body["payload"].encode()) <= EXCERPT_BYTES
    assert payload.startswith(body["payload"].encode()[:100])
    assert body["payload_bytes"] == len(payload)
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()


def test_a_dead_letter_too_large_for_its_topic_holds_an_excerpt() -> None:
    """Invalid JSON bigger than the dead-letter topic takes (a 50 MB body used to be put in
    the letter whole, which Kafka refused, so nothing was dead-lettered)."""
    ingestor = make(max_resource_bytes=10_000_000)
    garbage = b'{"resourceType": "Patient", ' + b'"x": "' * 400_000
    one(ingestor, garbage)
    dead = sink(ingestor).dead_letters[-1]
    assert len(dead.value) < DEADLETTER_MAX_BYTES
    assert_excerpt(orjson.loads(dead.value), garbage)
    small = b"{not json"
    one(ingestor, small)
    whole = letter(ingestor)
    assert (whole["payload"], whole["payload_truncated"]) == (small.decode(), False)
    assert whole["payload_sha256"] == hashlib.sha256(small).hexdigest()


@pytest.mark.parametrize("resource_id", [None, 42, ""])
def test_missing_or_bad_id_dead_letters(ingestor: Ingestor, resource_id: Any) -> None:
    resource = observation()
    if resource_id is None:
        del resource["id"]
    else:
        resource["id"] = resource_id
    outcome = one(ingestor, resource)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None
    assert outcome.outcome["issue"][0]["expression"] == ["Observation.id"]


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        ({"effectiveDateTime": "2024-13-01"}, "Observation.effectiveDateTime"),
        ({"effectiveDateTime": "2024-01-01T10:00:00"}, "Observation.effectiveDateTime"),
        ({"status": "done"}, "Observation.status"),
        ({"valueQuantity": {"value": "5.0"}}, "Observation.valueQuantity.value"),
        ({"valueQuantity": {"value": 5, "code": "mg"}}, "Observation.valueQuantity"),
        (
            {"code": {"coding": [{"system": LOINC, "code": " x"}]}},
            "Observation.code.coding[0].code",
        ),
        ({"meta": {"lastUpdated": "2024-01-01"}}, "Observation.meta.lastUpdated"),
        ({"meta": {"versionId": "a b"}}, "Observation.meta.versionId"),
        ({"component": [{"valueQuantity": {"value": 1}}]}, "Observation.component[0].code"),
    ],
)
def test_dead_letter_names_the_element(
    ingestor: Ingestor, change: dict[str, Any], expression: str
) -> None:
    outcome = one(ingestor, {**observation(), **change})
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None
    issues = outcome.outcome["issue"]
    assert issues[-1]["expression"] == [expression]
    assert outcome.reason is not None


def test_dead_letter_carries_the_fhir_resources_explanation(ingestor: Ingestor) -> None:
    outcome = one(ingestor, {**observation(), "effectiveDateTime": "2023-02-29"})
    assert outcome.outcome is not None
    issues = outcome.outcome["issue"]
    theirs = [i for i in issues if "(fhir.resources R4)" in i["diagnostics"]]
    ours = issues[-1]
    assert theirs and theirs[0]["expression"] == ["Observation.effectiveDateTime"]
    assert ours["expression"] == ["Observation.effectiveDateTime"]
    assert "calendar" in ours["diagnostics"]
    assert all(i["severity"] == "error" for i in issues)


def test_full_validation_rejects_what_the_fast_path_does_not_read() -> None:
    unknown_element = {**observation(), "favouriteColour": "teal"}
    bad_unread = {**observation(), "issued": "not an instant"}
    fast, full = make(), make(validation_mode="full")
    for ingestor in (fast, full):
        one(ingestor, patient())
    assert one(fast, unknown_element).status == "accepted"
    assert one(fast, bad_unread).status == "accepted"  # Observation.issued is not read
    outcome = one(full, unknown_element)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None
    assert outcome.outcome["issue"][0]["expression"] == ["Observation.favouriteColour"]
    assert "fhir.resources R4" in outcome.outcome["issue"][0]["diagnostics"]
    assert orjson.loads(letter(full)["payload"]) == unknown_element
    assert one(full, bad_unread).status == "dead_lettered"
    assert one(full, observation()).status == "accepted"


@pytest.mark.parametrize(
    ("bundle", "expected"),
    [
        (
            {"resourceType": "Bundle", "type": "transaction-response", "entry": []},
            ["dead_lettered"],
        ),
        ({"resourceType": "Bundle", "entry": []}, ["dead_lettered"]),
        ({"resourceType": "Bundle", "type": "batch", "entry": {}}, ["dead_lettered"]),
        ({"resourceType": "Bundle", "type": "batch", "entry": []}, []),
        (
            {"resourceType": "Bundle", "type": "batch", "entry": [1, {"resource": []}, {}]},
            ["dead_lettered"] * 3,
        ),
    ],
)
def test_malformed_bundles(ingestor: Ingestor, bundle: dict[str, Any], expected: list[str]) -> None:
    before = len(sink(ingestor).dead_letters)
    outcomes = ingestor.ingest_text(orjson.dumps(bundle), "b")
    assert [o.status for o in outcomes] == expected
    assert len(sink(ingestor).dead_letters) - before == len(expected)


def test_bundle_resolves_urn_uuid_and_orders_entries() -> None:
    ingestor = make()
    patient_urn = "urn:uuid:5b0b3b1c-0000-4000-8000-0000000000aa"
    observation_urn = "urn:uuid:0b0b3b1c-0000-4000-8000-0000000000bb"
    obs = {**observation(), "subject": {"reference": patient_urn}}
    pat = patient()
    del obs["id"], pat["id"]  # POSTed in a transaction: the fullUrl is their only identity
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [  # the Observation first: the adapter must order the Patient before it
            {
                "fullUrl": observation_urn,
                "resource": obs,
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": patient_urn,
                "resource": pat,
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    outcomes = ingestor.ingest_text(orjson.dumps(bundle), "b")
    # Processed Patient first, but answered in the order of the request.
    assert [(o.status, o.resource_type) for o in outcomes] == [
        ("accepted", "Observation"),
        ("accepted", "Patient"),
    ]
    assert outcomes[0].resource_id == observation_urn.removeprefix("urn:uuid:")
    [obs_facts] = published(ingestor, outcomes[0].key or "")
    [pat_facts] = published(ingestor, outcomes[1].key or "")
    assert obs_facts.patient == pat_facts.patient


# --- commit ordering ----------------------------------------------------------------------


class FailingSink(MemorySink):
    def flush(self) -> None:
        raise RuntimeError("broker unavailable")


def test_commit_flushes_the_sink_before_the_index() -> None:
    vault = MemoryVault()
    crashing = Ingestor(vault, FailingSink(), Pseudonymiser(SECRET), SOURCE)
    one(crashing, patient())
    with pytest.raises(RuntimeError):
        crashing.commit()
    assert vault.index == {}  # nothing acknowledged, so nothing indexed
    retry = make(vault)
    again = one(retry, patient())
    # Above every seq the first ingestor may have got to the broker (its floor 1, and the gap
    # after another ingestor): never the same seq for other content.
    assert (again.status, again.seq) == ("accepted", 1 + RESTART_GAP)
    retry.commit()
    assert sink(retry).flushes == 1
    assert vault.index[key("Patient", "pat1")].seq == 1 + RESTART_GAP


class FlakySink(MemorySink):
    """A sink whose next ``failures`` flushes fail, as Kafka's does when the broker is away."""

    def __init__(self, failures: int = 0, kind: str = "unavailable") -> None:
        super().__init__()
        self.failures = failures
        self.kind = kind
        self.discards = 0

    def flush(self) -> None:
        if self.failures:
            self.failures -= 1
            raise DeliveryFailed("broker unavailable", self.kind)  # type: ignore[arg-type]
        super().flush()

    def discard(self) -> None:
        self.discards += 1
        super().discard()


def flaky(vault: Vault | None = None) -> tuple[Ingestor, FlakySink]:
    fake = FlakySink()
    return Ingestor(vault or MemoryVault(), fake, Pseudonymiser(SECRET), SOURCE), fake


def test_a_failed_commit_indexes_nothing_and_the_next_commit_does_not_either() -> None:
    """Seen: a failed publication stayed pending, the next request's commit indexed it, and
    re-sending it answered "same content already ingested" though it never reached Kafka."""
    ingestor, fake = flaky()
    vault = ingestor.vault
    assert isinstance(vault, MemoryVault)
    one(ingestor, patient())
    ingestor.commit()
    fake.failures = 1
    lost = one(ingestor, observation("lost"))
    assert lost.status == "accepted"
    with pytest.raises(DeliveryFailed):
        ingestor.commit()
    assert fake.discards == 1
    assert published(ingestor, key("Observation", "lost")) == []  # purged
    assert key("Observation", "lost") not in vault.index
    one(ingestor, observation("next"))
    ingestor.commit()
    assert key("Observation", "lost") not in vault.index
    again = one(ingestor, observation("lost"))
    assert again.status == "accepted", again.reason
    ingestor.commit()
    assert vault.index[key("Observation", "lost")].seq == again.seq
    assert [e.seq for e in published(ingestor, key("Observation", "lost"))] == [again.seq]


def test_an_aborted_batch_rolls_the_vault_back() -> None:
    ingestor, fake = flaky()
    vault = ingestor.vault
    assert isinstance(vault, MemoryVault)
    fake.failures = 1
    one(ingestor, patient())
    with pytest.raises(DeliveryFailed):
        ingestor.commit()
    assert vault.index == {} and vault.identity == {} and vault.identifiers == {}
    assert ingestor.patient_by_key(key("Patient", "pat1")) is None
    outcome = one(ingestor, observation())  # its Patient is not known: nothing was stored
    assert outcome.status == "dead_lettered"


@pytest.mark.parametrize("same_content", [True, False])
def test_after_an_aborted_batch_a_seq_is_never_reused_for_other_content(
    tmp_path: Path, same_content: bool
) -> None:
    """An aborted message may still have been written by the broker. Its seq is recorded as a
    floor in the vault (the index untouched), so the next version of that key, whatever its
    content and whichever process publishes it, goes above it."""
    url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    first, fake = flaky(SqlVault(url))
    one(first, patient())
    one(first, observation(value=5.0))
    first.commit()
    fake.failures = 1
    attempt = one(first, observation(value=6.0))
    assert attempt.seq == 2
    with pytest.raises(DeliveryFailed):
        first.commit()
    first.vault.close()
    second = make(SqlVault(url))
    assert second.vault.get_index([key("Observation", "obs1")])[key("Observation", "obs1")].seq == 1
    retry = one(second, observation(value=6.0 if same_content else 7.0))
    # above the floor (2), by the gap a second ingestor on the vault keeps
    assert (retry.status, retry.seq) == ("accepted", 2 + RESTART_GAP)
    second.commit()
    # Resolved: the index is above the floor, so the same content again is unchanged.
    assert one(second, observation(value=6.0 if same_content else 7.0)).status == "unchanged"
    second.vault.close()


def test_after_an_aborted_batch_the_indexed_content_is_published_again() -> None:
    """The broker may hold the aborted version: re-sending the indexed one must supersede it,
    not be dropped as unchanged."""
    ingestor, fake = flaky()
    one(ingestor, patient())
    one(ingestor, observation(value=5.0))
    ingestor.commit()
    fake.failures = 1
    one(ingestor, observation(value=6.0))
    with pytest.raises(DeliveryFailed):
        ingestor.commit()
    back = one(ingestor, observation(value=5.0))
    assert (back.status, back.seq) == ("accepted", 3)
    ingestor.commit()
    assert one(ingestor, observation(value=5.0)).status == "unchanged"


def test_an_error_before_the_flush_aborts_too() -> None:
    """Not only the flush: the index write failing leaves the batch aborted (floors kept)."""

    class BrokenIndex(MemoryVault):
        def put_index(self, entries: Any) -> None:
            raise OSError("disk full")

    vault = BrokenIndex()
    ingestor = make(vault)
    one(ingestor, patient())
    with pytest.raises(OSError):
        ingestor.commit()
    assert vault.seq_floors == {key("Patient", "pat1"): 1}
    assert one(ingestor, patient()).seq == 2


def test_batches_commit_automatically() -> None:
    ingestor = make(batch_size=3)
    one(ingestor, patient())
    for index in range(7):
        one(ingestor, observation(f"o{index}"))
    assert sink(ingestor).flushes == 2
    assert isinstance(ingestor.vault, MemoryVault)
    assert len(ingestor.vault.index) == 6


# --- NDJSON ---------------------------------------------------------------------------------


class CountingLines:
    """An NDJSON source that records how far it has been read."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self.lines = lines
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self.lines:
            self.pulled += 1
            yield line


def test_ndjson_is_streamed_lazily() -> None:
    ingestor = make(batch_size=10)
    one(ingestor, patient())
    endless = (
        orjson.dumps(observation(f"o{n}", value=float(n))) + b"\n" for n in itertools.count()
    )
    source = CountingLines(endless)
    outcomes = ingestor.ingest_ndjson_lines(source, "bulk.ndjson")
    assert source.pulled == 0  # nothing read until asked
    first = next(outcomes)
    # The first outcome comes after at most one chunk (batch_size lines) has been read.
    assert first.status == "accepted"
    assert 1 <= source.pulled <= 10
    rest = list(itertools.islice(outcomes, 99))
    # An endless source: only what was consumed (plus at most one chunk ahead) was read.
    assert 100 <= source.pulled <= 110
    assert {o.status for o in rest} == {"accepted"}
    assert sink(ingestor).flushes >= 9  # and committed as it went


def test_ndjson_lines_each_get_an_outcome(ingestor: Ingestor) -> None:
    lines = [
        orjson.dumps(observation("a")),
        b"",
        b"   \n",
        b"{not json",
        b"[1, 2]",
        orjson.dumps(observation("b", subject="nobody")),
        orjson.dumps({"resourceType": "Encounter", "id": "e1"}),
        orjson.dumps(observation("a")),
        orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": observation("c")}, {"resource": observation("d")}],
            }
        ),
    ]
    outcomes = list(ingestor.ingest_ndjson_lines(iter(lines), "bulk.ndjson"))
    assert [o.status for o in outcomes] == [
        "accepted",
        "dead_lettered",
        "dead_lettered",
        "dead_lettered",
        "skipped",
        "unchanged",
        "accepted",
        "accepted",
    ]
    origins = [orjson.loads(d.value)["origin"] for d in sink(ingestor).dead_letters]
    assert origins == ["bulk.ndjson:4", "bulk.ndjson:5", "bulk.ndjson:6"]


def test_ndjson_oversize_line_is_truncated_in_the_dead_letter() -> None:
    ingestor = make(max_resource_bytes=20_000)
    line = orjson.dumps(observation(note=[{"text": "y" * 50_000}]))
    [outcome] = list(ingestor.ingest_ndjson_lines([line], "big.ndjson"))
    assert outcome.status == "dead_lettered"
    assert_excerpt(letter(ingestor), line)


# --- Subscription notifications -------------------------------------------------------------


def r5_notification(
    events: list[int],
    since: int | None = None,
    kind: str = "event-notification",
    sub: str = "Subscription/s1",
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": kind,
        "subscription": {"reference": sub},
        "topic": "http://example.org/topics/observations",
        "notificationEvent": [
            {"eventNumber": str(n), "focus": {"reference": f"Observation/ev{n}"}} for n in events
        ],
    }
    if since is not None:
        status["eventsSinceSubscriptionStart"] = str(since)
    if not events:
        del status["notificationEvent"]
    return {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "timestamp": "2024-06-01T00:00:00Z",
        "entry": [
            {"fullUrl": "urn:uuid:1a1a1a1a-0000-4000-8000-000000000000", "resource": status},
            *(
                {
                    "fullUrl": f"https://ehr.example.org/fhir/Observation/ev{n}",
                    "resource": observation(f"ev{n}", value=float(n)),
                    "request": {"method": "PUT", "url": f"Observation/ev{n}"},
                }
                for n in events
            ),
        ],
    }


def r4b_backport_notification(
    events: list[int], since: int, kind: str = "event-notification"
) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "subscription",
                "valueReference": {"reference": "https://ehr.example.org/fhir/Subscription/b1"},
            },
            {"name": "topic", "valueCanonical": "http://example.org/topics/observations"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": kind},
            {"name": "events-since-subscription-start", "valueString": str(since)},
            *(
                {
                    "name": "notification-event",
                    "part": [
                        {"name": "event-number", "valueString": str(n)},
                        {"name": "focus", "valueReference": {"reference": f"Observation/bp{n}"}},
                    ],
                }
                for n in events
            ),
        ],
    }
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "fullUrl": "urn:uuid:2b2b2b2b-0000-4000-8000-000000000000",
                "resource": parameters,
                "request": {
                    "method": "GET",
                    "url": "https://ehr.example.org/fhir/Subscription/b1/$status",
                },
                "response": {"status": "200"},
            },
            *(
                {
                    "fullUrl": f"https://ehr.example.org/fhir/Observation/bp{n}",
                    "resource": observation(f"bp{n}", value=float(n)),
                    "request": {"method": "PUT", "url": f"Observation/bp{n}"},
                    "response": {"status": "201"},
                }
                for n in events
            ),
        ],
    }


Notify = Callable[..., dict[str, Any]]


@pytest.mark.parametrize(
    "notify", [r5_notification, r4b_backport_notification], ids=["R5", "R4B-backport"]
)
def test_notifications_ingest_their_resources_and_report_gaps(
    ingestor: Ingestor, notify: Notify
) -> None:
    def send(bundle: dict[str, Any]) -> list[Outcome]:
        return ingestor.ingest_text(orjson.dumps(bundle), "notification")

    first = send(notify([1, 2], since=2))
    assert [o.status for o in first] == ["accepted", "accepted"]  # the status entry is no resource
    assert ingestor.stats.gaps == []
    second = send(notify([5], since=5))
    assert [o.status for o in second] == ["accepted"]
    [gap] = ingestor.stats.gaps
    assert (gap["expected_event"], gap["received_event"], gap["missing"]) == (3, 5, 2)
    # A heartbeat that says more events happened than we have seen is a gap too.
    assert send(notify([], since=8, kind="heartbeat")) == []
    heartbeat_gap = ingestor.stats.gaps[-1]
    assert (heartbeat_gap["expected_event"], heartbeat_gap["missing"]) == (6, 3)
    # An up-to-date heartbeat, and the next event in sequence, are not.
    assert send(notify([], since=8, kind="heartbeat")) == []
    assert [o.status for o in send(notify([9], since=9))] == ["accepted"]
    assert len(ingestor.stats.gaps) == 2
    # Replays of old events are not gaps, and their resources are unchanged.
    assert [o.status for o in send(notify([1, 2], since=2))] == ["unchanged", "unchanged"]
    assert len(ingestor.stats.gaps) == 2
    assert ingestor.stats.to_dict()["subscription_gaps"] == ingestor.stats.gaps


def test_r5_notification_resources_are_read_as_r5(ingestor: Ingestor) -> None:
    outcomes = ingestor.ingest_text(orjson.dumps(r5_notification([1])), "n")
    assert outcomes[0].status == "accepted"
    assert published(ingestor, key("Observation", "ev1"))[-1].provenance.fhir_version == "R5"


def test_id_only_notification_entries_are_skipped(ingestor: Ingestor) -> None:
    bundle = r5_notification([1])
    bundle["entry"][1] = {"fullUrl": "https://ehr.example.org/fhir/Observation/ev1"}
    [outcome] = ingestor.ingest_text(orjson.dumps(bundle), "n")
    assert outcome.status == "skipped"


def test_gaps_are_per_subscription(ingestor: Ingestor) -> None:
    for bundle in (
        r5_notification([1], sub="Subscription/a"),
        r5_notification([7], sub="Subscription/b"),
    ):
        ingestor.ingest_text(orjson.dumps(bundle), "n")
    assert ingestor.stats.gaps == []


# --- the Synthea samples ------------------------------------------------------------------


def sample_files() -> list[Path]:
    files = sorted(SAMPLES.glob("*.json"))
    assert files, f"no samples under {SAMPLES}"
    return files


def test_every_synthea_resource_is_accounted_for() -> None:
    ingestor = make()
    total_entries = 0
    for path in sample_files():
        text = path.read_bytes()
        entries = len(orjson.loads(text)["entry"])
        total_entries += entries
        outcomes = ingestor.ingest_text(text, path.name)
        counts = Counter(o.status for o in outcomes)
        assert set(counts) <= set(STATUSES)
        assert sum(counts.values()) == entries, path.name
        assert counts["dead_lettered"] == 0, [o.reason for o in outcomes if o.reason]
    stats = ingestor.stats.to_dict()
    assert stats["total"] == total_entries
    assert stats["dead_lettered"] == 0
    assert stats["accepted"] > 1000
    assert stats["by_resource_type"]["Claim"]["skipped"] > 0
    assert stats["by_resource_type"]["Observation"]["accepted"] > 500
    assert sink(ingestor).dead_letters == []
    for envelope in sink(ingestor).published_facts:
        assert decode_resource_facts(envelope.to_json()) == envelope
    ingestor.commit()
    before = len(sink(ingestor).published_facts) + len(sink(ingestor).published_references)
    again: Counter[str] = Counter()
    for path in sample_files():
        again.update(o.status for o in ingestor.ingest_text(path.read_bytes(), path.name))
    assert again["accepted"] == 0
    assert again["dead_lettered"] == 0
    assert sum(again.values()) == total_entries
    assert len(sink(ingestor).published_facts) + len(sink(ingestor).published_references) == before


def test_synthea_in_full_validation_mode() -> None:
    ingestor = make(validation_mode="full")
    for path in sample_files()[:4]:
        outcomes = ingestor.ingest_text(path.read_bytes(), path.name)
        assert all(o.status in ("accepted", "skipped", "unchanged") for o in outcomes), path.name


# --- the SQLite vault across restarts ---------------------------------------------------------


def test_sql_vault_survives_close_and_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    organization = {
        "resourceType": "Organization",
        "id": "org1",
        "identifier": [
            {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y12345"}
        ],
    }
    managed = patient(managingOrganization={"reference": "Organization/org1"})

    first = make(SqlVault(url))
    assert one(first, organization).status == "accepted"
    assert one(first, managed).status == "accepted"
    assert one(first, observation(meta={"versionId": "2"})).status == "accepted"
    assert one(first, observation("gone")).status == "accepted"
    first.ingest_text(orjson.dumps(r5_notification([1, 2])), "n")
    pseudonym = pseudonym_of(first)
    first.commit()
    first.vault.close()

    second = make(SqlVault(url))
    # Everything already seen is unchanged; older versions stay older.
    assert one(second, organization).status == "unchanged"
    assert one(second, managed).status == "unchanged"
    assert one(second, observation(meta={"versionId": "2"})).status == "unchanged"
    assert one(second, observation(value=1.0, meta={"versionId": "1"})).status == "unchanged"
    # Patients resolve from the index, by reference and by identifier.
    by_reference = one(second, observation("new"))
    conditional = one(
        second,
        observation("cond", subject="x")
        | {"subject": {"reference": f"Patient?identifier={NHS_SYSTEM}|9434765919"}},
    )
    assert by_reference.status == conditional.status == "accepted"
    assert published(second, key("Observation", "new"))[0].patient == pseudonym
    assert published(second, key("Observation", "cond"))[0].patient == pseudonym
    # The organisation summary is still known: a new patient gets the ODS code as site.
    other = one(
        second,
        patient("pat9", "9999999999", managingOrganization={"reference": "Organization/org1"}),
    )
    assert other.status == "accepted"
    assert published(second, key("Patient", "pat9"))[0].facts[0].site == "Y12345"  # type: ignore[union-attr]
    # Versions continue above where the first process left off, by the gap a later ingestor
    # keeps for the first version of each key (the first may have died before indexing).
    update = one(second, observation(value=8.0, meta={"versionId": "3"}))
    assert (update.status, update.seq) == ("accepted", 1 + RESTART_GAP)
    again = one(second, observation(value=9.0, meta={"versionId": "4"}))
    assert (again.status, again.seq) == ("accepted", 2 + RESTART_GAP)  # then one by one
    deleted = second.delete("Observation", "gone", "test")
    assert (deleted.status, deleted.seq) == ("accepted", 1 + RESTART_GAP)
    assert published(second, key("Observation", "gone"))[-1].retracted is True
    # Subscription state survives: event 5 after 1-2 is a gap of 2.
    second.ingest_text(orjson.dumps(r5_notification([5])), "n")
    assert [g["missing"] for g in second.stats.gaps] == [2]
    second.commit()
    second.vault.close()

    third = make(SqlVault(url))
    assert third.delete("Observation", "gone", "test").status == "unchanged"
    assert one(third, observation("gone")).status == "unchanged"  # a replay does not undelete
    assert one(third, observation(value=9.0, meta={"versionId": "4"})).status == "unchanged"
    identity = third.vault.get_identity(pseudonym)
    assert identity is not None and identity["nhs_number"] == "9434765919"
    third.commit()
    third.vault.close()


def test_sql_vault_uncommitted_work_is_redone_after_a_crash(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    first = make(SqlVault(url))
    one(first, patient())
    first.commit()
    one(first, observation())  # published, but the index is never committed
    first.vault.close()
    second = make(SqlVault(url))
    redo = one(second, observation())
    # above anything the first may have published: a higher copy of the same version
    assert (redo.status, redo.seq) == ("accepted", RESTART_GAP)
    second.commit()
    second.vault.close()


def test_a_version_after_a_crash_never_shares_a_seq_with_one_the_dead_ingestor_published(
    tmp_path: Path,
) -> None:
    """Killed between the broker's acknowledgement and the index commit: the dead ingestor's
    versions are on the broker, above the index, with no floor. A different version sent after
    the restart must not get one of their seqs (consumers keep the first envelope of a (key,
    seq): the new version would be lost), whatever the dead batch held."""
    url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    first = make(SqlVault(url))
    one(first, patient())
    one(first, observation(value=5.0))
    first.commit()
    # a batch of three versions of the same observation, acknowledged by the broker...
    for value in (6.0, 7.0, 8.0):
        one(first, observation(value=value))
    first.sink.flush()
    on_broker = {e.seq for e in published(first, key("Observation", "obs1"))}
    assert on_broker == {1, 2, 3, 4}
    # ...and the process killed before the index commit (the vault's transaction is lost)
    first.vault.rollback()
    first.vault.close()
    second = make(SqlVault(url))
    assert second.vault.get_index([key("Observation", "obs1")])[key("Observation", "obs1")].seq == 1
    newer = one(second, observation(value=9.0))
    assert newer.status == "accepted"
    assert newer.seq is not None and newer.seq > max(on_broker)
    second.commit()
    second.vault.close()


def test_dead_letter_value_is_json_with_a_schema(ingestor: Ingestor) -> None:
    one(ingestor, b"{")
    dead = sink(ingestor).dead_letters[-1]
    assert isinstance(dead, DeadLetter)
    body = orjson.loads(dead.value)
    assert body["schema"] == "concierge.deadletter/1"
    assert {"received_at", "source", "origin", "operation_outcome", "payload"} <= set(body)


# --- regressions: inputs that used to raise out of the Ingestor --------------------------------


@pytest.mark.parametrize("depth", [254, 255, 300, 1000])
def test_json_nested_deeper_than_orjson_writes_is_dead_lettered(
    ingestor: Ingestor, depth: int
) -> None:
    garbage = "[" * depth + "]" * depth
    text = ('{"resourceType": "Observation", "id": "deep", "extension": ' + garbage + "}").encode()
    bundle = (
        '{"resourceType": "Bundle", "type": "batch", "entry": [{"resource": '
        + text.decode()
        + "}]}"
    ).encode()
    for document in (text, bundle):
        [outcome] = ingestor.ingest_text(document, "deep")
        assert outcome.status == "dead_lettered"
    [line] = list(ingestor.ingest_ndjson_lines([text], "deep.ndjson"))
    assert line.status == "dead_lettered"
    assert letter(ingestor)["payload"] == text.decode()


def test_str_input_with_a_lone_surrogate_is_dead_lettered(ingestor: Ingestor) -> None:
    [outcome] = ingestor.ingest_text('{"resourceType": "Patient", "id": "\ud800"}', "str")
    assert outcome.status == "dead_lettered"
    assert letter(ingestor)["payload"].startswith('{"resourceType"')


@pytest.mark.parametrize("mode", ["fast", "full"])
@pytest.mark.parametrize("contained_type", ["Type", "Coding", 5, None])
def test_contained_resource_of_unknown_type(mode: str, contained_type: Any) -> None:
    ingestor = make(validation_mode=mode)
    one(ingestor, patient())
    resource = {**observation(), "status": "bogus", "contained": [{"resourceType": contained_type}]}
    outcome = one(ingestor, resource)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None and outcome.outcome["issue"]


@pytest.mark.parametrize(
    "header",
    [
        {"resourceType": "Parameters", "parameter": 5},
        {"resourceType": "Parameters", "parameter": [{"name": ["subscription"]}]},
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "subscription"}, {"name": "notification-event", "part": 7}],
        },
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subscription", "valueReference": {"reference": "Subscription/x"}},
                {"name": "events-since-subscription-start", "valueString": "--5"},
            ],
        },
        {"resourceType": "SubscriptionStatus", "eventsSinceSubscriptionStart": "²"},
        {"resourceType": "SubscriptionStatus", "notificationEvent": [{"eventNumber": "1e3"}]},
        {"resourceType": "SubscriptionStatus", "notificationEvent": [{"eventNumber": 2**64 - 1}]},
        {"resourceType": "SubscriptionStatus", "notificationEvent": {"eventNumber": "1"}},
    ],
)
@pytest.mark.parametrize("vault_kind", ["memory", "sql"])
def test_malformed_notification_headers_do_not_raise(
    header: dict[str, Any], vault_kind: str, tmp_path: Path
) -> None:
    vault: Vault = (
        MemoryVault() if vault_kind == "memory" else SqlVault(f"sqlite:///{tmp_path / 'v.sqlite'}")
    )
    ingestor = make(vault)
    one(ingestor, patient())
    for btype in ("history", "subscription-notification"):
        bundle = {
            "resourceType": "Bundle",
            "type": btype,
            "entry": [{"resource": header}, {"resource": observation(f"n-{btype}")}],
        }
        outcomes = ingestor.ingest_text(orjson.dumps(bundle), "n")
        assert outcomes[-1].status == "accepted"
        assert ingestor.stats.gaps == []
    ingestor.commit()
    vault.close()


# --- text the stores cannot keep ---------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        (patient(name=[{"family": "Test\u0000person"}]), "Patient.name[0].family"),
        (patient(name=[{"family": "T", "given": ["A\u0000"]}]), "Patient.name[0].given"),
        (
            patient(identifier=[{"system": NHS_SYSTEM, "value": "943476\u00005919"}]),
            "Patient.identifier[0].value",
        ),
        (
            observation(code={"coding": [{"system": LOINC, "code": "2345\u00007"}]}),
            "Observation.code.coding[0].code",
        ),
        (
            observation(code={"coding": [{"system": "http://loinc\u0000.org", "code": "2345-7"}]}),
            "Observation.code.coding[0].system",
        ),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nul_in_a_string_the_product_reads_is_dead_lettered_not_a_failed_batch(
    backend: str, tmp_path: Path, resource: dict[str, Any], expression: str
) -> None:
    """Seen probing the API's contract: a Patient named with U+0000 reached the identity vault,
    which PostgreSQL refused at commit, so ``POST /fhir`` answered 500 and the batch aborted.
    It is dead-lettered with the reason, on any vault."""
    with fresh_database(backend, tmp_path, migrate=False) as url:
        vault = SqlVault(url)
        try:
            ingestor = make(vault)
            assert one(ingestor, patient("pat1")).status == "accepted"
            outcome = one(ingestor, resource)
            ingestor.commit()  # nothing the vault cannot keep reached it
            assert outcome.status == "dead_lettered"
            assert outcome.outcome is not None
            issue = outcome.outcome["issue"][-1]
            assert issue["expression"] == [expression]
            assert "U+0000" in issue["diagnostics"]
        finally:
            vault.close()
