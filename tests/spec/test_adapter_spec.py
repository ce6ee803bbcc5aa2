"""The adapter's specification, as a table: one small FHIR input -> the facts it must produce.

Every resource kind the product reads has at least one row here. The world each row runs in holds
one Organization (with an ODS code), one Practitioner, one Patient and one Device, so references
resolve the way they do in production. Each hand-made input is also checked to be valid FHIR with
fhir.resources, so the table describes real shapes and not what the adapter happens to accept.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from core.contracts.facts import (
    AdverseEventFact,
    Coding,
    Component,
    ConditionFact,
    ConsentFact,
    DeviceDescription,
    DeviceExposureFact,
    DeviceRecord,
    Fact,
    MedicationFact,
    ObservationFact,
    OrganizationRecord,
    PatientFact,
    PractitionerRecord,
    PractitionerRoleRecord,
    ProcedureFact,
    ReferenceRecord,
    ResourceFacts,
    decode_reference,
    decode_resource_facts,
)
from fhir_adapters.outcome import validate_with_models
from fhir_adapters.pipeline import Ingestor, Outcome
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import MemorySink
from fhir_adapters.vault import MemoryVault
from tests.adapter_helpers import public_key

KEY = b"spec-pseudonym-key-0123456789abc"
SOURCE = "urn:spec"

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DMD = "https://dmd.nhs.uk"

# The identifiable part of the patient: none of it may ever reach a published message.
NHS_NUMBER = "9434765919"
FAMILY = "Featherstonehaugh"
GIVEN = "Araminta"
POSTCODE = "LS1 4AP"
STREET = "17 Quarry Hill Lane"
PHONE = "0113 496 0371"
EMAIL = "araminta.f@example.org"
ODS = "B86001"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def key(rtype: str, rid: str) -> str:
    return f"{SOURCE}|{rtype}|{rid}"


def expected_pseudonym(token: str, secret: bytes = KEY) -> str:
    """Computed here independently of the adapter: a keyed HMAC-SHA256 of the identifier."""
    return "p-" + hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()[:32]


PSEUDONYM = expected_pseudonym(f"{NHS_SYSTEM}|{NHS_NUMBER}")

# --- the world -------------------------------------------------------------------------------

ORGANIZATION = {
    "resourceType": "Organization",
    "id": "org1",
    "identifier": [{"system": ODS_SYSTEM, "value": ODS}],
    "active": True,
    "name": "Leeds Road Practice",
    "type": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                    "code": "prov",
                }
            ]
        }
    ],
    "address": [{"line": ["1 Practice Road"], "city": "Sheffield", "postalCode": "S1 2HE"}],
}

PRACTITIONER = {
    "resourceType": "Practitioner",
    "id": "pr1",
    "active": True,
    "identifier": [{"system": "https://fhir.hl7.org.uk/Id/gmc-number", "value": "C1234567"}],
    "name": [{"prefix": ["Dr"], "given": ["Ann"], "family": "Smith"}],
    "telecom": [
        {"system": "phone", "value": "0113 000 0000"},
        {"system": "email", "value": "ann.smith@nhs.example"},
    ],
}

PATIENT = {
    "resourceType": "Patient",
    "id": "pat1",
    "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
    "identifier": [
        {"system": NHS_SYSTEM, "value": NHS_NUMBER},
        {"system": "urn:spec:mrn", "value": "MRN-0042"},
    ],
    "name": [{"use": "official", "family": FAMILY, "given": [GIVEN]}],
    "telecom": [{"system": "phone", "value": PHONE}, {"system": "email", "value": EMAIL}],
    "gender": "female",
    "birthDate": "1961-02-28",
    "address": [{"use": "home", "line": [STREET], "city": "Leeds", "postalCode": POSTCODE}],
    "managingOrganization": {"reference": "Organization/org1"},
    "generalPractitioner": [
        {"reference": "Organization/org1"},
        {"reference": "Practitioner/pr1"},
    ],
}

DEVICE_R4 = {
    "resourceType": "Device",
    "id": "dev1",
    "status": "active",
    "udiCarrier": [{"deviceIdentifier": "00844588003288", "carrierHRF": "(01)00844588003288"}],
    "manufacturer": "Acme Orthopaedics",
    "deviceName": [{"name": "Acme Hip 3000", "type": "model-name"}],
    "lotNumber": "LOT-77",
    "type": {"coding": [{"system": SNOMED, "code": "304120007", "display": "Total hip"}]},
    "patient": {"reference": "Patient/pat1"},
}

DEVICE_R5 = {
    "resourceType": "Device",
    "id": "dev5",
    "status": "active",
    "udiCarrier": [
        {"deviceIdentifier": "05012345678900", "issuer": "http://hl7.org/fhir/NamingSystem/gs1-di"}
    ],
    "manufacturer": "Pumpworks",
    "modelNumber": "PW-9",
    "lotNumber": "LOT-5",
    "type": [{"coding": [{"system": SNOMED, "code": "69805005", "display": "Insulin pump"}]}],
}

HIP = DeviceDescription(
    device=key("Device", "dev1"),
    type_codes=(Coding(system=SNOMED, code="304120007", display="Total hip"),),
    manufacturer="Acme Orthopaedics",
    model="Acme Hip 3000",
    lot="LOT-77",
    udi="00844588003288",
)
PUMP = DeviceDescription(
    device=key("Device", "dev5"),
    type_codes=(Coding(system=SNOMED, code="69805005", display="Insulin pump"),),
    manufacturer="Pumpworks",
    model="PW-9",
    lot="LOT-5",
    udi="05012345678900",
)

SUBJECT = {"reference": "Patient/pat1"}


def make_ingestor(secret: bytes = KEY, **kwargs: Any) -> Ingestor:
    return Ingestor(MemoryVault(), MemorySink(), Pseudonymiser(secret), SOURCE, **kwargs)


def sink_of(ingestor: Ingestor) -> MemorySink:
    assert isinstance(ingestor.sink, MemorySink)
    return ingestor.sink


def ingest(ingestor: Ingestor, resource: dict[str, Any], version: str | None = None) -> Outcome:
    outcome = ingestor.ingest_text(orjson.dumps(resource), "spec", version)  # type: ignore[arg-type]
    assert len(outcome) == 1
    return outcome[0]


def accept(ingestor: Ingestor, resource: dict[str, Any], version: str | None = None) -> Outcome:
    outcome = ingest(ingestor, resource, version)
    assert outcome.status == "accepted", outcome
    return outcome


def envelope(ingestor: Ingestor, resource_key: str) -> ResourceFacts:
    """The latest facts envelope published for a key, re-decoded from its wire form."""
    resource_key = public_key(ingestor, resource_key)
    published = [e for e in sink_of(ingestor).published_facts if e.key == resource_key]
    assert published, f"nothing published for {resource_key}"
    latest = max(published, key=lambda e: e.seq)
    decoded = decode_resource_facts(latest.to_json())
    assert decoded == latest
    return decoded


def reference(ingestor: Ingestor, resource_key: str) -> ReferenceRecord:
    published = [r for r in sink_of(ingestor).published_references if r.key == resource_key]
    assert published, f"no reference record published for {resource_key}"
    latest = max(published, key=lambda r: r.seq)
    decoded = decode_reference(latest.to_json())
    assert decoded == latest
    return decoded


@pytest.fixture
def world() -> Ingestor:
    ingestor = make_ingestor()
    for resource in (ORGANIZATION, PRACTITIONER, PATIENT, DEVICE_R4):
        accept(ingestor, resource)
    accept(ingestor, DEVICE_R5, "R5")
    return ingestor


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    resource: dict[str, Any]
    expected: Fact
    version: str = "R4"
    retracted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


T2DM = [
    coding(SNOMED, "44054006", "Diabetes mellitus type 2"),
    coding(ICD10, "E11", "Type 2 diabetes mellitus"),
]
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
VITALS = {
    "coding": [coding("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")]
}
METFORMIN = coding(DMD, "39109611000001108", "Metformin 500mg tablets")


def bp_component(code: str, display: str, value: float, flag: str | None = None) -> dict[str, Any]:
    component: dict[str, Any] = {
        "code": {"coding": [coding(LOINC, code, display)]},
        "valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
    }
    if flag:
        component["interpretation"] = [{"coding": [coding(INTERPRETATION, flag)]}]
    return component


ROWS: list[Row] = [
    Row(
        "condition-snomed-and-icd10",
        {
            "resourceType": "Condition",
            "id": "cond1",
            "clinicalStatus": {"coding": [coding(CLINICAL, "active")]},
            "verificationStatus": {"coding": [coding(VERIFICATION, "confirmed")]},
            "code": {"coding": T2DM, "text": "T2DM"},
            "subject": SUBJECT,
            "onsetDateTime": "2015-06-01T09:30:00+01:00",
            "abatementDateTime": "2016",
            "recordedDate": "2015-06-02",
            "stage": [{"summary": {"coding": [coding(SNOMED, "786005", "Clinical stage I")]}}],
        },
        ConditionFact(
            codes=(
                Coding(system=SNOMED, code="44054006", display="Diabetes mellitus type 2"),
                Coding(system=ICD10, code="E11", display="Type 2 diabetes mellitus"),
            ),
            onset=utc(2015, 6, 1, 8, 30),
            abatement=utc(2016, 1, 1),
            recorded=utc(2015, 6, 2),
            clinical_status="active",
            verification_status="confirmed",
            stage=(Coding(system=SNOMED, code="786005", display="Clinical stage I"),),
        ),
    ),
    Row(
        "observation-quantity-ucum",
        {
            "resourceType": "Observation",
            "id": "obs-hba1c",
            "status": "final",
            "category": [
                {
                    "coding": [
                        coding(
                            "http://terminology.hl7.org/CodeSystem/observation-category",
                            "laboratory",
                        )
                    ]
                }
            ],
            "code": {"coding": [coding(LOINC, "4548-4", "Hemoglobin A1c")]},
            "subject": SUBJECT,
            "effectiveDateTime": "2024-02-29T23:30:00-01:00",
            "valueQuantity": {
                "value": 7.2,
                "unit": "percent",
                "system": UCUM,
                "code": "%",
            },
            "interpretation": [{"coding": [coding(INTERPRETATION, "H", "High")]}],
        },
        ObservationFact(
            codes=(Coding(system=LOINC, code="4548-4", display="Hemoglobin A1c"),),
            status="final",
            effective=utc(2024, 3, 1, 0, 30),
            value=7.2,
            unit="%",
            interpretation=(Coding(system=INTERPRETATION, code="H", display="High"),),
            category=("laboratory",),
        ),
    ),
    Row(
        "observation-blood-pressure-components",
        {
            "resourceType": "Observation",
            "id": "obs-bp",
            "status": "final",
            "category": [VITALS],
            "code": {"coding": [coding(LOINC, "85354-9", "Blood pressure panel")]},
            "subject": SUBJECT,
            "effectivePeriod": {"start": "2024-01-05T10:00:00Z", "end": "2024-01-05T10:05:00Z"},
            "component": [
                bp_component("8480-6", "Systolic blood pressure", 152, "H"),
                bp_component("8462-4", "Diastolic blood pressure", 84),
            ],
        },
        ObservationFact(
            codes=(Coding(system=LOINC, code="85354-9", display="Blood pressure panel"),),
            status="final",
            effective=utc(2024, 1, 5, 10),
            components=(
                Component(
                    codes=(Coding(system=LOINC, code="8480-6", display="Systolic blood pressure"),),
                    value=152.0,
                    unit="mm[Hg]",
                    interpretation=(Coding(system=INTERPRETATION, code="H"),),
                ),
                Component(
                    codes=(
                        Coding(system=LOINC, code="8462-4", display="Diastolic blood pressure"),
                    ),
                    value=84.0,
                    unit="mm[Hg]",
                ),
            ),
            category=("vital-signs",),
        ),
    ),
    Row(
        "observation-codeable-concept-value",
        {
            "resourceType": "Observation",
            "id": "obs-smoking",
            "status": "amended",
            "code": {"coding": [coding(LOINC, "72166-2", "Tobacco smoking status")]},
            "subject": SUBJECT,
            "effectiveInstant": "2023-11-11T11:11:11.111Z",
            "valueCodeableConcept": {"coding": [coding(SNOMED, "266919005", "Never smoked")]},
        },
        ObservationFact(
            codes=(Coding(system=LOINC, code="72166-2", display="Tobacco smoking status"),),
            status="amended",
            effective=utc(2023, 11, 11, 11, 11, 11, 111000),
            value_codes=(Coding(system=SNOMED, code="266919005", display="Never smoked"),),
        ),
    ),
    Row(
        "observation-quantity-non-ucum-unit",
        {
            "resourceType": "Observation",
            "id": "obs-steps",
            "status": "preliminary",
            "code": {"text": "steps"},
            "subject": SUBJECT,
            "valueQuantity": {"value": 9000, "unit": "steps/day"},
        },
        ObservationFact(codes=(), status="preliminary", value=9000.0, unit="steps/day"),
    ),
    Row(
        "medication-request-codeable-concept",
        {
            "resourceType": "MedicationRequest",
            "id": "mr1",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [METFORMIN]},
            "subject": SUBJECT,
            "authoredOn": "2024-01-10",
        },
        MedicationFact(
            codes=(
                Coding(system=DMD, code="39109611000001108", display="Metformin 500mg tablets"),
            ),
            status="active",
            start=utc(2024, 1, 10),
            source="request",
        ),
    ),
    Row(
        "medication-request-contained-medication",
        {
            "resourceType": "MedicationRequest",
            "id": "mr2",
            "contained": [
                {"resourceType": "Medication", "id": "med1", "code": {"coding": [METFORMIN]}}
            ],
            "status": "stopped",
            "intent": "plan",
            "medicationReference": {"reference": "#med1"},
            "subject": SUBJECT,
        },
        MedicationFact(
            codes=(
                Coding(system=DMD, code="39109611000001108", display="Metformin 500mg tablets"),
            ),
            status="stopped",
            source="request",
        ),
    ),
    Row(
        "medication-statement-r4",
        {
            "resourceType": "MedicationStatement",
            "id": "ms4",
            "status": "completed",
            "medicationCodeableConcept": {"coding": [METFORMIN]},
            "subject": SUBJECT,
            "effectivePeriod": {"start": "2020-01-01", "end": "2020-06-30"},
            "dateAsserted": "2020-07-01T00:00:00Z",
        },
        MedicationFact(
            codes=(
                Coding(system=DMD, code="39109611000001108", display="Metformin 500mg tablets"),
            ),
            status="completed",
            start=utc(2020, 1, 1),
            end=utc(2020, 6, 30),
            source="statement",
        ),
    ),
    Row(
        "medication-statement-r5",
        {
            "resourceType": "MedicationStatement",
            "id": "ms5",
            "status": "recorded",
            "medication": {"concept": {"coding": [METFORMIN]}},
            "subject": SUBJECT,
            "dateAsserted": "2021-03-04T05:06:07Z",
        },
        MedicationFact(
            codes=(
                Coding(system=DMD, code="39109611000001108", display="Metformin 500mg tablets"),
            ),
            status="recorded",
            start=utc(2021, 3, 4, 5, 6, 7),
            source="statement",
        ),
        version="R5",
    ),
    Row(
        "procedure-r4-performed-datetime-with-focal-device",
        {
            "resourceType": "Procedure",
            "id": "proc1",
            "status": "completed",
            "code": {"coding": [coding(SNOMED, "52734007", "Total hip replacement")]},
            "subject": SUBJECT,
            "performedDateTime": "2019-09-09T08:00:00Z",
            "focalDevice": [
                {
                    "action": {"coding": [coding(SNOMED, "129338005", "Implantation")]},
                    "manipulated": {"reference": "Device/dev1"},
                }
            ],
        },
        ProcedureFact(
            codes=(Coding(system=SNOMED, code="52734007", display="Total hip replacement"),),
            status="completed",
            performed=utc(2019, 9, 9, 8),
            devices=(key("Device", "dev1"),),
        ),
    ),
    Row(
        "procedure-r4-performed-period",
        {
            "resourceType": "Procedure",
            "id": "proc2",
            "status": "in-progress",
            "code": {"coding": [coding(SNOMED, "387713003", "Surgical procedure")]},
            "subject": SUBJECT,
            "performedPeriod": {"start": "2019-09-09T08:00:00Z", "end": "2019-09-09T11:00:00Z"},
        },
        ProcedureFact(
            codes=(Coding(system=SNOMED, code="387713003", display="Surgical procedure"),),
            status="in-progress",
            performed=utc(2019, 9, 9, 8),
            performed_end=utc(2019, 9, 9, 11),
        ),
    ),
    Row(
        "procedure-r5-occurrence",
        {
            "resourceType": "Procedure",
            "id": "proc5",
            "status": "completed",
            "code": {"coding": [coding(SNOMED, "387713003")]},
            "subject": SUBJECT,
            "occurrencePeriod": {"start": "2022-02-02T02:02:02Z"},
            "focalDevice": [
                {
                    "action": {"coding": [coding(SNOMED, "129338005")]},
                    "manipulated": {"reference": "Device/dev5"},
                }
            ],
        },
        ProcedureFact(
            codes=(Coding(system=SNOMED, code="387713003"),),
            status="completed",
            performed=utc(2022, 2, 2, 2, 2, 2),
            devices=(key("Device", "dev5"),),
        ),
        version="R5",
    ),
    Row(
        "device-use-statement-r4",
        {
            "resourceType": "DeviceUseStatement",
            "id": "dus1",
            "status": "active",
            "subject": SUBJECT,
            "device": {"reference": "Device/dev1"},
            "timingPeriod": {"start": "2019-09-09"},
            "recordedOn": "2019-09-10T00:00:00Z",
        },
        DeviceExposureFact(
            device=HIP, status="active", start=utc(2019, 9, 9), source="use_statement"
        ),
    ),
    Row(
        "device-use-statement-r4-recorded-on-fallback",
        {
            "resourceType": "DeviceUseStatement",
            "id": "dus2",
            "status": "completed",
            "subject": SUBJECT,
            "device": {"reference": "Device/dev1"},
            "recordedOn": "2019-09-10T00:00:00Z",
        },
        DeviceExposureFact(
            device=HIP, status="completed", start=utc(2019, 9, 10), source="use_statement"
        ),
    ),
    Row(
        "device-usage-r5",
        {
            "resourceType": "DeviceUsage",
            "id": "du5",
            "status": "active",
            "patient": SUBJECT,
            "device": {"reference": {"reference": "Device/dev5"}},
            "timingDateTime": "2023-05-05T05:05:05Z",
        },
        DeviceExposureFact(
            device=PUMP, status="active", start=utc(2023, 5, 5, 5, 5, 5), source="usage"
        ),
        version="R5",
    ),
    Row(
        "adverse-event-r4-suspect-device",
        {
            "resourceType": "AdverseEvent",
            "id": "ae4",
            "actuality": "actual",
            "event": {"coding": [coding(SNOMED, "16541001", "Yellow fever")]},
            "subject": SUBJECT,
            "date": "2024-04-04T04:04:04Z",
            "seriousness": {
                "coding": [
                    coding(
                        "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                        "serious",
                    )
                ]
            },
            "suspectEntity": [{"instance": {"reference": "Device/dev1"}}],
        },
        AdverseEventFact(
            codes=(Coding(system=SNOMED, code="16541001", display="Yellow fever"),),
            actuality="actual",
            date=utc(2024, 4, 4, 4, 4, 4),
            seriousness=(
                Coding(
                    system="http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                    code="serious",
                ),
            ),
            suspect_devices=(HIP,),
        ),
    ),
    Row(
        "adverse-event-r5-device-and-medication",
        {
            "resourceType": "AdverseEvent",
            "id": "ae5",
            "status": "completed",
            "actuality": "potential",
            "code": {"coding": [coding(SNOMED, "271807003", "Rash")]},
            "subject": SUBJECT,
            "occurrenceDateTime": "2024-05-05",
            "suspectEntity": [
                {"instanceReference": {"reference": "Device/dev5"}},
                {"instanceCodeableConcept": {"coding": [METFORMIN]}},
            ],
        },
        AdverseEventFact(
            codes=(Coding(system=SNOMED, code="271807003", display="Rash"),),
            actuality="potential",
            date=utc(2024, 5, 5),
            suspect_devices=(PUMP,),
            suspect_medications=(
                Coding(system=DMD, code="39109611000001108", display="Metformin 500mg tablets"),
            ),
        ),
        version="R5",
    ),
]

CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"


def consent_r4(rid: str, status: str, decision: str, scope: str = "research") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": rid,
        "status": status,
        "scope": {"coding": [coding(CONSENT_SCOPE, scope)]},
        "category": [{"coding": [coding(LOINC, "57016-8", "Privacy policy acknowledgment")]}],
        "patient": SUBJECT,
        "dateTime": "2024-03-01T10:00:00Z",
        "policyRule": {
            "coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "OPTOUT")]
        },
        "provision": {"type": decision},
    }


FOLLOW_UP_CONSENT = {
    **consent_r4("c-follow-up", "active", "permit"),
    "provision": {
        "type": "permit",
        "period": {"start": "2026-01-01T00:00:00Z", "end": "2029-01-01T00:00:00Z"},
        "data": [
            {"meaning": "related", "reference": {"reference": "ResearchStudy/T1"}},
            {"meaning": "related", "reference": {"type": "ResearchStudy",
                                                 "identifier": {"value": "T2"}}},
            {"meaning": "related", "reference": {"reference": "Observation/not-a-trial"}},
        ],
    },
}  # fmt: skip

ROWS += [
    Row(
        "consent-r4-follow-up-names-its-trials-and-period",
        FOLLOW_UP_CONSENT,
        ConsentFact(
            status="active",
            research_opt_out=False,
            date=utc(2024, 3, 1, 10),
            follow_up_trials=("T1", "T2"),
            period_start=utc(2026, 1, 1),
            period_end=utc(2029, 1, 1),
        ),
    ),
    Row(
        "consent-r4-inactive-follow-up-permits-nothing",
        {**FOLLOW_UP_CONSENT, "status": "inactive"},
        ConsentFact(
            status="inactive",
            research_opt_out=False,
            date=utc(2024, 3, 1, 10),
            period_start=utc(2026, 1, 1),
            period_end=utc(2029, 1, 1),
        ),
    ),
    Row(
        "consent-r4-research-opt-out",
        consent_r4("c-optout", "active", "deny"),
        ConsentFact(status="active", research_opt_out=True, date=utc(2024, 3, 1, 10)),
    ),
    Row(
        "consent-r4-research-permit-is-not-an-opt-out",
        consent_r4("c-permit", "active", "permit"),
        ConsentFact(status="active", research_opt_out=False, date=utc(2024, 3, 1, 10)),
    ),
    Row(
        "consent-r4-inactive-deny-is-not-an-opt-out",
        consent_r4("c-inactive", "inactive", "deny"),
        ConsentFact(status="inactive", research_opt_out=False, date=utc(2024, 3, 1, 10)),
    ),
    Row(
        "consent-r4-treatment-deny-is-not-a-research-opt-out",
        consent_r4("c-treatment", "active", "deny", scope="treatment"),
        ConsentFact(status="active", research_opt_out=False, date=utc(2024, 3, 1, 10)),
    ),
    Row(
        "consent-r5-research-opt-out",
        {
            "resourceType": "Consent",
            "id": "c5",
            "status": "active",
            "subject": SUBJECT,
            "date": "2024-03-01",
            "decision": "deny",
            "provision": [
                {
                    "purpose": [
                        coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", "HRESCH")
                    ]
                }
            ],
        },
        ConsentFact(status="active", research_opt_out=True, date=utc(2024, 3, 1)),
        version="R5",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_input_is_valid_fhir(row: Row) -> None:
    assert validate_with_models(row.resource, row.version) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_facts_of_one_resource(world: Ingestor, row: Row) -> None:
    outcome = accept(world, row.resource, row.version)
    rkey = key(row.resource["resourceType"], row.resource["id"])
    assert (outcome.key, outcome.seq) == (rkey, 1)
    published = envelope(world, rkey)
    assert published.patient == PSEUDONYM
    assert published.retracted is False
    assert published.facts == (row.expected,)
    assert published.provenance.resource_type == row.resource["resourceType"]
    assert published.provenance.fhir_version == row.version
    assert published.provenance.source == SOURCE


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_facts_are_the_same_through_a_bundle(row: Row) -> None:
    """The same row inside a transaction Bundle with everything it references, by urn:uuid."""
    ingestor = make_ingestor()
    resource = dict(row.resource)
    urns = {"Patient/pat1": "urn:uuid:9b0c2f0e-0000-4000-8000-000000000001"}
    resource = orjson.loads(
        orjson.dumps(resource).replace(b'"Patient/pat1"', f'"{urns["Patient/pat1"]}"'.encode())
    )
    device = DEVICE_R5 if row.version == "R5" else DEVICE_R4
    entries = [resource, device, PATIENT, PRACTITIONER, ORGANIZATION]  # deliberately out of order
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": urns.get(f"{r['resourceType']}/{r['id']}", f"urn:uuid:{r['id']}"),
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in entries
        ],
    }
    outcomes = ingestor.ingest_text(orjson.dumps(bundle), "bundle", row.version)  # type: ignore[arg-type]
    assert [o.status for o in outcomes] == ["accepted"] * 5
    assert envelope(ingestor, key(resource["resourceType"], resource["id"])).facts == (
        row.expected,
    )


# --- retraction by status ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row_name", "path", "value"),
    [
        (
            "condition-snomed-and-icd10",
            ("verificationStatus",),
            {"coding": [coding(VERIFICATION, "entered-in-error")]},
        ),
        ("observation-quantity-ucum", ("status",), "entered-in-error"),
        ("observation-blood-pressure-components", ("status",), "entered-in-error"),
        ("medication-request-codeable-concept", ("status",), "entered-in-error"),
        ("medication-statement-r5", ("status",), "entered-in-error"),
        ("procedure-r4-performed-period", ("status",), "entered-in-error"),
        ("device-use-statement-r4", ("status",), "entered-in-error"),
        ("device-usage-r5", ("status",), "entered-in-error"),
        ("adverse-event-r5-device-and-medication", ("status",), "entered-in-error"),
        ("consent-r4-research-opt-out", ("status",), "entered-in-error"),
    ],
)
def test_entered_in_error_retracts(
    world: Ingestor, row_name: str, path: tuple[str, ...], value: Any
) -> None:
    row = next(r for r in ROWS if r.name == row_name)
    accept(world, row.resource, row.version)
    corrected = {**row.resource, path[0]: value}
    outcome = accept(world, corrected, row.version)
    rkey = key(row.resource["resourceType"], row.resource["id"])
    assert outcome.seq == 2
    retraction = envelope(world, rkey)
    assert retraction.retracted is True
    assert retraction.facts == ()
    assert retraction.seq == 2
    assert retraction.patient == PSEUDONYM


# --- patients ---------------------------------------------------------------------------------


def test_patient_fact(world: Ingestor) -> None:
    published = envelope(world, key("Patient", "pat1"))
    assert published.patient == PSEUDONYM
    assert published.facts == (
        PatientFact(
            birth_date=date(1961, 2, 28),
            sex="female",
            site=ODS,
            site_key=key("Organization", "org1"),
            region="North East and Yorkshire",  # from LS, the patient's postcode area
            gp_practice=ODS,
            general_practitioners=(key("Practitioner", "pr1"),),
        ),
    )
    assert published.provenance.version == "1"
    assert published.provenance.last_updated == utc(2024, 1, 1)


def test_patient_identity_goes_to_the_vault_only(world: Ingestor) -> None:
    identity = world.vault.get_identity(PSEUDONYM)
    assert identity is not None
    assert (identity["nhs_number"], identity["family"], identity["postcode"]) == (
        NHS_NUMBER,
        FAMILY,
        POSTCODE,
    )
    assert identity["phone"] == PHONE


def test_nothing_identifying_is_ever_published(world: Ingestor) -> None:
    for row in ROWS:
        ingest(world, row.resource, row.version)
    sink = sink_of(world)
    wire = b"\n".join(
        [e.to_json() for e in sink.published_facts]
        + [r.to_json() for r in sink.published_references]
    ).decode()
    assert len(sink.published_facts) > len(ROWS)
    for secret in (
        NHS_NUMBER,
        "943 476 5919",
        FAMILY,
        GIVEN,
        POSTCODE,
        POSTCODE.replace(" ", ""),
        "4AP",
        STREET,
        PHONE,
        PHONE.replace(" ", ""),
        EMAIL,
        "MRN-0042",
    ):
        assert secret.lower() not in wire.lower(), secret


def test_pseudonym_is_a_keyed_hmac_and_stable() -> None:
    first, again, other_key = make_ingestor(), make_ingestor(), make_ingestor(b"another-key-" * 3)
    for ingestor in (first, again, other_key):
        accept(ingestor, PATIENT)
    pseudonyms = [envelope(i, key("Patient", "pat1")).patient for i in (first, again, other_key)]
    assert pseudonyms[0] == pseudonyms[1] == PSEUDONYM
    assert pseudonyms[2] == expected_pseudonym(f"{NHS_SYSTEM}|{NHS_NUMBER}", b"another-key-" * 3)
    assert pseudonyms[2] != PSEUDONYM
    # The NHS number is the identifier hashed: another record of the same person, same pseudonym.
    moved = {**PATIENT, "id": "pat-from-other-system", "name": [{"family": "Other"}]}
    accept(first, moved)
    assert envelope(first, key("Patient", "pat-from-other-system")).patient == PSEUDONYM
    # A new version of the same Patient keeps its pseudonym even if its identifiers change.
    renumbered = {
        **PATIENT,
        "meta": {"versionId": "2"},
        "identifier": [{"system": NHS_SYSTEM, "value": "9000000009"}],
    }
    accept(first, renumbered)
    assert envelope(first, key("Patient", "pat1")).patient == PSEUDONYM


def test_patient_without_nhs_number_is_keyed_by_source_and_id() -> None:
    ingestor = make_ingestor()
    accept(ingestor, {"resourceType": "Patient", "id": "anon"})
    published = envelope(ingestor, key("Patient", "anon"))
    assert published.patient == expected_pseudonym(f"{SOURCE}|Patient/anon")
    assert published.facts == (PatientFact(),)


def test_patient_before_its_organization_keeps_the_key_and_no_ods_code() -> None:
    """A stream may deliver a Patient before its managing Organization: the fact keeps the
    organisation's key (stable) and no ODS code, never the key in place of one."""
    ingestor = make_ingestor()
    accept(ingestor, PATIENT)
    fact = envelope(ingestor, key("Patient", "pat1")).facts[0]
    assert isinstance(fact, PatientFact)
    assert (fact.site, fact.site_key) == (None, key("Organization", "org1"))
    assert fact.region == "North East and Yorkshire"
    accept(ingestor, ORGANIZATION)
    again = make_ingestor()
    accept(again, ORGANIZATION)
    accept(again, PATIENT)
    after = envelope(again, key("Patient", "pat1")).facts[0]
    assert isinstance(after, PatientFact)
    # the same key either way; the ODS code only where the Organization came first
    assert (after.site, after.site_key) == (ODS, fact.site_key)


