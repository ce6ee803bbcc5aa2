"""Property tests: malformed and mutated FHIR thrown at the Ingestor.

Real resources (from the Synthea samples, and hand-made ones for every supported type) are mutated
(keys deleted, values replaced with the wrong JSON type, random strings in dates and codes, garbage
nested, JSON text truncated or spliced with random bytes, huge strings) and fed to the Ingestor as
single documents, Bundles, Subscription notifications and NDJSON. Whatever comes in:

* no exception escapes;
* every resource gets exactly one outcome, and every outcome is one of the four;
* every dead letter carries an OperationOutcome with at least one issue, and the original payload;
* everything published re-decodes with the project's own decoders;
* nothing but an ``accepted`` outcome publishes, and re-sending a document never accepts again.

The ``ci`` profile (default) runs a small deterministic set; ``HYPOTHESIS_PROFILE=long`` runs
randomised and about forty times as many examples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.contracts.facts import decode_reference, decode_resource_facts
from fhir_adapters.pipeline import STATUSES, Ingestor, Outcome
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import MemorySink
from fhir_adapters.subscriptions import notification_of
from fhir_adapters.vault import MemoryVault
from tests.samples import synthea_r4

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
SAMPLES = synthea_r4()
MAX_BYTES = 50_000
#: Bundle types the adapter ingests; any other type is one dead letter for the whole Bundle.
BUNDLE_TYPES = (
    "collection",
    "transaction",
    "batch",
    "searchset",
    "history",
    "subscription-notification",
    "document",
    "message",
)


def fuzz(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples * 40 if LONG else examples,
        derandomize=not LONG,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- seeds ----------------------------------------------------------------------------------

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SUBJECT = {"reference": "Patient/pat1"}
CODE = {"coding": [{"system": SNOMED, "code": "44054006", "display": "Diabetes"}]}

WORLD: list[tuple[dict[str, Any], str | None]] = [
    (
        {
            "resourceType": "Organization",
            "id": "org1",
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "B86001"}
            ],
            "name": "Practice",
            "address": [{"postalCode": "LS2 9JT"}],
        },
        None,
    ),
    (
        {
            "resourceType": "Practitioner",
            "id": "pr1",
            "name": [{"given": ["Ann"], "family": "Smith"}],
        },
        None,
    ),
    (
        {
            "resourceType": "Patient",
            "id": "pat1",
            "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919"}],
            "name": [{"family": "Doe", "given": ["Jane"]}],
            "telecom": [{"system": "phone", "value": "0113 496 0000"}],
            "gender": "female",
            "birthDate": "1970-02-28",
            "address": [{"use": "home", "postalCode": "LS1 4AP"}],
            "managingOrganization": {"reference": "Organization/org1"},
            "generalPractitioner": [{"reference": "Practitioner/pr1"}],
        },
        None,
    ),
    (
        {
            "resourceType": "Device",
            "id": "dev1",
            "status": "active",
            "manufacturer": "Acme",
            "deviceName": [{"name": "Hip 3000", "type": "model-name"}],
            "lotNumber": "L1",
            "udiCarrier": [{"deviceIdentifier": "00844588003288"}],
            "patient": SUBJECT,
        },
        None,
    ),
    (
        {
            "resourceType": "Device",
            "id": "dev5",
            "status": "active",
            "modelNumber": "PW-9",
            "type": [{"text": "pump"}],
        },
        "R5",
    ),
]

HAND_MADE: list[tuple[dict[str, Any], str | None]] = [
    *WORLD,
    (
        {
            "resourceType": "Condition",
            "id": "c1",
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "verificationStatus": {"coding": [{"code": "confirmed"}]},
            "code": {
                "coding": [
                    {"system": SNOMED, "code": "44054006"},
                    {"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11"},
                ]
            },
            "subject": SUBJECT,
            "onsetDateTime": "2015-06-01T09:30:00+01:00",
            "recordedDate": "2015-06-02",
            "stage": [{"summary": CODE}],
        },
        None,
    ),
    (
        {
            "resourceType": "Observation",
            "id": "bp1",
            "status": "final",
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
            "subject": SUBJECT,
            "effectivePeriod": {"start": "2024-01-05T10:00:00Z", "end": "2024-01-05T10:05:00Z"},
            "interpretation": [{"coding": [{"code": "H"}]}],
            "component": [
                {
                    "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                    "valueQuantity": {"value": 152, "system": UCUM, "code": "mm[Hg]"},
                },
                {
                    "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                    "valueQuantity": {"value": 84.5, "unit": "mmHg"},
                    "interpretation": [{"coding": [{"code": "N"}]}],
                },
            ],
        },
        None,
    ),
    (
        {
            "resourceType": "Observation",
            "id": "smoke1",
            "status": "amended",
            "code": {"coding": [{"system": LOINC, "code": "72166-2"}]},
            "subject": {
                "reference": "Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919"
            },
            "effectiveInstant": "2023-11-11T11:11:11.111Z",
            "valueCodeableConcept": CODE,
        },
        None,
    ),
    (
        {
            "resourceType": "MedicationRequest",
            "id": "mr1",
            "contained": [{"resourceType": "Medication", "id": "m", "code": CODE}],
            "status": "active",
            "intent": "order",
            "medicationReference": {"reference": "#m"},
            "subject": SUBJECT,
            "authoredOn": "2024-01-10",
        },
        None,
    ),
    (
        {
            "resourceType": "MedicationStatement",
            "id": "ms4",
            "status": "completed",
            "medicationCodeableConcept": CODE,
            "subject": SUBJECT,
            "effectivePeriod": {"start": "2020-01-01", "end": "2020-06-30"},
        },
        None,
    ),
    (
        {
            "resourceType": "MedicationStatement",
            "id": "ms5",
            "status": "recorded",
            "medication": {"concept": CODE},
            "subject": SUBJECT,
            "effectiveDateTime": "2021-03-04",
        },
        "R5",
    ),
    (
        {
            "resourceType": "Procedure",
            "id": "p4",
            "status": "completed",
            "code": CODE,
            "subject": SUBJECT,
            "performedDateTime": "2019-09-09T08:00:00Z",
            "focalDevice": [{"manipulated": {"reference": "Device/dev1"}}],
        },
        None,
    ),
    (
        {
            "resourceType": "Procedure",
            "id": "p5",
            "status": "completed",
            "subject": SUBJECT,
            "occurrencePeriod": {"start": "2022-02-02T02:02:02Z"},
        },
        "R5",
    ),
    (
        {
            "resourceType": "DeviceUseStatement",
            "id": "dus1",
            "status": "active",
            "subject": SUBJECT,
            "device": {"reference": "Device/dev1"},
            "timingPeriod": {"start": "2019-09-09"},
        },
        None,
    ),
    (
        {
            "resourceType": "DeviceUsage",
            "id": "du5",
            "status": "active",
            "patient": SUBJECT,
            "device": {"reference": {"reference": "Device/dev5"}, "concept": CODE},
            "timingDateTime": "2023-05-05T05:05:05Z",
        },
        "R5",
    ),
    (
        {
            "resourceType": "AdverseEvent",
            "id": "ae4",
            "actuality": "actual",
            "event": CODE,
            "subject": SUBJECT,
            "date": "2024-04-04T04:04:04Z",
            "seriousness": CODE,
            "suspectEntity": [{"instance": {"reference": "Device/dev1"}}],
        },
        None,
    ),
    (
        {
            "resourceType": "AdverseEvent",
            "id": "ae5",
            "status": "completed",
            "actuality": "potential",
            "code": CODE,
            "subject": SUBJECT,
            "occurrenceDateTime": "2024-05-05",
            "suspectEntity": [
                {"instanceReference": {"reference": "Device/dev5"}},
                {"instanceCodeableConcept": CODE},
            ],
        },
        "R5",
    ),
    (
        {
            "resourceType": "Consent",
            "id": "cons4",
            "status": "active",
            "scope": {"coding": [{"code": "research"}]},
            "category": [CODE],
            "patient": SUBJECT,
            "dateTime": "2024-03-01T10:00:00Z",
            "provision": {"type": "deny", "purpose": [{"code": "HRESCH"}]},
        },
        None,
    ),
    (
        {
            "resourceType": "Consent",
            "id": "cons5",
            "status": "active",
            "subject": SUBJECT,
            "date": "2024-03-01",
            "decision": "deny",
            "provision": [{"purpose": [{"code": "HRESCH"}]}],
        },
        "R5",
    ),
    (
        {
            "resourceType": "PractitionerRole",
            "id": "role1",
            "practitioner": {"reference": "Practitioner/pr1"},
            "organization": {"reference": "Organization/org1"},
            "code": [CODE],
            "telecom": [{"system": "email", "value": "a@b.example"}],
        },
        None,
    ),
    ({"resourceType": "Encounter", "id": "e1", "status": "finished", "subject": SUBJECT}, None),
    ({"resourceType": "Claim", "id": "cl1", "patient": SUBJECT}, None),
]


@cache
def synthea() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Synthea Patients, a few Synthea resources of every type), references made resolvable."""
    patients: list[dict[str, Any]] = []
    seeds: list[dict[str, Any]] = []
    per_type: dict[str, int] = {}
    for path in sorted(SAMPLES.glob("*.json"))[1:4]:
        text = path.read_bytes()
        bundle = orjson.loads(text)
        # Outside their Bundle, urn:uuid references become literal ones (the ids are the uuids).
        for entry in bundle["entry"]:
            uuid = entry["fullUrl"].removeprefix("urn:uuid:")
            rtype = entry["resource"]["resourceType"]
            text = text.replace(f'"urn:uuid:{uuid}"'.encode(), f'"{rtype}/{uuid}"'.encode())
        for entry in orjson.loads(text)["entry"]:
            resource = entry["resource"]
            rtype = resource["resourceType"]
            if rtype == "Patient":
                patients.append(resource)
            elif per_type.get(rtype, 0) < 3:
                per_type[rtype] = per_type.get(rtype, 0) + 1
                seeds.append(resource)
    assert patients, f"no Synthea samples under {SAMPLES} (set CONCIERGE_FHIR_SAMPLES)"
    return patients, seeds


