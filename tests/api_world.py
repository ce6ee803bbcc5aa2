"""The whole API in one process, with no broker: real SQLite stores and a real snapshot.

``build_world`` ingests FHIR through the real adapters (identities land in a real SQLite identity
vault, facts in a :class:`~fhir_adapters.sinks.MemorySink`), folds the facts into a real
columnar snapshot behind the real :class:`~feasibility.service.FeasibilityService`, runs the
recruitment service on a migrated SQLite database and builds the app with
:func:`concierge.api.create_app`. The only stand-ins are for the Kafka-backed views: saved
questions are published to memory instead of the trials topic, the live cohort view is filled
directly, and the signal monitor (when the app has one) is not started.

One patient, with distinctive identifiable values (:data:`IDENTITY`), is a member of the saved
question ``TRIAL`` and has an invitation at site A (``RA3``) routed to their GP (``GP_A``);
``GP_B`` works at site B (``RB1``) and is nobody's clinician.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from concierge.api import create_app
from concierge.commands.generate import bundle
from concierge.routes.recruitment import VaultIdentities
from core.auth import Role, issue
from core.settings import Settings
from feasibility.criteria import parse_question
from feasibility.disclosure.budget import QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.live import CohortView
from feasibility.saved import SavedQuestions, SavedTrial, TrialCreate
from feasibility.service import FeasibilityService
from feasibility.snapshot import ColumnarSnapshot
from feasibility.workspace.history import AnswerHistory, CohortHistory
from fhir_adapters.rest import IngestService
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import MemorySink
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from fhir_adapters.vault import SqlVault
from followup.progress import Standing
from infra.mirror import ReaderStatus
from recruitment.models import Invitation
from recruitment.runtime import Runtime, build_runtime
from recruitment.settings import RecruitmentSettings
from terminology.expand import Terminology
from terminology.store import TerminologyStore
from tests.recruitment_helpers import (
    SOURCE,
    Clock,
    cohort,
    fresh_database,
    patient_facts,
    practitioner,
    practitioner_key,
    trial,
)
from tests.terminology_fixtures import RELEASE_2025

SITE_A, SITE_B = "RA3", "RB1"
GP_A, GP_B = practitioner_key("matrix-gp-a"), practitioner_key("matrix-gp-b")
SPONSOR_ORG = "Acme Pharma"
TRIAL = "matrix-trial"
RETIRE = "matrix-retire"
PATIENT_RESOURCE = "matrix-patient"
CRITERIA: dict[str, Any] = {
    "schema": "concierge.criteria/1",
    "title": "Type 2 diabetes",
    "inclusion": [{"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}],
}

#: Values that identify the patient: only the patient's own clinicians may ever see them.
IDENTITY = {
    "given": "Zebedee",
    "family": "Quillfeather",
    "nhs_number": "9731462589",
    "birth_date": "1947-03-29",
    "phone": "07700 900461",
    "address_line": "17 Marrowbone Lane",
    "city": "Lower Wenlock",
}
#: The subset the clinician API serves (it shows no address).
SERVED_IDENTITY = ("given", "family", "nhs_number", "birth_date", "phone")

PATIENT = {
    "resourceType": "Patient",
    "id": PATIENT_RESOURCE,
    "identifier": [
        {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": IDENTITY["nhs_number"]}
    ],
    "name": [{"use": "official", "family": IDENTITY["family"], "given": [IDENTITY["given"]]}],
    "gender": "male",
    "birthDate": IDENTITY["birth_date"],
    "telecom": [{"system": "phone", "value": IDENTITY["phone"], "use": "home"}],
    "address": [
        {
            "use": "home",
            "line": [IDENTITY["address_line"]],
            "city": IDENTITY["city"],
            "postalCode": "LS1 4AP",
        }
    ],
}
CONDITION = {
    "resourceType": "Condition",
    "id": "matrix-condition",
    "subject": {"reference": f"Patient/{PATIENT_RESOURCE}"},
    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active",
            }
        ]
    },
    "recordedDate": "2024-05-01",
}


def fed_by_hand(name: str) -> ReaderStatus:
    """The readiness of a view filled by the test itself: complete by construction."""
    return ReaderStatus(
        name=name,
        ready=True,
        connected=True,
        caught_up=True,
        lag=0,
        staleness_seconds=0.0,
        positions={},
        waiting_for=None,
        error=None,
    )


class CurrentByHand:
    """The follow-up tables' standing when the test writes them itself: complete."""

    def standing(self) -> Standing:
        return Standing(available=True, partial=False, lag=0, as_of=datetime.now(UTC))