def test_patient_site_from_an_ods_identifier_on_the_reference() -> None:
    ingestor = make_ingestor()
    logical = {
        **PATIENT,
        "managingOrganization": {"identifier": {"system": ODS_SYSTEM, "value": "RR8"}},
    }
    accept(ingestor, logical)
    fact = envelope(ingestor, key("Patient", "pat1")).facts[0]
    assert isinstance(fact, PatientFact)
    assert (fact.site, fact.site_key) == ("RR8", None)


def test_a_legacy_patient_fact_holding_a_key_in_site_is_read_as_a_key() -> None:
    from core.contracts.facts import patient_site

    legacy = {"site": key("Organization", "org1")}
    assert patient_site(legacy) == (None, key("Organization", "org1"))
    assert patient_site({"site": ODS, "site_key": key("Organization", "org1")}) == (
        ODS,
        key("Organization", "org1"),
    )
    assert patient_site({"site": None}) == (None, None)


def test_patient_region_falls_back_to_the_managing_organization() -> None:
    ingestor = make_ingestor()
    accept(ingestor, ORGANIZATION)
    no_address = {k: v for k, v in PATIENT.items() if k != "address"}
    accept(ingestor, no_address)
    fact = envelope(ingestor, key("Patient", "pat1")).facts[0]
    assert isinstance(fact, PatientFact)
    assert (fact.site, fact.region) == (ODS, "North East and Yorkshire")  # S1: Sheffield


