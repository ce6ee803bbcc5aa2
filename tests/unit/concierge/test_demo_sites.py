"""The demo's live patients name their sites: the API writes as the source system of the demo's
EHR token, the bulk load's."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from concierge.demo import _headers, demo_environment
from core.auth import SigningKeys, verify
from core.settings import Settings
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import MemorySink
from fhir_adapters.vault import MemoryVault
from tests.spec.test_adapter_spec import ODS, ORGANIZATION, PATIENT


def test_patients_streamed_through_the_api_resolve_the_bulk_loaded_organizations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONCIERGE_SOURCE_SYSTEM", raising=False)
    env, source = demo_environment(tmp_path)
    for name in ("CONCIERGE_HOME", "CONCIERGE_SOURCE_SYSTEM"):
        monkeypatch.setenv(name, env[name])
    api = Settings()  # what the API process the demo starts reads
    assert api.source_system == source
    # the API ingests as the source system of the caller's token: the demo's EHR token names
    # the bulk load's
    token = _headers(api, "source", "Demo EHR", source)["Authorization"].removeprefix("Bearer ")
    principal = verify(SigningKeys.from_settings(api), token)
    assert principal.source_system == source
    vault, secret = MemoryVault(), Pseudonymiser(b"d" * 32)
    bulk = Ingestor(vault, MemorySink(), secret, source)
    bulk.ingest_text(orjson.dumps(ORGANIZATION), "demo:reference")
    live = Ingestor(vault, MemorySink(), secret, "urn:the-api:own")
    with live.acting_as(principal.source_system):
        live.ingest_text(orjson.dumps(PATIENT), "POST /fhir")
    assert isinstance(live.sink, MemorySink)
    fact = live.sink.published_facts[0].facts[0]
    assert (fact.site, fact.site_key) == (ODS, f"{source}|Organization|org1")  # type: ignore[union-attr]


def test_a_source_system_set_by_the_operator_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCIERGE_SOURCE_SYSTEM", "urn:trust:ehr")
    env, source = demo_environment(tmp_path)
    assert source == env["CONCIERGE_SOURCE_SYSTEM"] == "urn:trust:ehr"