class MemorySavedQuestions(SavedQuestions):
    """The real registry view, published to memory instead of the trials topic."""

    def __init__(self) -> None:
        super().__init__("unused:0", "unused.trials")

    def _publish(self, record: SavedTrial) -> None:
        self._absorb(record.to_json())

    def readiness(self) -> ReaderStatus:
        return fed_by_hand("trials")


class MemoryCohortView(CohortView):
    """The real cohort view, not started: the test fills its records."""

    def __init__(self) -> None:
        super().__init__("unused:0", "unused.cohort")

    def readiness(self) -> ReaderStatus:
        return fed_by_hand("cohorts")


def settings_for(home: Path) -> Settings:
    """Settings for an in-process app: nothing is started from them (no broker anywhere)."""
    values: dict[str, Any] = {
        "home": home,
        "source_system": SOURCE,
        "kafka_bootstrap_servers": "127.0.0.1:1",
        "feasibility_feed": False,
        "recruitment_api": False,
        "surveillance_monitor": False,
        "audit_anchor_seconds": 0,
    }
    return Settings(**{k: v for k, v in values.items() if k in Settings.model_fields})


@dataclass
class World:
    app: FastAPI
    client: TestClient
    settings: Settings
    runtime: Runtime | None
    pseudonym: str
    invitation: str | None

    @property
    def key(self) -> bytes:
        return self.settings.token_key.get_secret_value().encode()

    def headers(
        self,
        role: Role,
        org: str,
        practitioner: str | None = None,
        sites: tuple[str, ...] = (),
        source_system: str | None = None,
        trials: tuple[str, ...] = (),
        subject: str | None = None,
    ) -> dict[str, str]:
        """A bearer header; a ``source`` writes as :data:`SOURCE` (the world's own EHR, whose
        resources were ingested) unless it names another source system."""
        if role == "source" and source_system is None:
            source_system = SOURCE
        token = issue(
            self.key,
            role,
            org,
            practitioner=practitioner,
            sites=sites,
            source_system=source_system,
            trials=trials,
            subject=subject,
        )
        return {"Authorization": f"Bearer {token}"}

    def audit(self) -> list[dict[str, Any]]:
        return [{**r, "detail": json.loads(r["detail"])} for r in self.app.state.audit.records()]


def _signal_monitor() -> Any:
    """The regulator's signal monitor, not started (no broker), with nothing to report."""
    from surveillance_stream.monitor import SignalMonitor

    monitor = SignalMonitor("127.0.0.1:1", "unused.devices", "unused.signals")
    monitor.ready = True
    monitor.readiness = lambda: fed_by_hand("signals")  # type: ignore[method-assign]
    return monitor