@pytest.mark.parametrize(
    ("postcode", "region"),
    [
        ("SW1A 1AA", "London"),
        ("CF10 1EP", "Wales"),
        ("EH1 1YZ", "Scotland"),
        ("BT1 5GS", "Northern Ireland"),
        ("M1 1AE", "North West"),
        ("B1 1BB", "Midlands"),
        ("02139", "Unknown"),
    ],
)
def test_patient_region_from_postcode_area(postcode: str, region: str) -> None:
    ingestor = make_ingestor()
    patient = {
        "resourceType": "Patient",
        "id": "pz",
        "deceasedDateTime": "2020-01-01T00:00:00Z",
        "address": [{"postalCode": postcode}],
    }
    accept(ingestor, patient)
    fact = envelope(ingestor, key("Patient", "pz")).facts[0]
    assert isinstance(fact, PatientFact)
    assert fact.region == region
    assert fact.deceased is True and fact.deceased_date == utc(2020, 1, 1)
    assert postcode not in envelope(ingestor, key("Patient", "pz")).model_dump_json()


# --- devices ----------------------------------------------------------------------------------


def test_device_r4_with_patient_is_a_reference_record_and_an_exposure(world: Ingestor) -> None:
    record = reference(world, key("Device", "dev1"))
    assert record.record == DeviceRecord(description=HIP, status="active", patient=PSEUDONYM)
    exposure = envelope(world, key("Device", "dev1"))
    assert exposure.patient == PSEUDONYM
    assert exposure.facts == (DeviceExposureFact(device=HIP, status="active", source="device"),)