@cache
def synthea_bundles() -> list[bytes]:
    found = [path.read_bytes() for path in sorted(SAMPLES.glob("*.json"))[1:]]
    assert found, f"no Synthea samples under {SAMPLES} (set CONCIERGE_FHIR_SAMPLES)"
    return found


def all_seeds() -> list[tuple[dict[str, Any], str | None]]:
    patients, seeds = synthea()
    return HAND_MADE + [(r, None) for r in patients + seeds]


# --- the ingestor under test ------------------------------------------------------------------


def make_ingestor(validation_mode: str) -> Ingestor:
    ingestor = Ingestor(
        MemoryVault(),
        MemorySink(),
        Pseudonymiser(b"fuzz-key-" * 4),
        "urn:fuzz",
        validation_mode=validation_mode,  # type: ignore[arg-type]
        max_resource_bytes=MAX_BYTES,
    )
    for resource, version in WORLD:
        [outcome] = ingestor.ingest_text(orjson.dumps(resource), "world", version)  # type: ignore[arg-type]
        assert outcome.status == "accepted", outcome
    for resource in synthea()[0]:
        [outcome] = ingestor.ingest_text(orjson.dumps(resource), "world")
        assert outcome.status == "accepted", outcome
    return ingestor


def sink(ingestor: Ingestor) -> MemorySink:
    assert isinstance(ingestor.sink, MemorySink)
    return ingestor.sink


