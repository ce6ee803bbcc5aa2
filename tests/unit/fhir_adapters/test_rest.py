"""The FHIR REST endpoint, through FastAPI's TestClient, on an in-memory Ingestor (no Kafka)."""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

with warnings.catch_warnings():
    # starlette asks for the httpx2 fork; the project depends on httpx. Not ours to change here.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from concierge.api import create_app
from core.auth import issue
from core.contracts.facts import decode_resource_facts
from core.settings import Settings
from fhir_adapters.pipeline import EXCERPT_BYTES, Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.rest import IngestService, _read_body
from fhir_adapters.sinks import DeliveryFailed, MemorySink
from fhir_adapters.vault import MemoryVault

SOURCE = "urn:rest"
FHIR = "application/fhir+json"
R5 = "application/fhir+json; fhirVersion=5.0"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"


class Api:
    def __init__(self, client: TestClient, ingestor: Ingestor) -> None:
        self.client = client
        self.ingestor = ingestor

    @property
    def sink(self) -> MemorySink:
        assert isinstance(self.ingestor.sink, MemorySink)
        return self.ingestor.sink

    def send(
        self, method: str, path: str, body: Any, content_type: str = FHIR
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        response = self.client.request(
            method, path, content=content, headers={"Content-Type": content_type}
        )
        assert response.headers["content-type"].startswith(FHIR)
        return response.status_code, response.json(), dict(response.headers)

    def last_letter(self) -> dict[str, Any]:
        return orjson.loads(self.sink.dead_letters[-1].value)


class FakeKafka(MemorySink):
    """A sink that fails the next ``failures`` flushes with ``kind`` and takes ``delay``
    seconds per flush, like the Kafka sink with a slow or absent broker."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.kind = "unavailable"
        self.delay = 0.0

    def flush(self) -> None:
        time.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise DeliveryFailed("broker unavailable", self.kind)  # type: ignore[arg-type]
        super().flush()


@contextmanager
def serve(timeout_seconds: float = 5.0, **overrides: Any) -> Iterator[Api]:
    values: dict[str, Any] = {
        "max_resource_bytes": 20_000,
        "max_body_bytes": 200_000,
        "kafka_bootstrap_servers": "127.0.0.1:1",
        "feasibility_feed": False,
        "recruitment_api": False,
        "surveillance_monitor": False,
        "audit_anchor_seconds": 0,
        **overrides,
    }
    settings = Settings(**values)
    ingestor = Ingestor(
        MemoryVault(),
        FakeKafka(),
        Pseudonymiser(b"r" * 32),
        SOURCE,
        max_resource_bytes=settings.max_resource_bytes,
    )
    app = create_app(settings, ingest_service=IngestService(ingestor, timeout_seconds))
    token = issue(
        settings.token_key.get_secret_value().encode(), "source", "test-ehr", source_system=SOURCE
    )
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield Api(client, ingestor)


@pytest.fixture
def api() -> Iterator[Api]:
    with serve() as served:
        yield served


def kafka(api: Api) -> FakeKafka:
    assert isinstance(api.ingestor.sink, FakeKafka)
    return api.ingestor.sink


def patient(rid: str = "pat1") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": rid,
        "identifier": [{"system": NHS_SYSTEM, "value": "9434765919"}],
        "name": [{"family": "Restful"}],
    }


def observation(rid: str = "obs1", subject: str = "Patient/pat1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 5.5, "system": "http://unitsofmeasure.org", "code": "mmol/L"},
        **extra,
    }


def entry(resource: dict[str, Any]) -> dict[str, Any]:
    path = f"{resource['resourceType']}/{resource['id']}"
    return {"resource": resource, "request": {"method": "PUT", "url": path}}


# --- Bundles ----------------------------------------------------------------------------------


def test_post_bundle_answers_a_batch_response_per_entry_in_request_order(api: Api) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            entry(observation()),  # refers to the Patient further down: still resolves
            entry({"resourceType": "Claim", "id": "claim1"}),
            "not an entry",
            entry(observation("obs-bad", effectiveDateTime="2023-02-29")),
            entry(patient()),
            {"request": {"method": "DELETE", "url": "Observation/never"}},
        ],
    }
    status, body, _ = api.send("POST", "/fhir", bundle)
    assert status == 200
    assert (body["resourceType"], body["type"]) == ("Bundle", "batch-response")
    responses = [e["response"] for e in body["entry"]]
    assert [r["status"] for r in responses] == [
        "201 Created",
        "200 OK",
        "422 Unprocessable Entity",
        "422 Unprocessable Entity",
        "201 Created",
        "200 OK",
    ]
    assert responses[0]["location"] == "Observation/obs1/_history/1"
    assert responses[4]["location"] == "Patient/pat1/_history/1"
    assert "location" not in responses[1]
    bad = responses[3]["outcome"]
    assert bad["resourceType"] == "OperationOutcome"
    assert bad["issue"][-1]["expression"] == ["Observation.effectiveDateTime"]
    assert responses[2]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[2]"]
    assert len(api.sink.dead_letters) == 2
    # The same Bundle again: nothing new.
    status, again, _ = api.send("POST", "/fhir", bundle)
    statuses = [e["response"]["status"] for e in again["entry"]]
    assert "201 Created" not in statuses


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"resourceType": "Bundle", "type": "bogus", "entry": []}'],
)
def test_post_unusable_document_is_400_and_dead_lettered(api: Api, body: bytes) -> None:
    status, outcome, _ = api.send("POST", "/fhir", body)
    assert status == 400
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"]
    letter = api.last_letter()
    assert letter["payload"] == body.decode() or orjson.loads(letter["payload"]) == orjson.loads(
        body
    )
    assert letter["origin"] == "http:POST /fhir"


def test_post_single_resource_to_the_base(api: Api) -> None:
    status, body, _ = api.send("POST", "/fhir", patient())
    assert status == 200
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created"]


# --- single resources -------------------------------------------------------------------------


def test_post_resource_creates_with_location(api: Api) -> None:
    status, body, headers = api.send("POST", "/fhir/Patient", patient())
    assert status == 201
    assert headers["location"] == "Patient/pat1/_history/1"
    assert body["resourceType"] == "OperationOutcome"
    [envelope] = api.sink.published_facts
    assert decode_resource_facts(envelope.to_json()) == envelope


def test_post_resource_without_id_gets_one(api: Api) -> None:
    anonymous = {k: v for k, v in patient().items() if k != "id"}
    status, _, headers = api.send("POST", "/fhir/Patient", anonymous)
    assert status == 201
    rtype, rid, history, version = headers["location"].split("/")
    assert (rtype, history, version) == ("Patient", "_history", "1")
    assert len(rid) == 36


def test_put_creates_then_updates_then_is_unchanged(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    status, _, headers = api.send("PUT", "/fhir/Observation/obs1", observation())
    assert (status, headers["location"]) == (201, "Observation/obs1/_history/1")
    changed = observation(valueQuantity={"value": 7.0, "unit": "mmol/L"})
    status, _, headers = api.send("PUT", "/fhir/Observation/obs1", changed)
    assert (status, headers["location"]) == (200, "Observation/obs1/_history/2")
    status, body, _ = api.send("PUT", "/fhir/Observation/obs1", changed)
    assert status == 200
    assert body["issue"][0]["diagnostics"] == "same content already ingested"
    assert len(api.sink.published_facts) == 3


@pytest.mark.parametrize(
    ("path", "resource", "expression"),
    [
        ("/fhir/Observation/other", observation(), "Observation.id"),
        ("/fhir/Observation/obs1", {**observation(), "id": None}, "Observation.id"),
        ("/fhir/Condition/obs1", observation(), "resourceType"),
    ],
)
def test_put_with_mismatched_url_is_400_and_dead_lettered(
    api: Api, path: str, resource: dict[str, Any], expression: str
) -> None:
    status, outcome, _ = api.send("PUT", path, resource)
    assert status == 400
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "invalid"
    assert outcome["issue"][0]["expression"] == [expression]
    letter = api.last_letter()
    assert orjson.loads(letter["payload"]) == resource
    assert letter["operation_outcome"] == outcome
    assert letter["origin"] == f"http:PUT {path}"
    assert api.sink.published_facts == []


# --- identifiers in URLs ------------------------------------------------------------------------

#: Ids a URL may not carry (as sent: percent-encoded, so the client sends them unnormalised).
#: Seen: ``PUT /fhir/Patient/..`` was accepted and answered ``Location: Patient/../_history/1``.
BAD_URL_IDS = {
    "dot-dot": "%2E%2E",
    "dot": "%2E",
    "too-long": "x" * 65,
    "space": "a%20b",
    "dollar": "a$b",
    "unicode": "%C3%A9",
}


@pytest.mark.parametrize("sent", list(BAD_URL_IDS.values()), ids=list(BAD_URL_IDS))
def test_put_to_an_id_that_is_no_fhir_id_is_400_dead_lettered_and_never_a_location(
    api: Api, sent: str
) -> None:
    body = {**patient(), "id": ".."}
    status, outcome, headers = api.send("PUT", f"/fhir/Patient/{sent}", body)
    assert status == 400
    assert "location" not in headers
    [issue] = outcome["issue"]
    assert (issue["code"], issue["expression"]) == ("value", ["Patient.id"])
    assert "in the URL" in issue["diagnostics"]
    letter = api.last_letter()
    assert orjson.loads(letter["payload"]) == body  # nothing is lost
    assert letter["operation_outcome"] == outcome
    assert api.sink.published_facts == []
    assert api.ingestor.vault.get_index([f"{SOURCE}|Patient|.."]) == {}


@pytest.mark.parametrize("sent", list(BAD_URL_IDS.values()), ids=list(BAD_URL_IDS))
def test_delete_of_an_id_that_is_no_fhir_id_is_400(api: Api, sent: str) -> None:
    response = api.client.delete(f"/fhir/Patient/{sent}")
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Patient.id"]
    assert "location" not in response.headers
    assert api.last_letter()["origin"].startswith("http:DELETE /fhir/Patient/")
    assert api.sink.published_facts == []


@pytest.mark.parametrize("rtype", ["patient", "Pat1ent", "%2E%2E"])
def test_a_url_resource_type_that_is_no_type_is_400(api: Api, rtype: str) -> None:
    status, outcome, headers = api.send("PUT", f"/fhir/{rtype}/pat1", patient())
    assert status == 400
    assert outcome["issue"][0]["expression"] == ["resourceType"]
    assert "location" not in headers
    assert api.client.delete(f"/fhir/{rtype}/pat1").status_code == 400


@pytest.mark.parametrize("rid", ["..", ".", "a/b", "../../x"])
def test_an_id_in_a_body_that_is_no_fhir_id_is_refused_and_never_a_location(
    api: Api, rid: str
) -> None:
    """POST takes the id from the body; a skipped type is answered with its Location too."""
    status, outcome, headers = api.send("POST", "/fhir/Patient", {**patient(), "id": rid})
    assert status == 422
    assert "location" not in headers
    assert outcome["issue"][-1]["expression"] == ["Patient.id"]
    status, _, headers = api.send("POST", "/fhir/Claim", {"resourceType": "Claim", "id": rid})
    assert status == 200 and "location" not in headers
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": {**patient(), "id": rid}},
            {"request": {"method": "DELETE", "url": f"Patient/{rid}"}},
        ],
    }
    status, body, _ = api.send("POST", "/fhir", bundle)
    responses = [e["response"] for e in body["entry"]]
    assert [r["status"] for r in responses] == ["422 Unprocessable Entity"] * 2
    assert not any("location" in r for r in responses)
    assert api.sink.published_facts == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType": "Patient", "id": "pat1"',
        b"\xff\xfe",
        b"",
        b'"Patient"',
        b'{"resourceType": "Patient", "id": "pat1", "x": ' + b"[" * 300 + b"]" * 300 + b"}",
    ],
    ids=["truncated", "not-utf8", "empty", "not-an-object", "nested-too-deep"],
)
def test_put_invalid_json_is_400_and_dead_lettered(api: Api, body: bytes) -> None:
    status, outcome, _ = api.send("PUT", "/fhir/Patient/pat1", body)
    assert status == 400
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "structure"
    assert len(api.sink.dead_letters) == 1
    assert api.last_letter()["payload"] == body.decode("utf-8", errors="replace")


def test_invalid_resource_is_422_with_the_reason(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    status, outcome, _ = api.send(
        "PUT", "/fhir/Observation/o2", observation("o2", "Patient/nobody")
    )
    assert status == 422
    assert outcome["issue"][-1]["code"] == "not-found"
    assert outcome["issue"][-1]["expression"] == ["Observation.subject"]
    assert orjson.loads(api.last_letter()["payload"]) == observation("o2", "Patient/nobody")


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", "/fhir/Patient/pat1"), ("POST", "/fhir/Patient")]
)
def test_oversize_resource_is_413_and_dead_lettered_as_an_excerpt(
    api: Api, method: str, path: str
) -> None:
    """Single resources are held to CONCIERGE_MAX_RESOURCE_BYTES (20 kB here) on PUT too
    (PUT used to allow ten times that), refused on Content-Length before anything is parsed."""
    huge = orjson.dumps({**patient(), "text": {"status": "generated", "div": "x" * 25_000}})
    status, outcome, _ = api.send(method, path, huge)
    assert status == 413
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "too-long"
    assert "CONCIERGE_MAX_RESOURCE_BYTES" in outcome["issue"][0]["diagnostics"]
    letter = api.last_letter()
    assert letter["payload"].encode() == huge[:EXCERPT_BYTES]
    assert (letter["payload_truncated"], letter["payload_bytes"]) == (True, len(huge))
    assert letter["payload_sha256"] is None  # refused unread: no digest of what was not read
    assert letter["origin"] == f"http:{method} {path}"
    assert api.sink.published_facts == []


def test_oversize_body_without_content_length_is_413(api: Api) -> None:
    huge = orjson.dumps({**patient(), "text": {"status": "generated", "div": "x" * 25_000}})
    response = api.client.put(
        "/fhir/Patient/pat1",
        content=iter([huge[i : i + 1000] for i in range(0, len(huge), 1000)]),
        headers={"Content-Type": FHIR},
    )
    assert response.status_code == 413
    assert "more than 20000 bytes" in response.json()["issue"][0]["diagnostics"]
    letter = api.last_letter()
    assert letter["payload"].encode() == huge[:EXCERPT_BYTES]
    assert letter["payload_bytes"] is None


def test_a_body_is_never_read_past_the_limit() -> None:
    """Without Content-Length the body is read in chunks and refused once past the limit."""
    from starlette.requests import Request

    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}  # endless

    import anyio

    request = Request({"type": "http", "method": "PUT", "headers": []}, receive)
    excerpt = anyio.run(_read_body, request, 10 * 1024)
    assert not isinstance(excerpt, bytes)
    assert pulled == 11
    assert (len(excerpt.head), excerpt.size, excerpt.sha256) == (EXCERPT_BYTES, None, None)


def test_post_bundle_body_over_the_body_limit_is_413(api: Api) -> None:
    entries = [entry(observation(f"o{i}", note=[{"text": "y" * 1000}])) for i in range(250)]
    big = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert len(big) > 200_000
    status, outcome, _ = api.send("POST", "/fhir", big)
    assert status == 413
    assert "CONCIERGE_MAX_BODY_BYTES" in outcome["issue"][0]["diagnostics"]
    letter = api.last_letter()
    assert (letter["origin"], letter["payload_bytes"]) == ("http:POST /fhir", len(big))
    assert len(letter["payload"].encode()) <= EXCERPT_BYTES
    assert api.sink.published_facts == []


def test_post_single_oversize_resource_to_the_base_is_413_with_a_bounded_letter(
    api: Api,
) -> None:
    """Seen: a 50 MB resource at POST /fhir answered 500 with nothing dead-lettered (the
    letter held the whole payload, too large for Kafka). Within the body limit but over the
    resource limit: 413, and the letter holds an excerpt, the digest and the size."""
    huge = orjson.dumps({**patient(), "text": {"status": "generated", "div": "z" * 150_000}})
    status, outcome, _ = api.send("POST", "/fhir", huge)
    assert status == 413
    assert outcome["issue"][0]["code"] == "too-long"
    letter = api.last_letter()
    assert len(letter["payload"].encode()) <= EXCERPT_BYTES
    assert letter["payload_bytes"] == len(huge)
    assert letter["payload_sha256"] == hashlib.sha256(huge).hexdigest()


def test_skipped_resource_is_200(api: Api) -> None:
    status, body, _ = api.send(
        "PUT", "/fhir/Encounter/e1", {"resourceType": "Encounter", "id": "e1"}
    )
    assert status == 200
    assert "not used" in body["issue"][0]["diagnostics"]
    assert api.sink.published_facts == []


# --- DELETE -----------------------------------------------------------------------------------


def test_delete_retracts(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    api.send("PUT", "/fhir/Observation/obs1", observation())
    response = api.client.delete("/fhir/Observation/obs1")
    assert response.status_code == 200
    assert response.json()["resourceType"] == "OperationOutcome"
    retraction = api.sink.published_facts[-1]
    assert retraction.key == f"{SOURCE}|Observation|obs1"
    assert (retraction.retracted, retraction.seq, retraction.facts) == (True, 2, ())
    again = api.client.delete("/fhir/Observation/obs1")
    assert again.status_code == 200
    assert again.json()["issue"][0]["diagnostics"] == "nothing to delete"
    assert api.sink.published_facts[-1] is retraction


# --- FHIR versions ----------------------------------------------------------------------------


def test_r5_by_content_type(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    statement = {
        "resourceType": "MedicationStatement",
        "id": "ms1",
        "status": "recorded",  # an R5 status: invalid in R4
        "medication": {"concept": {"coding": [{"system": "https://dmd.nhs.uk", "code": "1"}]}},
        "subject": {"reference": "Patient/pat1"},
    }
    status, outcome, _ = api.send("PUT", "/fhir/MedicationStatement/ms1", statement)
    assert status == 422
    assert outcome["issue"][-1]["expression"] == ["MedicationStatement.status"]
    status, _, _ = api.send("PUT", "/fhir/MedicationStatement/ms1", statement, R5)
    assert status == 201
    envelope = api.sink.published_facts[-1]
    assert envelope.provenance.fhir_version == "R5"
    r4 = "application/fhir+json; fhirVersion=4.0"
    status, _, _ = api.send("PUT", "/fhir/Observation/obs1", observation(), r4)
    assert status == 201
    assert api.sink.published_facts[-1].provenance.fhir_version == "R4"


def test_r5_bundle_by_content_type(api: Api) -> None:
    usage = {
        "resourceType": "DeviceUsage",
        "id": "du1",
        "status": "active",
        "patient": {"reference": "Patient/pat1"},
        "device": {"concept": {"text": "insulin pump"}},
    }
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry(patient()), entry(usage)]}
    status, body, _ = api.send("POST", "/fhir", bundle, R5)
    assert status == 200
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created", "201 Created"]
    assert {e.provenance.fhir_version for e in api.sink.published_facts} == {"R5"}


# --- Subscription notifications ----------------------------------------------------------------


def notification(events: list[int]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [
            {
                "fullUrl": "urn:uuid:3c3c3c3c-0000-4000-8000-000000000000",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "subscription": {"reference": "Subscription/labs"},
                    "topic": "http://example.org/topics/labs",
                    "eventsSinceSubscriptionStart": str(max(events)),
                    "notificationEvent": [
                        {"eventNumber": str(n), "focus": {"reference": f"Observation/ev{n}"}}
                        for n in events
                    ],
                },
            },
            *(entry(observation(f"ev{n}")) for n in events),
        ],
    }


def test_subscription_notification_with_a_gap_is_reported(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    status, first, _ = api.send("POST", "/fhir", notification([1, 2]), R5)
    assert status == 200
    assert "meta" not in first
    assert [e["response"]["status"] for e in first["entry"]] == ["201 Created"] * 2
    status, second, _ = api.send("POST", "/fhir", notification([5]), R5)
    assert status == 200
    assert [e["response"]["status"] for e in second["entry"]] == ["201 Created"]
    [tag] = second["meta"]["tag"]
    assert (tag["system"], tag["code"]) == ("urn:concierge:subscription-gap", "gap")
    [gap] = orjson.loads(tag["display"])
    assert gap == {
        "subscription": "Subscription/labs",
        "expected_event": 3,
        "received_event": 5,
        "missing": 2,
    }
    status, third, _ = api.send("POST", "/fhir", notification([6]), R5)
    assert "meta" not in third


def test_every_request_is_committed(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    assert isinstance(api.ingestor.vault, MemoryVault)
    assert f"{SOURCE}|Patient|pat1" in api.ingestor.vault.index
    assert api.sink.flushes >= 1


def test_only_source_systems_may_write(api: Api) -> None:
    """Writes need a ``source`` token; refusals are FHIR OperationOutcomes, not problem+json."""
    body = orjson.dumps(patient())
    headers = {"Content-Type": FHIR, "Authorization": ""}
    anonymous = api.client.put("/fhir/Patient/pat1", content=body, headers=headers)
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"].startswith(FHIR)
    assert anonymous.json()["issue"][0]["code"] == "login"
    key = api.client.app.state.token_key  # type: ignore[attr-defined]
    sponsor = issue(key, "sponsor", "Acme")
    with_sponsor = {**headers, "Authorization": f"Bearer {sponsor}"}
    refused = api.client.put("/fhir/Patient/pat1", content=body, headers=with_sponsor)
    assert refused.status_code == 403
    assert refused.json()["issue"][0]["code"] == "forbidden"
    assert not api.sink.published_facts, "a refused write published nothing"


# --- failed publication -----------------------------------------------------------------------


def test_failed_publication_is_503_with_retry_after_and_indexes_nothing(api: Api) -> None:
    """Seen: a PUT that failed to publish answered 500, the next PUT's commit indexed it anyway,
    and re-sending it answered "same content already ingested": it never reached Kafka."""
    vault = api.ingestor.vault
    assert isinstance(vault, MemoryVault)
    api.send("PUT", "/fhir/Patient/pat1", patient())
    kafka(api).failures = 1
    status, outcome, headers = api.send("PUT", "/fhir/Observation/lost", observation("lost"))
    assert status == 503
    assert headers["retry-after"] == "5"
    assert outcome["issue"][0]["code"] == "transient"
    assert f"{SOURCE}|Observation|lost" not in vault.index
    status, _, _ = api.send("PUT", "/fhir/Observation/next", observation("next"))
    assert status == 201
    assert f"{SOURCE}|Observation|lost" not in vault.index
    status, body, headers = api.send("PUT", "/fhir/Observation/lost", observation("lost"))
    assert status == 201, body
    assert headers["location"] == "Observation/lost/_history/2"  # above the seq that failed
    assert [e.seq for e in api.sink.published_facts if e.key.endswith("|lost")] == [2]


def test_message_too_large_for_the_broker_is_413_dead_lettered_and_can_be_retried(
    api: Api,
) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    kafka(api).failures, kafka(api).kind = 1, "too_large"
    body = orjson.dumps(observation("big"))
    status, outcome, _ = api.send("PUT", "/fhir/Observation/big", body)
    assert status == 413
    assert "max.message.bytes" in outcome["issue"][0]["diagnostics"]
    letter = api.last_letter()
    assert (letter["resource_id"], letter["payload_bytes"]) == ("big", len(body))
    assert letter["payload_sha256"] == hashlib.sha256(body).hexdigest()
    assert not [e for e in api.sink.published_facts if e.key.endswith("|big")]
    status, _, _ = api.send("PUT", "/fhir/Observation/big", body)  # e.g. the topic now allows it
    assert status == 201


def test_failed_bundle_publication_is_503_and_a_retry_publishes_all_of_it(api: Api) -> None:
    entries = [entry(patient())] + [entry(observation(f"o{i}")) for i in range(3)]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
    kafka(api).failures = 1
    status, _, headers = api.send("POST", "/fhir", bundle)
    assert (status, headers["retry-after"]) == (503, "5")
    assert isinstance(api.ingestor.vault, MemoryVault)
    assert api.ingestor.vault.index == {}
    status, body, _ = api.send("POST", "/fhir", bundle)
    assert status == 200
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created"] * 4


def test_failed_delete_is_503_and_retracts_on_retry(api: Api) -> None:
    api.send("PUT", "/fhir/Patient/pat1", patient())
    api.send("PUT", "/fhir/Observation/obs1", observation())
    kafka(api).failures = 1
    assert api.client.delete("/fhir/Observation/obs1").status_code == 503
    response = api.client.delete("/fhir/Observation/obs1")
    assert response.json()["issue"][0]["diagnostics"] == "deleted"
    assert api.sink.published_facts[-1].retracted


# --- the event loop stays free ---------------------------------------------------------------


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(call()))
    thread.start()
    return thread, results


def test_healthz_answers_while_a_slow_publication_is_in_flight(api: Api) -> None:
    """Seen: ingest ran on the event loop, so a slow broker froze every route (``/healthz``
    took 19.9 s). Ingest now runs on a worker thread."""
    api.send("PUT", "/fhir/Patient/pat1", patient())
    kafka(api).delay = 1.5
    thread, results = in_thread(lambda: api.send("PUT", "/fhir/Observation/obs1", observation())[0])
    time.sleep(0.2)
    timings = []
    while thread.is_alive():
        started = time.perf_counter()
        assert api.client.get("/healthz").status_code == 200
        timings.append(time.perf_counter() - started)
        time.sleep(0.05)
    thread.join()
    assert results == [201]
    assert len(timings) >= 5 and max(timings) < 0.5, timings


def test_a_request_that_cannot_get_the_ingestor_in_time_is_503() -> None:
    with serve(timeout_seconds=0.5) as api:
        api.send("PUT", "/fhir/Patient/pat1", patient())
        kafka(api).delay = 1.5
        thread, results = in_thread(
            lambda: api.send("PUT", "/fhir/Observation/obs1", observation())[0]
        )
        time.sleep(0.2)
        started = time.perf_counter()
        status, outcome, headers = api.send("PUT", "/fhir/Observation/obs2", observation("obs2"))
        waited = time.perf_counter() - started
        assert (status, headers["retry-after"]) == (503, "1")
        assert "busy" in outcome["issue"][0]["diagnostics"]
        assert 0.4 < waited < 1.2
        thread.join()
        assert results == [201]


# --- query bounds ------------------------------------------------------------------------------


def test_clinician_routes_answer_422_for_out_of_range_pages(tmp_path: Path) -> None:
    """Seen: ``?offset=9223372036854775808`` answered 500 (OverflowError in the database). Pages
    are now keyset cursors (``after``, from the previous page's ``next``): a cursor the API did
    not hand out and a limit out of range are 422, never a 500 or an empty page."""
    from tests.api_world import GP_A, SITE_A, build_world

    with build_world(tmp_path) as world:
        headers = world.headers("clinician", "GP practice", practitioner=GP_A, sites=(SITE_A,))
        for route in ("/v1/clinician/candidates", "/v1/clinician/invitations"):
            assert world.client.get(route, headers=headers).status_code == 200
            for query in ("after=9223372036854775808", "after=-1", "limit=0", "limit=501"):
                response = world.client.get(f"{route}?{query}", headers=headers)
                assert response.status_code == 422, (route, query, response.text)
