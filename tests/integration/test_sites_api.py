"""On the real broker: patients streamed in through ``POST /fhir`` before their Organization, which
then arrives by another path (a bulk load with a vault of its own). The sponsor's answer shows
them as an unresolved site until then, and by ODS code and name after, without any Patient
being sent again; no answer ever shows a key embedding the source system's URI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from concierge.api import create_app
from core.auth import issue
from core.settings import Settings
from feasibility.sites import UNRESOLVED
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import KafkaSink

pytestmark = pytest.mark.integration

SOURCE = "urn:test:live-ehr"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
ODS, NAME = "RR8", "Leeds Teaching Hospitals NHS Trust"
PATIENTS = 15
QUESTION = {"title": "adults", "index_date": "2026-01-01",
            "inclusion": [{"type": "age", "min": 18}]}  # fmt: skip

ORGANIZATION = {
    "resourceType": "Organization",
    "id": "site-1",
    "identifier": [{"system": ODS_SYSTEM, "value": ODS}],
    "active": True,
    "name": NAME,
    "address": [{"city": "Leeds", "postalCode": "LS9 7TF"}],
}


def patient(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"live-{i}",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": f"90000{i:05d}"}],
        "gender": "female" if i % 2 else "male",
        "birthDate": "1970-05-01",
        "address": [{"use": "home", "postalCode": "LS1 4AP"}],
        "managingOrganization": {"reference": "Organization/site-1"},
    }


@pytest.fixture
def api(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, Settings]]:
    monkeypatch.setenv("CONCIERGE_DC_SUPPRESS_ZERO", "false")  # this population has empty cells
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "api-home",
        source_system=SOURCE,
        recruitment_api=False,
        surveillance_monitor=False,
    )
    with TestClient(create_app(settings)) as client:
        yield client, settings


def ask(client: TestClient, headers: dict[str, str], until: Any, timeout: float = 60) -> Any:
    """POST the question until the answer satisfies ``until`` (503s are waited out)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        response = client.post("/v1/feasibility/ask", json=QUESTION, headers=headers)
        last = (response.status_code, response.text[:500])
        if response.status_code == 200:
            body = response.json()
            assert SOURCE not in response.text, body  # never a key with the source's URI
            if until(body):
                return body
        else:
            assert response.status_code == 503, last
        time.sleep(0.3)
    pytest.fail(f"no such answer within {timeout:g} s; last {last}")


def test_patients_before_their_organization_are_named_once_it_arrives(
    api: tuple[TestClient, Settings], tmp_path: Path
) -> None:
    client, settings = api
    key = settings.token_key.get_secret_value().encode()
    source = {"Authorization": f"Bearer {issue(key, 'source', 'Live EHR', source_system=SOURCE)}"}
    sponsor = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Acme Pharma')}"}
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient(i), "request": {"method": "PUT", "url": f"Patient/live-{i}"}}
            for i in range(PATIENTS)
        ],
    }
    response = client.post(
        "/fhir",
        content=orjson.dumps(bundle),
        headers={"Content-Type": "application/fhir+json", **source},
    )
    assert response.status_code == 200, response.text[:500]

    def counted(body: Any) -> bool:
        return bool(body["total"]["value"] == PATIENTS)

    before = ask(client, sponsor, counted)
    assert {s: c["value"] for s, c in before["by_site"].items()} == {UNRESOLVED: PATIENTS}
    assert before["sites"][UNRESOLVED]["resolved"] is False

    # the Organization comes by another path: a bulk load whose vault the API never reads
    bulk = build_ingestor(
        Settings(
            kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
            topic_prefix=settings.topic_prefix,
            home=tmp_path / "bulk-home",
            source_system=SOURCE,
        ),
        sink=KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix),
    )
    outcomes = bulk.ingest_text(orjson.dumps(ORGANIZATION), "bulk")
    bulk.commit()
    bulk.vault.close()
    assert [o.status for o in outcomes] == ["accepted"]

    after = ask(client, sponsor, lambda body: ODS in body["by_site"])
    assert {s: c["value"] for s, c in after["by_site"].items()} == {ODS: PATIENTS}
    assert after["sites"] == {ODS: {"ods_code": ODS, "name": NAME, "resolved": True}}
    assert after["total"]["value"] == PATIENTS