# --- strategies -------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
EDGE_STRINGS = [
    "",
    " ",
    "\n",
    "final\n",
    "a b",
    "a  b",
    "2023-02-29",
    "2024-02-29",
    "2024-13-01",
    "2024-01-01T10:00:00",
    "2024-01-01T10:00:60Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T10:00:00+14:00",
    "2024-01-01T10:00:00+14:01",
    "0000",
    "9999-12-31T23:59:59.999999999-13:59",
    "entered-in-error",
    "Patient/",
    "Patient/pat1/_history/1",
    "Patient/../../etc",
    "Patient?identifier=",
    "Patient?identifier=|",
    "Patient?name=x",
    "urn:uuid:",
    "#",
    "#missing",
    "Device/dev1",
    "Organization/org1",
    "http://unitsofmeasure.org",
    "\u0000",
    "\u202e",
    "🩺",
    "x" * 65,
]
FHIR_ISH_DATES = st.from_regex(
    r"[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,12})?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?",
    fullmatch=True,
)
nasty_strings = st.text(max_size=30) | st.sampled_from(EDGE_STRINGS) | FHIR_ISH_DATES
numbers = st.sampled_from([0, -0.0, 1e308, -1e308, 2**63 - 1, -(2**63), 2**64 - 1, 0.1, 10**18])
element_names = st.sampled_from(
    [
        "extension",
        "modifierExtension",
        "contained",
        "_birthDate",
        "resourceType",
        "id",
        "meta",
        "status",
        "subject",
        "patient",
        "valueQuantity",
        "valueCodeableConcept",
        "effectiveDateTime",
        "component",
        "coding",
        "reference",
        "identifier",
        "deceasedBoolean",
        "favouriteColour",
    ]
) | st.text(max_size=10)
RESOURCE_TYPES = st.sampled_from(
    [
        "Patient",
        "Observation",
        "Condition",
        "MedicationRequest",
        "MedicationStatement",
        "Procedure",
        "Device",
        "DeviceUseStatement",
        "DeviceUsage",
        "AdverseEvent",
        "Consent",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Bundle",
        "Encounter",
        "Coding",
        "Resource",
        "Fhirtypes",
        "patient",
        "",
        "Spaceship",
    ]
)
Path_ = tuple[str | int, ...]