def test_device_r5_is_a_reference_record(world: Ingestor) -> None:
    record = reference(world, key("Device", "dev5"))
    assert record.record == DeviceRecord(description=PUMP, status="active")
    assert record.provenance.fhir_version == "R5"
    assert not [e for e in sink_of(world).published_facts if e.key == key("Device", "dev5")]


def test_device_use_of_an_unknown_device_keeps_its_reference_key(world: Ingestor) -> None:
    resource = {
        "resourceType": "DeviceUseStatement",
        "id": "dus-unknown",
        "status": "active",
        "subject": SUBJECT,
        "device": {"reference": "Device/never-seen"},
    }
    accept(world, resource)
    fact = envelope(world, key("DeviceUseStatement", "dus-unknown")).facts[0]
    assert isinstance(fact, DeviceExposureFact)
    assert fact.device == DeviceDescription(device=key("Device", "never-seen"))


# --- reference records ------------------------------------------------------------------------


def test_organization_record(world: Ingestor) -> None:
    record = reference(world, key("Organization", "org1"))
    assert record.record == OrganizationRecord(
        ods_code=ODS,
        name="Leeds Road Practice",
        region="North East and Yorkshire",
        type_codes=(
            Coding(system="http://terminology.hl7.org/CodeSystem/organization-type", code="prov"),
        ),
    )
    child = {
        "resourceType": "Organization",
        "id": "org2",
        "active": False,
        "partOf": {"reference": "Organization/org1"},
    }
    accept(world, child)
    assert reference(world, key("Organization", "org2")).record == OrganizationRecord(
        part_of=key("Organization", "org1"), active=False
    )


