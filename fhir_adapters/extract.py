"""Normalisation: one FHIR resource (R4 or R5, as parsed JSON) to the project's facts.

Every element read here goes through :mod:`fhir_adapters.primitives`, which checks it; so even on
the fast path nothing the product extracts (codes, dates, values, units, references) gets through
unchecked. Resolution of references (to patients, organisations, devices) is the caller's, through
the small :class:`ExtractionContext` protocol, so this module has no I/O.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, Protocol

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
    Reference,
    TextFindingFact,
)

from .notes import find_device_problems
from .primitives import (
    InvalidElement,
    get_bool,
    get_code,
    get_codeable_concept,
    get_codeable_concepts,
    get_date,
    get_datetime,
    get_id,
    get_list,
    get_object,
    get_string,
    no_nul,
    parse_instant,
    read_codeable_concept,
    read_coding,
    read_identifier_token,
    read_period,
    read_quantity,
    read_reference,
)
from .uk_geography import UNKNOWN_REGION, region_for_postcode

FhirVersion = Literal["R4", "R5"]

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
UCUM = "http://unitsofmeasure.org"

#: Resource types the product turns into facts or reference records.
PATIENT_SCOPED = frozenset(
    {
        "Patient",
        "Condition",
        "Observation",
        "MedicationRequest",
        "MedicationStatement",
        "Procedure",
        "DeviceUseStatement",
        "DeviceUsage",
        "AdverseEvent",
        "Consent",
        "DocumentReference",
        "Composition",
    }
)
REFERENCE_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "Device"})
SUPPORTED = PATIENT_SCOPED | REFERENCE_TYPES


class UnknownReference(InvalidElement):
    """A reference the product needs (a patient) that resolves to nothing known."""


class ExtractionContext(Protocol):
    fhir_version: FhirVersion

    def patient_for(self, reference: str | None, identifier: str | None, expression: str) -> str:
        """Pseudonym of the referenced patient; raises UnknownReference if there is none."""
        ...

    def key_for(self, reference: str, expected_type: str | None = None) -> str | None:
        """Resource key (``source|Type|id``) a reference points at, or None if unresolvable."""
        ...

    def organization(self, key: str) -> OrganizationRecord | None: ...

    def device(self, key: str) -> DeviceDescription | None: ...


@dataclass
class IdentityRecord:
    """The identifiable part of a Patient. Goes to the site's vault, never to Kafka."""

    resource_id: str
    identifiers: list[str]
    nhs_number: str | None
    family: str | None
    given: str | None
    birth_date: date | None
    gender: str | None
    address: list[dict[str, Any]]
    postcode: str | None
    phone: str | None
    email: str | None


@dataclass
class Extracted:
    resource_type: str
    #: ``facts`` (patient-scoped), ``reference`` or ``skipped``.
    route: Literal["facts", "reference", "skipped"]
    patient: str | None = None
    facts: tuple[Fact, ...] = ()
    record: Reference | None = None
    #: The resource says it was recorded in error: retract whatever its key had.
    entered_in_error: bool = False
    identity: IdentityRecord | None = None
    #: A Device carried on the facts topic too (R4 Device.patient): exposure facts.
    also_facts: bool = False
    skip_reason: str | None = None
    warnings: list[str] = field(default_factory=list)


# --- value sets (required bindings of the elements read) -------------------------------------

