"""Clinical facts: the project's own small types that every downstream package reads.

A FHIR resource becomes one :class:`ResourceFacts` envelope (patient-scoped resources, published on
the facts topic keyed by the patient pseudonym) or one :class:`ReferenceRecord` (practitioners,
roles, organisations and devices, published on the compacted reference topic). No FHIR model
crosses this boundary, and nothing identifying (names, addresses, telecom, identifiers) is ever a
field here: identity stays in the site's vault (:mod:`fhir_adapters.vault`).

Ordering and idempotency: every envelope carries ``seq``, the version sequence of its resource
assigned by the adapter's resource index (1 for the first version, +1 per accepted new version or
retraction). Consumers keep, per resource key, the envelope with the highest ``seq`` and ignore
anything else, so replaying any prefix of the log, in any number of copies, changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from core.patient_view import patient_site as _patient_site

SCHEMA = "concierge.facts/1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Coding(_Frozen):
    system: str
    code: str
    display: str | None = None


class Provenance(_Frozen):
    """Where a fact came from, precisely enough to fetch the source resource again."""

    source: str
    resource_type: str
    resource_id: str
    version: str
    last_updated: datetime | None = None
    ingested_at: datetime
    fhir_version: Literal["R4", "R5"] = "R4"


class PatientFact(_Frozen):
    kind: Literal["patient"] = "patient"
    birth_date: date | None = None
    sex: Literal["male", "female", "other", "unknown"] = "unknown"
    deceased: bool = False
    deceased_date: datetime | None = None
    #: ODS code of the managing organisation, when the adapter knew it at ingestion (the
    #: Organization was ingested before, or the reference carries an ODS identifier); None
    #: otherwise. Never a reference key: see :func:`patient_site`.
    site: str | None = None
    #: Reference key (``source|Organization|id``) of the managing organisation: stable whatever
    #: the order in which the Patient and its Organization arrive. Readers that show sites
    #: resolve it to an ODS code and name from the reference topic when they answer.
    site_key: str | None = None
    #: NHS region or nation, derived from the postcode area only.
    region: str = "Unknown"
    #: Reference keys (``source|Type|id``) of the registered GP practice and practitioners.
    gp_practice: str | None = None
    general_practitioners: tuple[str, ...] = ()


class ConditionFact(_Frozen):
    kind: Literal["condition"] = "condition"
    codes: tuple[Coding, ...]
    onset: datetime | None = None
    abatement: datetime | None = None
    recorded: datetime | None = None
    clinical_status: str | None = None
    verification_status: str | None = None
    stage: tuple[Coding, ...] = ()


class Component(_Frozen):
    codes: tuple[Coding, ...]
    value: float | None = None
    unit: str | None = None
    value_codes: tuple[Coding, ...] = ()
    interpretation: tuple[Coding, ...] = ()


class ObservationFact(_Frozen):
    kind: Literal["observation"] = "observation"
    codes: tuple[Coding, ...]
    status: str
    effective: datetime | None = None
    #: Numeric value and its UCUM unit code (``unit`` is the UCUM code when the system is UCUM).
    value: float | None = None
    unit: str | None = None
    value_codes: tuple[Coding, ...] = ()
    interpretation: tuple[Coding, ...] = ()
    components: tuple[Component, ...] = ()
    category: tuple[str, ...] = ()


class MedicationFact(_Frozen):
    kind: Literal["medication"] = "medication"
    codes: tuple[Coding, ...]
    status: str
    start: datetime | None = None
    end: datetime | None = None
    #: ``request`` (MedicationRequest) or ``statement`` (MedicationStatement).
    source: Literal["request", "statement"]


class ProcedureFact(_Frozen):
    kind: Literal["procedure"] = "procedure"
    codes: tuple[Coding, ...]
    status: str
    performed: datetime | None = None
    performed_end: datetime | None = None
    #: Reference keys of devices implanted, removed or otherwise manipulated.
    devices: tuple[str, ...] = ()


class DeviceDescription(_Frozen):
    """What the product needs to know of a device: its place in the device hierarchy."""

    device: str  # reference key of the Device resource
    type_codes: tuple[Coding, ...] = ()
    manufacturer: str | None = None
    model: str | None = None
    lot: str | None = None
    udi: str | None = None


class DeviceExposureFact(_Frozen):
    kind: Literal["device_exposure"] = "device_exposure"
    device: DeviceDescription
    status: str
    start: datetime | None = None
    end: datetime | None = None
    #: ``device`` (a Device with a patient), ``use_statement`` (R4) or ``usage`` (R5).
    source: Literal["device", "use_statement", "usage"]


class AdverseEventFact(_Frozen):
    kind: Literal["adverse_event"] = "adverse_event"
    codes: tuple[Coding, ...]
    actuality: str
    date: datetime | None = None
    seriousness: tuple[Coding, ...] = ()
    suspect_devices: tuple[DeviceDescription, ...] = ()
    suspect_medications: tuple[Coding, ...] = ()


class TextFindingFact(_Frozen):
    """A device problem read from free text (a note, an attachment, a narrative) by the rule-based
    clinical NLP pipeline (:mod:`fhir_adapters.notes`): a candidate outcome, never a coded one.

    Only asserted mentions become facts (not negated, uncertain, historical, hypothetical or about
    the family). The envelope's provenance gives the resource and its version; ``element`` and the
    span say where in it the words are.
    """

    kind: Literal["text_finding"] = "text_finding"
    from_text: Literal[True] = True
    #: the rule's problem category (``LOOSENING``, ``INFECTION`` ...)
    problem: str
    #: the outcome codes the problem stands for
    codes: tuple[Coding, ...]
    #: when the text was written or is about (the note's date, else the resource's own date)
    date: datetime | None = None
    #: FHIRPath-like location of the text read (``DocumentReference.content[0].attachment``)
    element: str
    #: character span ``[start, end)`` of the problem's words in that text
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    #: reference keys of devices the resource itself names (a procedure's focal device)
    devices: tuple[str, ...] = ()


class ConsentFact(_Frozen):
    kind: Literal["consent"] = "consent"
    status: str
    #: True when this consent records a research opt-out (scope research, provision deny).
    research_opt_out: bool
    date: datetime | None = None
    #: Trials (ResearchStudy ids, or identifier values) an active research consent *permits*
    #: following the patient up for (``provision.data`` naming the ResearchStudy): empty for
    #: anything else. Read by :mod:`followup`.
    follow_up_trials: tuple[str, ...] = ()
    #: The provision's period (R4 ``provision.period``; R5 ``period`` or ``provision.period``).
    period_start: datetime | None = None
    period_end: datetime | None = None


Fact = Annotated[
    PatientFact
    | ConditionFact
    | ObservationFact
    | MedicationFact
    | ProcedureFact
    | DeviceExposureFact
    | AdverseEventFact
    | TextFindingFact
    | ConsentFact,
    Field(discriminator="kind"),
]

FACT_KINDS: tuple[str, ...] = (
    "patient",
    "condition",
    "observation",
    "medication",
    "procedure",
    "device_exposure",
    "adverse_event",
    "text_finding",
    "consent",
)


class ResourceFacts(_Frozen):
    """The facts of one version of one patient-scoped FHIR resource: the unit on the facts topic."""

    schema_: Literal["concierge.facts/1"] = Field(default="concierge.facts/1", alias="schema")
    #: Resource key: ``source|ResourceType|id``.
    key: str
    #: Patient pseudonym (keyed HMAC of source identifiers); also the Kafka message key.
    patient: str
    seq: int = Field(ge=1)
    retracted: bool = False
    provenance: Provenance
    facts: tuple[Fact, ...] = ()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_defaults=False).encode()


class OrganizationRecord(_Frozen):
    kind: Literal["organization"] = "organization"
    ods_code: str | None = None
    name: str | None = None
    region: str = "Unknown"
    type_codes: tuple[Coding, ...] = ()
    part_of: str | None = None
    active: bool = True


class PractitionerRecord(_Frozen):
    """A clinician. Clinicians' own names are professional, not patient, data."""

    kind: Literal["practitioner"] = "practitioner"
    name: str | None = None
    identifiers: tuple[str, ...] = ()
    email: str | None = None
    active: bool = True