def test_practitioner_record(world: Ingestor) -> None:
    assert reference(world, key("Practitioner", "pr1")).record == PractitionerRecord(
        name="Dr Ann Smith",
        identifiers=("https://fhir.hl7.org.uk/Id/gmc-number|C1234567",),
        email="ann.smith@nhs.example",
    )


def test_practitioner_role_record(world: Ingestor) -> None:
    role = {
        "resourceType": "PractitionerRole",
        "id": "role1",
        "active": True,
        "practitioner": {"reference": "Practitioner/pr1"},
        "organization": {"reference": "Organization/org1"},
        "code": [{"coding": [coding(SNOMED, "62247001", "General practitioner")]}],
        "specialty": [{"coding": [coding(SNOMED, "394814009", "General practice")]}],
        "telecom": [{"system": "email", "value": "role@nhs.example"}],
    }
    assert validate_with_models(role, "R4") == []
    accept(world, role)
    assert reference(world, key("PractitionerRole", "role1")).record == PractitionerRoleRecord(
        practitioner=key("Practitioner", "pr1"),
        organization=key("Organization", "org1"),
        codes=(Coding(system=SNOMED, code="62247001", display="General practitioner"),),
        specialties=(Coding(system=SNOMED, code="394814009", display="General practice"),),
        email="role@nhs.example",
    )