OBSERVATION_STATUS = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
CONDITION_CLINICAL = frozenset(
    {"active", "recurrence", "relapse", "inactive", "remission", "resolved", "unknown"}
)
CONDITION_VERIFICATION = frozenset(
    {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}
)
MEDREQ_STATUS = frozenset(
    {
        "active",
        "on-hold",
        "ended",
        "cancelled",
        "completed",
        "entered-in-error",
        "stopped",
        "draft",
        "unknown",
    }
)
MEDSTATEMENT_STATUS_R4 = frozenset(
    {
        "active",
        "completed",
        "entered-in-error",
        "intended",
        "stopped",
        "on-hold",
        "unknown",
        "not-taken",
    }
)
MEDSTATEMENT_STATUS_R5 = frozenset({"recorded", "entered-in-error", "draft"})
PROCEDURE_STATUS = frozenset(
    {
        "preparation",
        "in-progress",
        "not-done",
        "on-hold",
        "stopped",
        "completed",
        "entered-in-error",
        "unknown",
    }
)
DEVICE_STATUS = frozenset({"active", "inactive", "entered-in-error", "unknown"})
DEVICE_USE_STATUS = frozenset(
    {"active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "not-done"}
)
AE_ACTUALITY = frozenset({"actual", "potential"})
AE_STATUS_R5 = frozenset({"in-progress", "completed", "entered-in-error", "unknown"})
CONSENT_STATUS = frozenset(
    {
        "draft",
        "proposed",
        "active",
        "rejected",
        "inactive",
        "entered-in-error",
        "not-done",
        "unknown",
    }
)
GENDER = frozenset({"male", "female", "other", "unknown"})
RESEARCH_PURPOSES = frozenset({"research", "HRESCH", "RESCH", "CLINTRCH", "CLINTRCHNPC"})


def _require(resource: Mapping[str, Any], name: str, path: str) -> None:
    if resource.get(name) in (None, [], {}, ""):
        raise InvalidElement(f"{path}.{name}", "required element is missing")


def _require_one(resource: Mapping[str, Any], names: tuple[str, ...], path: str) -> None:
    if not any(resource.get(name) not in (None, [], {}, "") for name in names):
        raise InvalidElement(f"{path}.{names[0]}", f"one of {', '.join(names)} is required")


def _subject(resource: Mapping[str, Any], name: str, path: str, ctx: ExtractionContext) -> str:
    value = resource.get(name)
    expression = f"{path}.{name}"
    if value is None:
        raise InvalidElement(expression, "required element is missing")
    reference = read_reference(value, expression)
    identifier = read_identifier_token(value.get("identifier"), f"{expression}.identifier")
    return ctx.patient_for(reference, identifier, expression)


def _choice_datetime(
    resource: Mapping[str, Any], prefix: str, path: str
) -> tuple[datetime | None, datetime | None]:
    """Read ``prefix[x]`` for dateTime / Period / instant choices."""
    when = get_datetime(resource, f"{prefix}DateTime", path)
    if when is not None:
        return when, None
    period = resource.get(f"{prefix}Period")
    if period is not None:
        return read_period(period, f"{path}.{prefix}Period")
    instant = get_datetime(resource, f"{prefix}Instant", path)
    return instant, None


def _codeable_reference_concept(value: object, expression: str) -> tuple[Coding, ...]:
    """R5 CodeableReference: its ``concept``."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidElement(expression, "expected a CodeableReference object")
    read_reference(value.get("reference"), f"{expression}.reference")
    return read_codeable_concept(value.get("concept"), f"{expression}.concept")


# --- patient ---------------------------------------------------------------------------------


def _identity(resource: Mapping[str, Any], path: str) -> IdentityRecord:
    identifiers: list[str] = []
    nhs_number = None
    for index, item in enumerate(get_list(resource, "identifier", path)):
        token = read_identifier_token(item, f"{path}.identifier[{index}]")
        if token is None:
            continue
        identifiers.append(token)
        if token.startswith(NHS_NUMBER_SYSTEM + "|"):
            nhs_number = token.split("|", 1)[1]
    family = given = None
    for index, name in enumerate(get_list(resource, "name", path)):
        if not isinstance(name, dict):
            raise InvalidElement(f"{path}.name[{index}]", "expected a HumanName object")
        family = family or get_string(name, "family", f"{path}.name[{index}]")
        givens = get_list(name, "given", f"{path}.name[{index}]")
        if given is None and givens and isinstance(givens[0], str):
            given = no_nul(
                " ".join(g for g in givens if isinstance(g, str)), f"{path}.name[{index}].given"
            )
    addresses: list[dict[str, Any]] = []
    postcode = None
    for index, address in enumerate(get_list(resource, "address", path)):
        if not isinstance(address, dict):
            raise InvalidElement(f"{path}.address[{index}]", "expected an Address object")
        addresses.append(dict(address))
        code = get_string(address, "postalCode", f"{path}.address[{index}]")
        if postcode is None or address.get("use") == "home":
            postcode = code or postcode
    phone = email = None
    for index, telecom in enumerate(get_list(resource, "telecom", path)):
        if not isinstance(telecom, dict):
            raise InvalidElement(f"{path}.telecom[{index}]", "expected a ContactPoint object")
        system = get_code(telecom, "system", f"{path}.telecom[{index}]")
        value = get_string(telecom, "value", f"{path}.telecom[{index}]")
        if system == "phone" and phone is None:
            phone = value
        elif system == "email" and email is None:
            email = value
    return IdentityRecord(
        resource_id=str(resource.get("id")),
        identifiers=identifiers,
        nhs_number=nhs_number,
        family=family,
        given=given,
        birth_date=get_date(resource, "birthDate", path),
        gender=get_code(resource, "gender", path, GENDER),
        address=addresses,
        postcode=postcode,
        phone=phone,
        email=email,
    )


def extract_patient(
    resource: Mapping[str, Any], ctx: ExtractionContext, pseudonym: str
) -> Extracted:
    path = "Patient"
    identity = _identity(resource, path)
    deceased = get_bool(resource, "deceasedBoolean", path) or False
    deceased_date = get_datetime(resource, "deceasedDateTime", path)
    site = site_key = None
    region = region_for_postcode(identity.postcode)
    managing = resource.get("managingOrganization")
    if managing is not None:
        # The fact keeps the organisation's key, which does not depend on what has arrived
        # before; the ODS code only when it is known now (readers resolve the key later).
        expression = f"{path}.managingOrganization"
        reference = read_reference(managing, expression)
        token = read_identifier_token(managing.get("identifier"), f"{expression}.identifier")
        if token is not None and token.startswith(ODS_SYSTEM + "|"):
            site = token.split("|", 1)[1] or None
        site_key = ctx.key_for(reference, "Organization") if reference else None
        if site_key is not None:
            org = ctx.organization(site_key)
            if org is not None and org.ods_code:
                site = org.ods_code
            if region == UNKNOWN_REGION and org is not None:
                region = org.region
    gp_practice = None
    practitioners: list[str] = []
    for index, item in enumerate(get_list(resource, "generalPractitioner", path)):
        reference = read_reference(item, f"{path}.generalPractitioner[{index}]")
        if not reference:
            continue
        key = ctx.key_for(reference)
        if key is None:
            continue
        if "|Organization|" in key:
            org = ctx.organization(key)
            gp_practice = gp_practice or (org.ods_code if org and org.ods_code else key)
        else:
            practitioners.append(key)
    fact = PatientFact(
        birth_date=identity.birth_date,
        sex=identity.gender or "unknown",  # type: ignore[arg-type]
        deceased=deceased or deceased_date is not None,
        deceased_date=deceased_date,
        site=site,
        site_key=site_key,
        region=region,
        gp_practice=gp_practice,
        general_practitioners=tuple(practitioners),
    )
    return Extracted("Patient", "facts", patient=pseudonym, facts=(fact,), identity=identity)


# --- clinical resources ----------------------------------------------------------------------


def extract_condition(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "Condition"
    patient = _subject(resource, "subject", path, ctx)
    codes = get_codeable_concept(resource, "code", path)
    clinical = get_codeable_concept(resource, "clinicalStatus", path)
    verification = get_codeable_concept(resource, "verificationStatus", path)
    clinical_code = clinical[0].code if clinical else None
    verification_code = verification[0].code if verification else None
    if clinical_code is not None and clinical_code not in CONDITION_CLINICAL:
        raise InvalidElement(f"{path}.clinicalStatus", f"unknown clinical status {clinical_code!r}")
    if verification_code is not None and verification_code not in CONDITION_VERIFICATION:
        raise InvalidElement(
            f"{path}.verificationStatus", f"unknown verification status {verification_code!r}"
        )
    onset, _ = _choice_datetime(resource, "onset", path)
    abatement, _ = _choice_datetime(resource, "abatement", path)
    stage: list[Coding] = []
    for index, item in enumerate(get_list(resource, "stage", path)):
        if not isinstance(item, dict):
            raise InvalidElement(f"{path}.stage[{index}]", "expected an object")
        stage.extend(get_codeable_concept(item, "summary", f"{path}.stage[{index}]"))
    fact = ConditionFact(
        codes=codes,
        onset=onset,
        abatement=abatement,
        recorded=get_datetime(resource, "recordedDate", path),
        clinical_status=clinical_code,
        verification_status=verification_code,
        stage=tuple(stage),
    )
    return Extracted(
        "Condition",
        "facts",
        patient=patient,
        facts=(fact,),
        entered_in_error=verification_code == "entered-in-error",
    )


def _observation_value(
    item: Mapping[str, Any], path: str
) -> tuple[float | None, str | None, tuple[Coding, ...]]:
    if "valueQuantity" in item:
        value, unit = read_quantity(item["valueQuantity"], f"{path}.valueQuantity")
        return value, unit, ()
    if "valueCodeableConcept" in item:
        return (
            None,
            None,
            read_codeable_concept(item["valueCodeableConcept"], f"{path}.valueCodeableConcept"),
        )
    if "valueInteger" in item:
        value = item["valueInteger"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidElement(f"{path}.valueInteger", "expected an integer")
        return float(value), None, ()
    if "valueBoolean" in item:
        get_bool(item, "valueBoolean", path)
    return None, None, ()


def extract_observation(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "Observation"
    _require(resource, "code", path)
    _require(resource, "status", path)
    status = get_code(resource, "status", path, OBSERVATION_STATUS) or "unknown"
    patient = _subject(resource, "subject", path, ctx)
    codes = get_codeable_concept(resource, "code", path)
    effective, _ = _choice_datetime(resource, "effective", path)
    value, unit, value_codes = _observation_value(resource, path)
    components = []
    for index, item in enumerate(get_list(resource, "component", path)):
        cpath = f"{path}.component[{index}]"
        if not isinstance(item, dict):
            raise InvalidElement(cpath, "expected an object")
        _require(item, "code", cpath)
        cvalue, cunit, cvalue_codes = _observation_value(item, cpath)
        components.append(
            Component(
                codes=get_codeable_concept(item, "code", cpath),
                value=cvalue,
                unit=cunit,
                value_codes=cvalue_codes,
                interpretation=get_codeable_concepts(item, "interpretation", cpath),
            )
        )
    category = tuple(c.code for c in get_codeable_concepts(resource, "category", path))
    fact = ObservationFact(
        codes=codes,
        status=status,
        effective=effective,
        value=value,
        unit=unit,
        value_codes=value_codes,
        interpretation=get_codeable_concepts(resource, "interpretation", path),
        components=tuple(components),
        category=category,
    )
    findings = _text_findings(_notes(resource, path), effective)
    return Extracted(
        "Observation",
        "facts",
        patient=patient,
        facts=(fact, *findings),
        entered_in_error=status == "entered-in-error",
    )


def _contained_medication(
    resource: Mapping[str, Any], reference: str | None, path: str
) -> tuple[Coding, ...]:
    if not reference or not reference.startswith("#"):
        return ()
    for index, item in enumerate(get_list(resource, "contained", path)):
        if isinstance(item, dict) and item.get("id") == reference[1:]:
            return get_codeable_concept(item, "code", f"{path}.contained[{index}]")
    raise InvalidElement(f"{path}.medicationReference", f"contained resource {reference} not found")


def _medication_codes(
    resource: Mapping[str, Any], ctx: ExtractionContext, path: str
) -> tuple[Coding, ...]:
    if ctx.fhir_version == "R5":
        _require(resource, "medication", path)
        medication = resource["medication"]
        codes = _codeable_reference_concept(medication, f"{path}.medication")
        if not codes and isinstance(medication, dict):
            reference = read_reference(medication.get("reference"), f"{path}.medication.reference")
            codes = _contained_medication(resource, reference, path)
        return codes
    _require_one(resource, ("medicationCodeableConcept", "medicationReference"), path)
    if "medicationCodeableConcept" in resource:
        return get_codeable_concept(resource, "medicationCodeableConcept", path)
    reference = read_reference(resource.get("medicationReference"), f"{path}.medicationReference")
    return _contained_medication(resource, reference, path)


def extract_medication_request(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "MedicationRequest"
    _require(resource, "status", path)
    _require(resource, "intent", path)
    status = get_code(resource, "status", path, MEDREQ_STATUS) or "unknown"
    get_code(resource, "intent", path)
    patient = _subject(resource, "subject", path, ctx)
    codes = _medication_codes(resource, ctx, path)
    fact = MedicationFact(
        codes=codes,
        status=status,
        start=get_datetime(resource, "authoredOn", path),
        source="request",
    )
    return Extracted(
        "MedicationRequest",
        "facts",
        patient=patient,
        facts=(fact,),
        entered_in_error=status == "entered-in-error",
    )


def extract_medication_statement(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "MedicationStatement"
    _require(resource, "status", path)
    allowed = MEDSTATEMENT_STATUS_R5 if ctx.fhir_version == "R5" else MEDSTATEMENT_STATUS_R4
    status = get_code(resource, "status", path, allowed) or "unknown"
    patient = _subject(resource, "subject", path, ctx)
    codes = _medication_codes(resource, ctx, path)
    start, end = _choice_datetime(resource, "effective", path)
    if start is None:
        start = get_datetime(resource, "dateAsserted", path)
    fact = MedicationFact(codes=codes, status=status, start=start, end=end, source="statement")
    return Extracted(
        "MedicationStatement",
        "facts",
        patient=patient,
        facts=(fact,),
        entered_in_error=status == "entered-in-error",
    )


def _device_keys(resource: Mapping[str, Any], ctx: ExtractionContext, path: str) -> list[str]:
    keys = []
    for index, item in enumerate(get_list(resource, "focalDevice", path)):
        fpath = f"{path}.focalDevice[{index}]"
        if not isinstance(item, dict):
            raise InvalidElement(fpath, "expected an object")
        reference = read_reference(item.get("manipulated"), f"{fpath}.manipulated")
        key = ctx.key_for(reference, "Device") if reference else None
        if key is not None:
            keys.append(key)
    return keys


def extract_procedure(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "Procedure"
    _require(resource, "status", path)
    status = get_code(resource, "status", path, PROCEDURE_STATUS) or "unknown"
    patient = _subject(resource, "subject", path, ctx)
    prefix = "occurrence" if ctx.fhir_version == "R5" else "performed"
    performed, performed_end = _choice_datetime(resource, prefix, path)
    fact = ProcedureFact(
        codes=get_codeable_concept(resource, "code", path),
        status=status,
        performed=performed,
        performed_end=performed_end,
        devices=tuple(_device_keys(resource, ctx, path)),
    )
    findings = _text_findings(_notes(resource, path), performed, fact.devices)
    return Extracted(
        "Procedure",
        "facts",
        patient=patient,
        facts=(fact, *findings),
        entered_in_error=status == "entered-in-error",
    )


def describe_device(
    resource: Mapping[str, Any], key: str, ctx: ExtractionContext
) -> DeviceDescription:
    path = "Device"
    model = get_string(resource, "modelNumber", path)
    names_field = "name" if ctx.fhir_version == "R5" else "deviceName"
    value_field = "value" if ctx.fhir_version == "R5" else "name"
    manufacturer = get_string(resource, "manufacturer", path)
    for index, item in enumerate(get_list(resource, names_field, path)):
        npath = f"{path}.{names_field}[{index}]"
        if not isinstance(item, dict):
            raise InvalidElement(npath, "expected an object")
        name = get_string(item, value_field, npath)
        kind = get_code(item, "type", npath)
        if kind == "model-name" and model is None:
            model = name
        elif kind == "manufacturer-name" and manufacturer is None:
            manufacturer = name
    udi = None
    for index, item in enumerate(get_list(resource, "udiCarrier", path)):
        upath = f"{path}.udiCarrier[{index}]"
        if not isinstance(item, dict):
            raise InvalidElement(upath, "expected an object")
        udi = (
            udi
            or get_string(item, "deviceIdentifier", upath)
            or get_string(item, "carrierHRF", upath)
        )
    type_codes = (
        get_codeable_concepts(resource, "type", path)
        if ctx.fhir_version == "R5"
        else get_codeable_concept(resource, "type", path)
    )
    return DeviceDescription(
        device=key,
        type_codes=type_codes,
        manufacturer=manufacturer,
        model=model,
        lot=get_string(resource, "lotNumber", path),
        udi=udi,
    )


def extract_device(resource: Mapping[str, Any], ctx: ExtractionContext, key: str) -> Extracted:
    path = "Device"
    status = get_code(resource, "status", path, DEVICE_STATUS)
    description = describe_device(resource, key, ctx)
    patient = None
    if ctx.fhir_version == "R4" and resource.get("patient") is not None:
        patient = _subject(resource, "patient", path, ctx)
    record = DeviceRecord(description=description, status=status, patient=patient)
    facts: tuple[Fact, ...] = ()
    if patient is not None:
        facts = (
            DeviceExposureFact(device=description, status=status or "unknown", source="device"),
        )
    return Extracted(
        "Device",
        "reference",
        patient=patient,
        record=record,
        facts=facts,
        also_facts=patient is not None,
        entered_in_error=status == "entered-in-error",
    )


def extract_device_use(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    r5 = ctx.fhir_version == "R5"
    path = "DeviceUsage" if r5 else "DeviceUseStatement"
    _require(resource, "status", path)
    status = get_code(resource, "status", path, DEVICE_USE_STATUS) or "unknown"
    patient = _subject(resource, "patient" if r5 else "subject", path, ctx)
    _require(resource, "device", path)
    if r5:
        device_field = resource["device"]
        if not isinstance(device_field, dict):
            raise InvalidElement(f"{path}.device", "expected a CodeableReference object")
        type_codes = read_codeable_concept(device_field.get("concept"), f"{path}.device.concept")
        reference = read_reference(device_field.get("reference"), f"{path}.device.reference")
    else:
        type_codes = ()
        reference = read_reference(resource.get("device"), f"{path}.device")
    key = ctx.key_for(reference, "Device") if reference else None
    description = (ctx.device(key) if key else None) or DeviceDescription(
        device=key or f"{path}/{resource.get('id')}", type_codes=type_codes
    )
    start, end = _choice_datetime(resource, "timing", path)
    if start is None:
        start = get_datetime(resource, "dateAsserted" if r5 else "recordedOn", path)
    fact = DeviceExposureFact(
        device=description,
        status=status,
        start=start,
        end=end,
        source="usage" if r5 else "use_statement",
    )
    return Extracted(
        path,
        "facts",
        patient=patient,
        facts=(fact,),
        entered_in_error=status == "entered-in-error",
    )


def extract_adverse_event(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "AdverseEvent"
    r5 = ctx.fhir_version == "R5"
    _require(resource, "actuality", path)
    actuality = get_code(resource, "actuality", path, AE_ACTUALITY) or "actual"
    status = get_code(resource, "status", path, AE_STATUS_R5) if r5 else None
    patient = _subject(resource, "subject", path, ctx)
    codes = get_codeable_concept(resource, "code" if r5 else "event", path)
    when, _ = (
        _choice_datetime(resource, "occurrence", path)
        if r5
        else (get_datetime(resource, "date", path), None)
    )
    devices: list[DeviceDescription] = []
    medications: list[Coding] = []
    for index, item in enumerate(get_list(resource, "suspectEntity", path)):
        spath = f"{path}.suspectEntity[{index}]"
        if not isinstance(item, dict):
            raise InvalidElement(spath, "expected an object")
        if r5:
            reference = read_reference(item.get("instanceReference"), f"{spath}.instanceReference")
            concept = read_codeable_concept(
                item.get("instanceCodeableConcept"), f"{spath}.instanceCodeableConcept"
            )
        else:
            reference = read_reference(item.get("instance"), f"{spath}.instance")
            concept = ()
        key = ctx.key_for(reference) if reference else None
        if key is not None and "|Device|" in key:
            devices.append(ctx.device(key) or DeviceDescription(device=key))
        elif concept:
            medications.extend(concept)
    fact = AdverseEventFact(
        codes=codes,
        actuality=actuality,
        date=when,
        seriousness=get_codeable_concept(resource, "seriousness", path),
        suspect_devices=tuple(devices),
        suspect_medications=tuple(medications),
    )
    texts = _notes(resource, path)
    event_field = "code" if r5 else "event"
    event_concept = resource.get(event_field)
    if isinstance(event_concept, Mapping):
        text = get_string(event_concept, "text", f"{path}.{event_field}")
        if text:
            texts.insert(0, (f"{path}.{event_field}.text", text))
    named = tuple(d.device for d in devices)
    findings = _text_findings(texts, when, named) if actuality == "actual" else ()
    return Extracted(
        "AdverseEvent",
        "facts",
        patient=patient,
        facts=(fact, *findings),
        entered_in_error=status == "entered-in-error",
    )


def extract_consent(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "Consent"
    r5 = ctx.fhir_version == "R5"
    _require(resource, "status", path)
    status = get_code(resource, "status", path, CONSENT_STATUS) or "unknown"
    patient = _subject(resource, "subject" if r5 else "patient", path, ctx)
    scope = () if r5 else get_codeable_concept(resource, "scope", path)
    category = get_codeable_concepts(resource, "category", path)
    purposes: list[str] = []
    trials: list[str] = []
    start: datetime | None = None
    end: datetime | None = None
    if r5:
        decision = get_code(resource, "decision", path, frozenset({"deny", "permit"}))
        start, end = read_period(resource.get("period"), f"{path}.period")
        provisions = get_list(resource, "provision", path)
        for index, item in enumerate(provisions):
            if isinstance(item, dict):
                ipath = f"{path}.provision[{index}]"
                purposes.extend(c.code for c in _codings_list(item, "purpose", ipath))
                trials.extend(_consent_trials(item, ipath))
                if start is None and end is None:
                    start, end = read_period(item.get("period"), f"{ipath}.period")
    else:
        decision = None
        provision = get_object(resource, "provision", path)
        if provision is not None:
            decision = get_code(
                provision, "type", f"{path}.provision", frozenset({"deny", "permit"})
            )
            purposes.extend(
                c.code for c in _codings_list(provision, "purpose", f"{path}.provision")
            )
            trials.extend(_consent_trials(provision, f"{path}.provision"))
            start, end = read_period(provision.get("period"), f"{path}.provision.period")
    research = any(c.code == "research" for c in scope + category) or any(
        p in RESEARCH_PURPOSES for p in purposes
    )
    when = get_datetime(resource, "dateTime", path)
    if r5 and when is None:
        day = get_date(resource, "date", path)
        when = datetime(day.year, day.month, day.day, tzinfo=UTC) if day else None
    fact = ConsentFact(
        status=status,
        research_opt_out=research and decision == "deny" and status == "active",
        date=when,
        follow_up_trials=(
            tuple(dict.fromkeys(trials))
            if research and decision == "permit" and status == "active"
            else ()
        ),
        period_start=start,
        period_end=end,
    )
    return Extracted(
        "Consent",
        "facts",
        patient=patient,
        facts=(fact,),
        entered_in_error=status == "entered-in-error",
    )


def _consent_trials(provision: Mapping[str, Any], path: str) -> list[str]:
    """The trials a consent provision names: ``provision.data[].reference`` pointing at a
    ResearchStudy (its id, or its identifier's value when the reference is logical)."""
    found: list[str] = []
    for index, item in enumerate(get_list(provision, "data", path)):
        dpath = f"{path}.data[{index}]"
        if not isinstance(item, dict):
            raise InvalidElement(dpath, "expected an object")
        value = item.get("reference")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise InvalidElement(f"{dpath}.reference", "expected a Reference object")
        literal = read_reference(value, f"{dpath}.reference")
        if literal is not None:
            kind, _, ident = literal.rpartition("/")
            if kind.rpartition("/")[2] == "ResearchStudy" and ident:
                found.append(ident)
            continue
        if value.get("type") == "ResearchStudy":
            identifier = get_object(value, "identifier", f"{dpath}.reference")
            token = (
                get_string(identifier, "value", f"{dpath}.reference.identifier")
                if identifier is not None
                else None
            )
            if token:
                found.append(token.strip())
    return found


def _codings_list(parent: Mapping[str, Any], name: str, path: str) -> tuple[Coding, ...]:
    out = []
    for index, item in enumerate(get_list(parent, name, path)):
        coding = read_coding(item, f"{path}.{name}[{index}]")
        if coding is not None:
            out.append(coding)
    return tuple(out)


# --- reference resources ---------------------------------------------------------------------


def extract_organization(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "Organization"
    ods = None
    for index, item in enumerate(get_list(resource, "identifier", path)):
        token = read_identifier_token(item, f"{path}.identifier[{index}]")
        if token and token.startswith(ODS_SYSTEM + "|"):
            ods = token.split("|", 1)[1]
    region = UNKNOWN_REGION
    for index, address in enumerate(get_list(resource, "address", path)):
        if not isinstance(address, dict):
            raise InvalidElement(f"{path}.address[{index}]", "expected an Address object")
        region = region_for_postcode(get_string(address, "postalCode", f"{path}.address[{index}]"))
        if region != UNKNOWN_REGION:
            break
    part_of_ref = read_reference(resource.get("partOf"), f"{path}.partOf")
    record = OrganizationRecord(
        ods_code=ods,
        name=get_string(resource, "name", path),
        region=region,
        type_codes=get_codeable_concepts(resource, "type", path),
        part_of=ctx.key_for(part_of_ref, "Organization") if part_of_ref else None,
        active=get_bool(resource, "active", path) is not False,
    )
    return Extracted("Organization", "reference", record=record)


def _email(resource: Mapping[str, Any], path: str) -> str | None:
    for index, telecom in enumerate(get_list(resource, "telecom", path)):
        if not isinstance(telecom, dict):
            raise InvalidElement(f"{path}.telecom[{index}]", "expected a ContactPoint object")
        if get_code(telecom, "system", f"{path}.telecom[{index}]") == "email":
            return get_string(telecom, "value", f"{path}.telecom[{index}]")
    return None


def extract_practitioner(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "Practitioner"
    identifiers = []
    for index, item in enumerate(get_list(resource, "identifier", path)):
        token = read_identifier_token(item, f"{path}.identifier[{index}]")
        if token:
            identifiers.append(token)
    name = None
    for index, item in enumerate(get_list(resource, "name", path)):
        if not isinstance(item, dict):
            raise InvalidElement(f"{path}.name[{index}]", "expected a HumanName object")
        parts = [p for p in get_list(item, "prefix", f"{path}.name[{index}]") if isinstance(p, str)]
        parts += [g for g in get_list(item, "given", f"{path}.name[{index}]") if isinstance(g, str)]
        family = get_string(item, "family", f"{path}.name[{index}]")
        if family:
            parts.append(family)
        name = name or (" ".join(parts) or get_string(item, "text", f"{path}.name[{index}]"))
    record = PractitionerRecord(
        name=name,
        identifiers=tuple(identifiers),
        email=_email(resource, path),
        active=get_bool(resource, "active", path) is not False,
    )
    return Extracted("Practitioner", "reference", record=record)


def extract_practitioner_role(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    path = "PractitionerRole"
    practitioner = read_reference(resource.get("practitioner"), f"{path}.practitioner")
    organization = read_reference(resource.get("organization"), f"{path}.organization")
    record = PractitionerRoleRecord(
        practitioner=ctx.key_for(practitioner, "Practitioner") if practitioner else None,
        organization=ctx.key_for(organization, "Organization") if organization else None,
        codes=get_codeable_concepts(resource, "code", path),
        texts=tuple(
            text
            for i, concept in enumerate(get_list(resource, "code", path))
            if isinstance(concept, Mapping)
            and (text := get_string(concept, "text", f"{path}.code[{i}]"))
        ),
        specialties=get_codeable_concepts(resource, "specialty", path),
        email=_email(resource, path),
        active=get_bool(resource, "active", path) is not False,
    )
    return Extracted("PractitionerRole", "reference", record=record)


# --- free text: notes, attachments, narratives ---------------------------------------------------

DOCUMENT_STATUS = frozenset({"current", "superseded", "entered-in-error"})
COMPOSITION_STATUS = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "deprecated",
        "unknown",
    }
)
_TAG = re.compile(r"<[^>]*>")


def _notes(resource: Mapping[str, Any], path: str) -> list[tuple[str, str]]:
    """``(element, text)`` of each ``note`` (Annotation) of a resource."""
    found = []
    for index, item in enumerate(get_list(resource, "note", path)):
        npath = f"{path}.note[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidElement(npath, "expected an object")
        text = get_string(item, "text", npath)
        if text:
            found.append((f"{npath}.text", text))
    return found


def _text_findings(
    texts: Sequence[tuple[str, str]], when: datetime | None, devices: tuple[str, ...] = ()
) -> tuple[TextFindingFact, ...]:
    """The asserted device problems in the texts (:mod:`fhir_adapters.notes`) as facts."""
    found = []
    for element, text in texts:
        for finding in find_device_problems(text):
            if not finding.asserted:
                continue
            codes = tuple(
                Coding(system=system, code=value)
                for system, _, value in (c.rpartition("|") for c in finding.codes)
            )
            found.append(
                TextFindingFact(
                    problem=finding.problem,
                    codes=codes,
                    date=when,
                    element=element,
                    start=finding.start,
                    end=finding.end,
                    devices=devices,
                )
            )
    return tuple(found)


def _attachment_text(attachment: Mapping[str, Any], path: str) -> str | None:
    """The text of an attachment carried inline as plain text (``contentType`` text/plain);
    None for anything else (a PDF, an image, a URL only: not read)."""
    content_type = get_code(attachment, "contentType", path) or ""
    data = get_string(attachment, "data", path)
    if data is None or content_type.split(";")[0].strip().lower() != "text/plain":
        return None
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as error:
        raise InvalidElement(f"{path}.data", f"not base64 of UTF-8 text: {error}") from None


def _narrative(section: Mapping[str, Any], path: str) -> str | None:
    """A narrative's XHTML as plain text (tags dropped, entities decoded)."""
    text = get_object(section, "text", path)
    if text is None:
        return None
    div = get_string(text, "div", f"{path}.text")
    return html.unescape(_TAG.sub(" ", div)) if div else None


def extract_document(resource: Mapping[str, Any], ctx: ExtractionContext) -> Extracted:
    """A DocumentReference (its inline text/plain attachments) or a Composition (its sections'
    narratives): only the device problems read from its text become facts."""
    path = str(resource.get("resourceType"))
    composition = path == "Composition"
    _require(resource, "status", path)
    status = (
        get_code(resource, "status", path, COMPOSITION_STATUS if composition else DOCUMENT_STATUS)
        or "unknown"
    )
    patient = _subject(resource, "subject", path, ctx)
    when = get_datetime(resource, "date", path)
    texts: list[tuple[str, str]] = []
    if composition:
        sections = [
            (f"{path}.section[{i}]", s) for i, s in enumerate(get_list(resource, "section", path))
        ]
        while sections:
            spath, section = sections.pop(0)
            if not isinstance(section, Mapping):
                raise InvalidElement(spath, "expected an object")
            narrative = _narrative(section, spath)
            if narrative:
                texts.append((f"{spath}.text", narrative))
            sections.extend(
                (f"{spath}.section[{i}]", s)
                for i, s in enumerate(get_list(section, "section", spath))
            )
    else:
        for index, content in enumerate(get_list(resource, "content", path)):
            cpath = f"{path}.content[{index}]"
            if not isinstance(content, Mapping):
                raise InvalidElement(cpath, "expected an object")
            attachment = get_object(content, "attachment", cpath)
            text = _attachment_text(attachment, f"{cpath}.attachment") if attachment else None
            if text:
                texts.append((f"{cpath}.attachment", text))
    return Extracted(
        path,
        "facts",
        patient=patient,
        facts=_text_findings(texts, when),
        entered_in_error=status == "entered-in-error",
    )


def check_resource_header(resource: Mapping[str, Any], path: str) -> None:
    """The elements every resource must get right before anything else is read."""
    get_id(resource, "id", path)
    meta = get_object(resource, "meta", path)
    if meta is not None:
        get_id(meta, "versionId", f"{path}.meta")
        if meta.get("lastUpdated") is not None:
            parse_instant(meta["lastUpdated"], f"{path}.meta.lastUpdated")


EXTRACTORS = {
    "Condition": extract_condition,
    "Observation": extract_observation,
    "MedicationRequest": extract_medication_request,
    "MedicationStatement": extract_medication_statement,
    "Procedure": extract_procedure,
    "DeviceUseStatement": extract_device_use,
    "DeviceUsage": extract_device_use,
    "AdverseEvent": extract_adverse_event,
    "DocumentReference": extract_document,
    "Composition": extract_document,
    "Consent": extract_consent,
    "Organization": extract_organization,
    "Practitioner": extract_practitioner,
    "PractitionerRole": extract_practitioner_role,
}