@contextmanager
def build_world(
    tmp_path: Path,
    *,
    services: bool = True,
    seed_recruitment: Callable[[Runtime, str], None] | None = None,
) -> Iterator[World]:
    """The app over real stores. With ``services=False`` only ingest runs (the sponsor,
    clinician and regulator services are absent, as while an API process starts)."""
    home = tmp_path / "home"
    settings = settings_for(home)
    sink = MemorySink()
    ingestor = build_ingestor(settings, sink=sink)
    config = GeneratorConfig(patients=40, seed=11)
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in iter_patients(config):
        ingestor.ingest_bundle(bundle(record), "synthetic")
    ingestor.ingest_resource(PATIENT, "test")
    ingestor.ingest_resource(CONDITION, "test")
    ingestor.commit()
    pseudonym = ingestor.patient_by_key(f"{SOURCE}|Patient|{PATIENT_RESOURCE}")
    assert pseudonym is not None

    feasibility: FeasibilityService | None = None
    runtime: Runtime | None = None
    identities: VaultIdentities | None = None
    invitation: str | None = None
    with fresh_database("sqlite", tmp_path) as url:
        if services:
            snapshot = ColumnarSnapshot()
            for envelope in sink.published_facts:
                snapshot.apply(orjson.loads(envelope.to_json()))
            saved = MemorySavedQuestions()
            for trial_id in (TRIAL, RETIRE):
                saved.register(
                    TrialCreate(
                        id=trial_id,
                        title="Matrix trial",
                        criteria=parse_question(CRITERIA),
                        recruiting_sites=[SITE_A, SITE_B],
                    ),
                    SPONSOR_ORG,
                )
            cohorts = MemoryCohortView()  # not started: filled here
            cohorts.records[TRIAL] = {
                pseudonym: {
                    "trial": TRIAL,
                    "trial_version": 1,
                    "patient": pseudonym,
                    "site": SITE_A,
                    "region": "London",
                    "member": True,
                    "change": 1,
                }
            }
            # the hand-made SNOMED CT release, for ECL in criteria and concept search
            store = TerminologyStore(f"sqlite:///{tmp_path / 'terminology.db'}")
            store.load(RELEASE_2025)
            registry = PublicationRegistry("sqlite://")
            feasibility = FeasibilityService(
                terminology=Terminology(store),
                snapshot=snapshot,
                lock=threading.Lock(),
                engine=PolarsEngine(),
                policy=DisclosurePolicy(),
                registry=registry,
                budget=QueryBudget("sqlite://"),
                saved=saved,
                cohorts=cohorts,
                # the sponsor workspace's stores beside the registry, as concierge.api does
                answers=AnswerHistory(registry.engine),
                cohort_history=CohortHistory(registry.engine),
            )
            runtime = build_runtime(
                RecruitmentSettings(url=url), url=url, channels={}, clock=Clock()
            )
            with runtime.sessions.begin() as session:
                work = runtime.service.unit_of_work(session)
                work.trial(TRIAL, trial(TRIAL, sites=(SITE_A, SITE_B), title="Matrix trial"))
                work.reference(practitioner("matrix-gp-a"))
                work.reference(practitioner("matrix-gp-b"))
                work.facts(patient_facts(pseudonym, gps=[GP_A], site=SITE_A))
                work.cohort(TRIAL, pseudonym, cohort(TRIAL, pseudonym, 1, site=SITE_A))
                work.finish()
            if seed_recruitment is not None:
                seed_recruitment(runtime, pseudonym)
            with runtime.sessions() as session:
                invitation = session.scalar(
                    sa.select(Invitation.id).where(Invitation.patient == pseudonym)
                )
            identities = VaultIdentities(SqlVault(settings.resolved_vault_url()))
        app = create_app(
            settings,
            ingest_service=IngestService(ingestor),
            feasibility=feasibility,
            recruitment=runtime,
            recruitment_identities=identities,
        )
        if services:
            app.state.surveillance = _signal_monitor()
            app.state.followup_progress = CurrentByHand()
        try:
            with TestClient(app) as client:
                yield World(app, client, settings, runtime, pseudonym, invitation)
        finally:
            if identities is not None:
                identities.vault.close()  # type: ignore[attr-defined]


__all__ = [
    "CONDITION",
    "CRITERIA",
    "GP_A",
    "GP_B",
    "IDENTITY",
    "PATIENT",
    "RETIRE",
    "SERVED_IDENTITY",
    "SITE_A",
    "SITE_B",
    "SPONSOR_ORG",
    "TRIAL",
    "World",
    "build_world",
    "settings_for",
]