def test_reference_resources_publish_no_facts(world: Ingestor) -> None:
    keys = {e.key for e in sink_of(world).published_facts}
    assert key("Organization", "org1") not in keys
    assert key("Practitioner", "pr1") not in keys


# --- skipped, dead-lettered, conditional references --------------------------------------------


@pytest.mark.parametrize(
    "resource",
    [
        {
            "resourceType": "Claim",
            "id": "cl1",
            "status": "active",
            "type": {
                "coding": [
                    coding("http://terminology.hl7.org/CodeSystem/claim-type", "institutional")
                ]
            },
            "use": "claim",
            "patient": SUBJECT,
            "created": "2024-01-01",
            "provider": {"reference": "Organization/org1"},
            "priority": {
                "coding": [
                    coding("http://terminology.hl7.org/CodeSystem/processpriority", "normal")
                ]
            },
            "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "NHS"}}],
        },
        {
            "resourceType": "Encounter",
            "id": "enc1",
            "status": "finished",
            "class": coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB"),
            "subject": SUBJECT,
        },
        {
            "resourceType": "ExplanationOfBenefit",
            "id": "eob1",
            "status": "active",
            "subject": {"reference": "Patient/not-even-known"},
        },
        {"resourceType": "Encounter"},  # skipped before its id is even needed
    ],
    ids=["Claim", "Encounter", "ExplanationOfBenefit", "Encounter-without-id"],
)
def test_unsupported_types_are_skipped(world: Ingestor, resource: dict[str, Any]) -> None:
    before = (len(sink_of(world).published_facts), len(sink_of(world).published_references))
    outcome = ingest(world, resource)
    assert outcome.status == "skipped"
    assert outcome.resource_type == resource["resourceType"]
    after = (len(sink_of(world).published_facts), len(sink_of(world).published_references))
    assert after == before
    assert sink_of(world).dead_letters == []