#: Deepest document the mutator builds: past orjson's 254 and within Python's recursion limit.
MAX_DEPTH = 600


def locations(node: Any) -> list[Path_]:
    """Every location in a document (iteratively: documents may be nested hundreds deep)."""
    found: list[Path_] = []
    stack: list[tuple[Path_, Any]] = [((), node)]
    while stack:
        prefix, value = stack.pop()
        found.append(prefix)
        if isinstance(value, dict):
            stack.extend(((*prefix, name), item) for name, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*prefix, index), item) for index, item in enumerate(value))
    return found


def depth(node: Any) -> int:
    return max((len(path) for path in locations(node)), default=0)


def get_at(node: Any, path: Path_) -> Any:
    for step in path:
        node = node[step]
    return node


def set_at(root: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    get_at(root, path[:-1])[path[-1]] = value
    return root


def nest(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"x": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, document: Any, max_mutations: int = 4) -> Any:
    """A deep copy of ``document`` with up to ``max_mutations`` structural mutations."""
    doc = json.loads(to_text(document))  # a copy; deepcopy would overflow the stack
    for _ in range(draw(st.integers(min_value=0, max_value=max_mutations))):
        paths = locations(doc)
        path = draw(st.sampled_from(paths))
        operation = draw(
            st.sampled_from(
                [
                    "delete",
                    "wrong-type",
                    "string",
                    "nest",
                    "insert",
                    "huge",
                    "number",
                    "resource-type",
                    "empty",
                ]
            )
        )
        current = get_at(doc, path)
        if operation == "delete" and path:
            del get_at(doc, path[:-1])[path[-1]]
        elif operation == "wrong-type":
            doc = set_at(doc, path, draw(json_values))
        elif operation == "string":
            doc = set_at(doc, path, draw(nasty_strings))
        elif operation == "nest":
            levels = draw(st.sampled_from([1, 2, 3, 40, 253, 255, 300, 500]))
            if depth(doc) + levels <= MAX_DEPTH:
                doc = set_at(doc, path, nest(current, levels, draw(st.booleans())))
        elif operation == "insert":
            if isinstance(current, dict):
                current[draw(element_names)] = draw(json_values | nasty_strings)
            elif isinstance(current, list):
                current.insert(draw(st.integers(0, len(current))), draw(json_values))
        elif operation == "huge":
            doc = set_at(doc, path, "x" * draw(st.sampled_from([5_000, MAX_BYTES + 1])))
        elif operation == "number":
            doc = set_at(doc, path, draw(numbers))
        elif operation == "resource-type" and isinstance(doc, dict):
            doc["resourceType"] = draw(RESOURCE_TYPES)
        elif operation == "empty":
            doc = set_at(doc, path, draw(st.sampled_from([{}, [], "", None])))
    return doc


@st.composite
def text_of(draw: st.DrawFn, text: bytes) -> bytes:
    """JSON text, sometimes truncated or spliced with random bytes, or replaced by them."""
    how = draw(st.sampled_from(["as-is", "as-is", "as-is", "truncate", "splice", "replace"]))
    if how == "truncate":
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if how == "splice":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=16)) + text[at:]
    if how == "replace":
        return draw(st.binary(max_size=64))
    return text


