"""Free text in FHIR resources to text findings: DocumentReference attachments, Composition
narratives, Observation and Procedure notes and AdverseEvent text; only asserted mentions become
facts, each with its element and character span."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from core.contracts.facts import DeviceDescription, OrganizationRecord, TextFindingFact
from fhir_adapters.extract import extract_document, extract_observation, extract_procedure
from fhir_adapters.primitives import InvalidElement

SRC = "urn:t"


class Context:
    fhir_version = "R4"

    def patient_for(self, reference: str | None, identifier: str | None, expression: str) -> str:
        return "pseudo-1"

    def key_for(self, reference: str, expected_type: str | None = None) -> str | None:
        return f"{SRC}|{reference.replace('/', '|')}"

    def organization(self, key: str) -> OrganizationRecord | None:
        return None

    def device(self, key: str) -> DeviceDescription | None:
        return None


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def findings(facts: tuple[Any, ...]) -> list[TextFindingFact]:
    return [f for f in facts if isinstance(f, TextFindingFact)]


NOTE = (
    "Hip clinic review. No evidence of infection of the prosthesis. "
    "X-ray shows loosening of the acetabular cup."
)


def test_a_document_attachment_gives_its_asserted_problems_with_spans() -> None:
    resource = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "date": "2024-03-01T10:00:00Z",
        "content": [
            {"attachment": {"contentType": "application/pdf", "data": b64("%PDF")}},
            {"attachment": {"contentType": "text/plain; charset=utf-8", "data": b64(NOTE)}},
        ],
    }
    got = extract_document(resource, Context())  # type: ignore[arg-type]
    assert got.route == "facts" and got.patient == "pseudo-1"
    (finding,) = findings(got.facts)  # the negated infection is not a fact
    assert finding.problem == "LOOSENING" and finding.from_text
    assert finding.element == "DocumentReference.content[1].attachment"
    assert NOTE[finding.start : finding.end] == "loosening"
    assert [(c.system, c.code) for c in finding.codes] == [
        ("http://hl7.org/fhir/sid/icd-10", "T84.0")
    ]
    assert finding.date is not None and finding.date.year == 2024


def test_an_attachment_that_is_not_base64_text_is_a_clear_error() -> None:
    resource = {
        "resourceType": "DocumentReference",
        "id": "d2",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "%%%"}}],
    }
    with pytest.raises(InvalidElement, match=r"content\[0\]\.attachment\.data"):
        extract_document(resource, Context())  # type: ignore[arg-type]


def test_a_composition_narrative_is_read_as_plain_text() -> None:
    resource = {
        "resourceType": "Composition",
        "id": "c1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "date": "2024-03-02",
        "section": [
            {
                "title": "Plan",
                "section": [
                    {"text": {"status": "generated", "div": "<div>Pacemaker &amp; lead: "
                              "<b>lead fracture</b> confirmed.</div>"}}
                ],
            }
        ],
    }  # fmt: skip
    (finding,) = findings(extract_document(resource, Context()).facts)  # type: ignore[arg-type]
    assert finding.problem == "LEAD_FRACTURE"
    assert finding.element == "Composition.section[0].section[0].text"


def test_observation_and_procedure_notes_add_findings_to_their_facts() -> None:
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "11502-2"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-04-01",
        "note": [{"text": "Possible dislocation of the hip replacement."},
                 {"text": "Dislocated hip prosthesis, reduced under sedation."}],
    }  # fmt: skip
    got = extract_observation(observation, Context())  # type: ignore[arg-type]
    assert got.facts[0].kind == "observation"
    assert [(f.problem, f.element) for f in findings(got.facts)] == [
        ("DISLOCATION", "Observation.note[1].text")
    ]
    procedure = {
        "resourceType": "Procedure",
        "id": "pr1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "performedDateTime": "2024-04-02",
        "focalDevice": [{"manipulated": {"reference": "Device/dv1"}}],
        "note": [{"text": "Infected hip prosthesis washed out."}],
    }
    got = extract_procedure(procedure, Context())  # type: ignore[arg-type]
    (finding,) = findings(got.facts)
    assert finding.problem == "INFECTION"
    assert finding.devices == (f"{SRC}|Device|dv1",)