@pytest.mark.parametrize(
    "rtype", ["Spaceship", "Coding", "Quantity", "Resource", "DomainResource", "patient"]
)
@pytest.mark.parametrize("version", ["R4", "R5"])
def test_unknown_resource_type_is_dead_lettered(world: Ingestor, rtype: str, version: str) -> None:
    outcome = ingest(world, {"resourceType": rtype, "id": "x1"}, version)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None
    assert outcome.outcome["issue"][0]["code"] == "not-supported"
    assert outcome.outcome["issue"][0]["expression"] == ["resourceType"]
    letter = orjson.loads(sink_of(world).dead_letters[-1].value)
    assert orjson.loads(letter["payload"]) == {"resourceType": rtype, "id": "x1"}


@pytest.mark.parametrize(
    "subject",
    [
        {"reference": f"Patient?identifier={NHS_SYSTEM}|{NHS_NUMBER}"},
        {"reference": "Patient?identifier=urn:spec:mrn|MRN-0042"},
        {"reference": f"Patient?identifier={NHS_SYSTEM}%7C{NHS_NUMBER}"},
        {"reference": "Patient?identifier=" + quote(f"{NHS_SYSTEM}|{NHS_NUMBER}", safe="")},
        {"identifier": {"system": NHS_SYSTEM, "value": NHS_NUMBER}},
        {"reference": "Patient/pat1/_history/1"},
        {"reference": "https://fhir.example.org/r4/Patient/pat1"},
    ],
    ids=[
        "conditional-nhs",
        "conditional-mrn",
        "conditional-pipe-encoded",
        "conditional-url-encoded",
        "logical-identifier",
        "versioned",
        "absolute",
    ],
)
def test_subject_reference_forms_resolve(world: Ingestor, subject: dict[str, Any]) -> None:
    observation = {
        "resourceType": "Observation",
        "id": "obs-ref",
        "status": "final",
        "code": {"text": "weight"},
        "subject": subject,
        "valueQuantity": {"value": 70, "system": UCUM, "code": "kg", "unit": "kg"},
    }
    accept(world, observation)
    assert envelope(world, key("Observation", "obs-ref")).patient == PSEUDONYM


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        ({"reference": f"Patient?identifier={NHS_SYSTEM}|9000000009"}, "not-found"),
        ({"reference": "Patient/pat2"}, "not-found"),
        ({"reference": "Group/g1"}, "not-found"),
        ({"reference": "urn:uuid:0d1b3a52-0000-4000-8000-000000000000"}, "not-found"),
        ({"reference": "Patient?name=Smith"}, "invalid"),
        ({"display": "somebody"}, "invalid"),
    ],
)
def test_unresolvable_subjects_are_dead_lettered(
    world: Ingestor, subject: dict[str, Any], code: str
) -> None:
    observation = {
        "resourceType": "Observation",
        "id": "obs-bad-ref",
        "status": "final",
        "code": {"text": "weight"},
        "subject": subject,
    }
    outcome = ingest(world, observation)
    assert outcome.status == "dead_lettered"
    assert outcome.outcome is not None
    ours = outcome.outcome["issue"][-1]
    assert ours["code"] == code
    assert ours["expression"] == ["Observation.subject"]