class PractitionerRoleRecord(_Frozen):
    kind: Literal["practitioner_role"] = "practitioner_role"
    practitioner: str | None = None
    organization: str | None = None
    codes: tuple[Coding, ...] = ()
    #: Free-text role descriptions (``code[].text``), e.g. "Research nurse - clinical trial
    #: recruiter": roles that no code describes are often only said in words.
    texts: tuple[str, ...] = ()
    specialties: tuple[Coding, ...] = ()
    email: str | None = None
    active: bool = True


class DeviceRecord(_Frozen):
    kind: Literal["device"] = "device"
    description: DeviceDescription
    status: str | None = None
    #: Pseudonym of the patient the device is implanted in, if any.
    patient: str | None = None


Reference = Annotated[
    OrganizationRecord | PractitionerRecord | PractitionerRoleRecord | DeviceRecord,
    Field(discriminator="kind"),
]


class ReferenceRecord(_Frozen):
    """One version of a reference resource: the unit on the compacted reference topic."""

    schema_: Literal["concierge.reference/1"] = Field(
        default="concierge.reference/1", alias="schema"
    )
    key: str
    seq: int = Field(ge=1)
    retracted: bool = False
    provenance: Provenance
    record: Reference | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


RESOURCE_FACTS = TypeAdapter(ResourceFacts)
REFERENCE_RECORD = TypeAdapter(ReferenceRecord)


def decode_resource_facts(data: bytes | str) -> ResourceFacts:
    return RESOURCE_FACTS.validate_json(data)


def decode_reference(data: bytes | str) -> ReferenceRecord:
    return REFERENCE_RECORD.validate_json(data)


def patient_site(fact: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(ODS code, organisation key)`` of a patient fact given as a plain object: the one
    reading of a patient's site for every consumer (:func:`core.patient_view.patient_site`).
    Facts written before ``site_key`` existed hold the organisation's key in ``site`` when it
    was unknown at ingestion: that is a key, not an ODS code."""
    return _patient_site(fact)


def resource_key(source: str, resource_type: str, resource_id: str) -> str:
    return f"{source}|{resource_type}|{resource_id}"


BATCH_SCHEMA = "concierge.factbatch/1"


def envelopes_of(value: bytes | str) -> list[dict[str, object]]:
    """The envelopes in one facts-topic message, as plain objects (no validation).

    A message holds one ``ResourceFacts`` envelope, or a batch of one patient's envelopes
    (``{"schema": "concierge.factbatch/1", "patient": ..., "envelopes": [...]}``). Consumers
    downstream of the adapters read messages with this, so they accept both shapes.
    """
    import orjson

    document = orjson.loads(value)
    if isinstance(document, dict) and document.get("schema") == BATCH_SCHEMA:
        envelopes = document.get("envelopes")
        return list(envelopes) if isinstance(envelopes, list) else []
    return [document] if isinstance(document, dict) else []