def dumps_or_none(document: Any) -> bytes | None:
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return None


def to_text(document: Any) -> bytes:
    """JSON text of any document, even one nested deeper than orjson will write."""
    return dumps_or_none(document) or json.dumps(document, ensure_ascii=False).encode()


seed_index = st.integers(min_value=0, max_value=10_000)
fhir_versions = st.sampled_from([None, None, "R4", "R5"])
modes = st.sampled_from(["fast", "fast", "fast", "full"])


@st.composite
def single_documents(draw: st.DrawFn) -> tuple[bytes, str | None]:
    seeds = all_seeds()
    resource, version = seeds[draw(seed_index) % len(seeds)]
    text = draw(text_of(to_text(draw(mutated(resource)))))
    return text, draw(st.sampled_from([version, None, "R4", "R5"]))


def notification_header(draw: st.DrawFn, backport: bool) -> dict[str, Any]:
    event = draw(st.integers(min_value=0, max_value=20))
    if backport:
        resource: dict[str, Any] = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subscription", "valueReference": {"reference": "Subscription/s"}},
                {"name": "type", "valueCode": "event-notification"},
                {"name": "events-since-subscription-start", "valueString": str(event)},
                {
                    "name": "notification-event",
                    "part": [{"name": "event-number", "valueString": str(event)}],
                },
            ],
        }
    else:
        resource = {
            "resourceType": "SubscriptionStatus",
            "status": "active",
            "type": "event-notification",
            "subscription": {"reference": "Subscription/s"},
            "eventsSinceSubscriptionStart": str(event),
            "notificationEvent": [{"eventNumber": str(event)}],
        }
    return {
        "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000000",
        "resource": draw(mutated(resource, 3)),
    }


