"""Device surveillance specs: a patient's facts in, exposures and outcomes out.

Codes go through the one code normaliser (:mod:`core.codes`), the same as feasibility's: an
OPCS-4 code written with a dot, under any of the URIs OPCS-4 is known by, is the same code for
device surveillance as for a feasibility criterion. (Found by a new user: device surveillance
missed a dotted OPCS-4 code under the NHS URI that feasibility matched.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from feasibility.criteria import parse_question
from feasibility.engines.reference import ReferenceEngine
from surveillance_stream.devices import contribution, exposures, outcomes

from .feasibility_helpers import AT, patient

HL7_OPCS4 = "https://fhir.hl7.org.uk/Id/opcs-4"
NHS_OPCS4 = "https://fhir.nhs.uk/Id/opcs-4"
DICTIONARY_OPCS4 = "http://www.datadictionary.nhs.uk/opcs-4"
P = "pat"
DEVICE = "urn:t|Device|d1"
IMPLANT = datetime(2023, 2, 10, 9, tzinfo=UTC)
REVISION = datetime(2023, 8, 1, 9, tzinfo=UTC)


def procedure(system: str, code: str, when: datetime, rid: str) -> tuple[str, dict[str, Any]]:
    key = f"urn:t|Procedure|{rid}"
    return key, {
        "seq": 1,
        "retracted": False,
        "facts": [
            {
                "kind": "procedure",
                "codes": [{"system": system, "code": code}],
                "status": "completed",
                "performed": when.isoformat(),
                "performed_end": None,
                "devices": [DEVICE],
            }
        ],
        "provenance": {"resource_type": "Procedure", "resource_id": rid, "version": "1"},
    }


def state(system: str, implant: str, revision: str | None) -> dict[str, dict[str, Any]]:
    entries = dict([procedure(system, implant, IMPLANT, "implant")])
    if revision is not None:
        entries.update([procedure(system, revision, REVISION, "revision")])
    entries["urn:t|Patient|p"] = {"seq": 1, "retracted": False, "facts": [patient()]}
    return entries


#: (case, system, implant code, revision code) — every row is a hip implanted, then revised
CASES = [
    ("product URI, dotted", HL7_OPCS4, "W37.1", "W37.3"),
    ("product URI, no dot", HL7_OPCS4, "W371", "W373"),
    ("NHS URI, dotted", NHS_OPCS4, "W37.1", "W37.3"),
    ("NHS URI, lower case, no dot", NHS_OPCS4, "w371", "w373"),
    ("NHS URI in other case", NHS_OPCS4.upper(), "W37.1", "W37.3"),
    ("data dictionary URI", DICTIONARY_OPCS4, "W37.1", "W37.3"),
    ("alias", "opcs4", "W37.1", "W37.3"),
]


@pytest.mark.parametrize(
    ("system", "implant", "revision"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_opcs4_codes_match_under_every_uri_and_with_dots(
    system: str, implant: str, revision: str
) -> None:
    entries = state(system, implant, revision)
    (exposure,) = exposures(P, entries)
    assert exposure.device_class == "hip"  # classified by the implant code
    assert exposure.start == IMPLANT
    assert exposure.end == REVISION  # ended by the revision code
    assert exposure.site == "RA1"
    names = {o.name for o in outcomes(P, entries, [exposure])}
    assert "hip revision within 1 year" in names
    assert any(k[2] == "hip revision within 1 year" for k in contribution(P, entries).keys)
    # ... and feasibility matches the same procedure with the same code
    question = parse_question(
        {"inclusion": [{"type": "procedure", "codes": [{"system": "opcs4", "code": "W37.1"}]}]}
    )
    population = {P: entries}
    assert ReferenceEngine().evaluate(question, population, AT)[P].steps == (True,)
