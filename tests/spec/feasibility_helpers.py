"""Small builders for feasibility spec tests: patients as tables of facts."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
DMD = "https://dmd.nhs.uk"
OPCS4 = "https://fhir.hl7.org.uk/Id/opcs-4"
AJCC = "http://cancerstaging.org"
INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

#: The evaluation time of every spec unless it says otherwise.
AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def iso(day: str | date | datetime) -> str:
    if isinstance(day, datetime):
        return day.isoformat()
    if isinstance(day, date):
        return f"{day.isoformat()}T09:00:00+00:00"
    return day if "T" in day else f"{day}T09:00:00+00:00"


def coding(system: str, code: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": None}


def patient(
    birth: str | None = "1960-06-15",
    sex: str = "female",
    site: str | None = "RA1",
    region: str = "London",
    deceased: bool = False,
    deceased_date: str | None = None,
) -> dict[str, Any]:
    return {
        "kind": "patient",
        "birth_date": birth,
        "sex": sex,
        "deceased": deceased,
        "deceased_date": iso(deceased_date) if deceased_date else None,
        "site": site,
        "region": region,
        "gp_practice": None,
        "general_practitioners": [],
    }


def condition(
    system: str,
    code: str,
    onset: str | None = "2020-01-01",
    clinical: str | None = "active",
    verification: str | None = "confirmed",
    recorded: str | None = None,
) -> dict[str, Any]:
    return {
        "kind": "condition",
        "codes": [coding(system, code)],
        "onset": iso(onset) if onset else None,
        "abatement": None,
        "recorded": iso(recorded) if recorded else None,
        "clinical_status": clinical,
        "verification_status": verification,
        "stage": [],
    }


def observation(
    code: str,
    when: str | None = "2025-10-01",
    value: float | None = None,
    unit: str | None = None,
    value_codes: list[tuple[str, str]] | None = None,
    interpretation: list[str] | None = None,
    components: list[dict[str, Any]] | None = None,
    status: str = "final",
    system: str = LOINC,
) -> dict[str, Any]:
    return {
        "kind": "observation",
        "codes": [coding(system, code)],
        "status": status,
        "effective": iso(when) if when else None,
        "value": value,
        "unit": unit,
        "value_codes": [coding(s, c) for s, c in value_codes or ()],
        "interpretation": [coding(INTERP, i) for i in interpretation or ()],
        "components": components or [],
        "category": ["laboratory"],
    }


def component(
    code: str, value: float, unit: str, interpretation: list[str] | None = None
) -> dict[str, Any]:
    return {
        "codes": [coding(LOINC, code)],
        "value": value,
        "unit": unit,
        "value_codes": [],
        "interpretation": [coding(INTERP, i) for i in interpretation or ()],
    }


def medication(
    code: str, start: str | None = "2025-06-01", status: str = "active", system: str = DMD
) -> dict[str, Any]:
    return {
        "kind": "medication",
        "codes": [coding(system, code)],
        "status": status,
        "start": iso(start) if start else None,
        "end": None,
        "source": "request",
    }


def procedure(
    code: str, when: str | None = "2024-03-01", status: str = "completed", system: str = OPCS4
) -> dict[str, Any]:
    return {
        "kind": "procedure",
        "codes": [coding(system, code)],
        "status": status,
        "performed": iso(when) if when else None,
        "performed_end": None,
        "devices": [],
    }


def device(
    type_code: str | None = "304120007",
    manufacturer: str | None = "Orthomedica",
    model: str | None = "Acetabulon X2",
    start: str | None = "2023-05-01",
    status: str = "active",
) -> dict[str, Any]:
    return {
        "kind": "device_exposure",
        "device": {
            "device": "urn:x|Device|d1",
            "type_codes": [coding(SNOMED, type_code)] if type_code else [],
            "manufacturer": manufacturer,
            "model": model,
            "lot": None,
            "udi": None,
        },
        "status": status,
        "start": iso(start) if start else None,
        "end": None,
        "source": "use_statement",
    }


def population(**patients: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``name=[facts...]`` -> the stream's state shape: patient -> resource key -> entry.
    Each fact becomes its own resource (key ``urn:t|Kind|<patient>-<n>``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, facts in patients.items():
        entries: dict[str, dict[str, Any]] = {}
        for n, fact in enumerate(facts):
            kind = fact["kind"].title().replace("_", "")
            entries[f"urn:t|{kind}|{name}-{n:03d}"] = {
                "seq": 1,
                "retracted": False,
                "facts": [fact],
            }
        out[name] = entries
    return out