@st.composite
def bundles(draw: st.DrawFn) -> dict[str, Any]:
    seeds = all_seeds()
    entries: list[Any] = []
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        kind = draw(st.sampled_from(["resource", "resource", "resource", "delete", "garbage"]))
        if kind == "resource":
            resource, _ = seeds[draw(seed_index) % len(seeds)]
            resource = draw(mutated(resource, 2))
            entry: Any = {"resource": resource}
            if draw(st.booleans()) and isinstance(resource, dict):
                entry["fullUrl"] = draw(
                    st.sampled_from(
                        ["urn:uuid:", "urn:uuid:7a1b", f"urn:uuid:{resource.get('id')}"]
                    )
                )
                if draw(st.booleans()):
                    resource.pop("id", None)
        elif kind == "delete":
            entry = {
                "request": {
                    "method": "DELETE",
                    "url": draw(
                        st.sampled_from(
                            [
                                "Observation/bp1",
                                "Patient/pat1",
                                "Device/dev1",
                                "Organization/org1",
                                "Nope/1",
                                "Observation",
                                "Observation/bp1?x=1",
                            ]
                        )
                    ),
                }
            }
        else:
            entry = draw(json_values)
        entries.append(entry)
    btype = draw(st.sampled_from([*BUNDLE_TYPES, "transaction-response", "batch-response"]))
    if btype in ("history", "subscription-notification") and draw(st.booleans()):
        entries.insert(0, notification_header(draw, backport=btype == "history"))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": btype, "entry": entries}
    return draw(mutated(bundle, 1)) if draw(st.booleans()) else bundle


# --- the oracle -------------------------------------------------------------------------------


def expected_count(text: bytes) -> int:
    """How many outcomes a JSON document must produce: one per resource it holds."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return 1
    if not isinstance(document, dict) or dumps_or_none(document) is None:
        return 1
    if document.get("resourceType") != "Bundle":
        return 1
    entries = document.get("entry", [])
    if not isinstance(entries, list) or document.get("type") not in BUNDLE_TYPES:
        return 1
    return len(entries) - (1 if notification_of(document) is not None else 0)


class Check:
    """Snapshot the sink, run an ingest, then check every property of what came out."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        out = sink(ingestor)
        self.facts = len(out.published_facts)
        self.references = len(out.published_references)
        self.letters = len(out.dead_letters)
        self.total = ingestor.stats.total

    def published(self) -> int:
        out = sink(self.ingestor)
        return (
            len(out.published_facts) - self.facts + len(out.published_references) - self.references
        )

    def outcomes(self, outcomes: list[Outcome], expected: int) -> list[dict[str, Any]]:
        out = sink(self.ingestor)
        assert len(outcomes) == expected, [(o.status, o.reason) for o in outcomes]
        assert all(o.status in STATUSES for o in outcomes)
        assert self.ingestor.stats.total - self.total == len(outcomes)
        dead = [o for o in outcomes if o.status == "dead_lettered"]
        for outcome in dead:
            assert outcome.outcome is not None and outcome.outcome["issue"]
        letters = [orjson.loads(d.value) for d in out.dead_letters[self.letters :]]
        assert len(letters) == len(dead)
        for letter in letters:
            operation_outcome = letter["operation_outcome"]
            assert operation_outcome["resourceType"] == "OperationOutcome"
            assert len(operation_outcome["issue"]) >= 1
            for issue in operation_outcome["issue"]:
                assert issue["severity"] in ("fatal", "error", "warning", "information")
                assert isinstance(issue["code"], str) and issue["code"]
                assert isinstance(issue["diagnostics"], str)
            assert isinstance(letter["payload"], str)
        for envelope in out.published_facts[self.facts :]:
            assert decode_resource_facts(envelope.to_json()) == envelope
        for record in out.published_references[self.references :]:
            assert decode_reference(record.to_json()) == record
        accepted = sum(o.status == "accepted" for o in outcomes)
        assert self.published() >= accepted
        if accepted == 0:
            assert self.published() == 0
        return letters


# --- properties -------------------------------------------------------------------------------


@fuzz(80)
@given(document=single_documents(), mode=modes)
def test_mutated_resources(document: tuple[bytes, str | None], mode: str) -> None:
    text, version = document
    ingestor = make_ingestor(mode)
    check = Check(ingestor)
    outcomes = ingestor.ingest_text(text, "fuzz", version)  # type: ignore[arg-type]
    letters = check.outcomes(outcomes, expected_count(text))
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    if letters and letters[0]["payload_truncated"]:  # oversize: an excerpt, size and digest
        assert letters[0]["payload_sha256"] == hashlib.sha256(text).hexdigest()
    elif letters and (not isinstance(parsed, dict) or dumps_or_none(parsed) is None):
        assert letters[0]["payload"] == text.decode("utf-8", errors="replace")
    elif letters and parsed.get("resourceType") != "Bundle":
        assert orjson.loads(letters[0]["payload"]) == parsed
    elif letters:
        for letter in letters:
            orjson.loads(letter["payload"])
    # Sending the same document again never accepts anything new.
    if isinstance(parsed, dict) and parsed.get("resourceType") != "Bundle":
        again = Check(ingestor)
        repeat = ingestor.ingest_text(text, "fuzz", version)  # type: ignore[arg-type]
        again.outcomes(repeat, 1)
        [second] = repeat
        assert second.status != "accepted"
        assert (second.status == "dead_lettered") == (outcomes[0].status == "dead_lettered")


@fuzz(50)
@given(bundle=bundles(), version=fhir_versions, mode=modes)
def test_mutated_bundles(bundle: Any, version: str | None, mode: str) -> None:
    text = to_text(bundle)
    ingestor = make_ingestor(mode)
    check = Check(ingestor)
    outcomes = ingestor.ingest_text(text, "fuzz", version)  # type: ignore[arg-type]
    for letter in check.outcomes(outcomes, expected_count(text)):
        if dumps_or_none(orjson.loads(text)) is not None and not letter["payload_truncated"]:
            orjson.loads(letter["payload"])  # a whole Bundle, an entry or its resource, as JSON


@fuzz(15)
@given(index=seed_index, data=st.data())
def test_mutated_synthea_bundles(index: int, data: st.DataObject) -> None:
    original = synthea_bundles()[index % len(synthea_bundles())]
    bundle = orjson.loads(original)
    for _ in range(data.draw(st.integers(min_value=1, max_value=6))):
        entries = bundle["entry"]
        position = data.draw(st.integers(0, len(entries) - 1))
        entries[position] = data.draw(mutated(entries[position], 2))
    text = dumps_or_none(bundle) or original
    ingestor = make_ingestor("fast")
    check = Check(ingestor)
    check.outcomes(ingestor.ingest_text(text, "fuzz"), expected_count(text))


@fuzz(30)
@given(data=st.data(), version=fhir_versions)
def test_mutated_ndjson(data: st.DataObject, version: str | None) -> None:
    lines: list[bytes] = []
    expected = 0
    for _ in range(data.draw(st.integers(min_value=0, max_value=6))):
        kind = data.draw(st.sampled_from(["resource", "resource", "bundle", "blank", "bytes"]))
        if kind == "resource":
            line = data.draw(single_documents())[0]
        elif kind == "bundle":
            line = to_text(data.draw(bundles()))
        elif kind == "blank":
            line = data.draw(st.sampled_from([b"", b"   ", b"\t"]))
        else:
            line = data.draw(st.binary(max_size=40))
        line = line.replace(b"\n", b" ").replace(b"\r", b" ")
        stripped = line.strip()
        if stripped:
            expected += 1 if len(stripped) > MAX_BYTES else expected_count(stripped)
        lines.append(line + b"\n")
    ingestor = make_ingestor("fast")
    check = Check(ingestor)
    outcomes = list(ingestor.ingest_ndjson_lines(iter(lines), "fuzz.ndjson", version))  # type: ignore[arg-type]
    check.outcomes(outcomes, expected)


@fuzz(25)
@given(raw=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_random_bytes(raw: bytes) -> None:
    ingestor = make_ingestor("fast")
    check = Check(ingestor)
    letters = check.outcomes(ingestor.ingest_text(raw, "fuzz"), expected_count(raw))
    for letter in letters:
        assert letter["payload"] == raw.decode("utf-8", errors="replace") or orjson.loads(
            letter["payload"]
        )
