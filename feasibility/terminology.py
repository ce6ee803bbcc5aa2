"""The one mapping from coded terms in criteria to codes in the data.

Criteria name codes the way people write them (``{"system": "icd10", "prefix": "E11"}``,
``{"concept": "hba1c"}``); facts carry FHIR codings (system URI, code). Everything that
decides whether a coding in the data matches a term in a criterion lives here or in the one
code normaliser it re-exports (:mod:`core.codes`: systems, aliases, dots, tokens, prefix and
range rules, shared with device surveillance), so the engines agree by construction on what a
code means:

* **Systems.** Aliases (``snomed``, ``icd10``, ``loinc``, ``dmd``, ``opcs4``, ...) and the URIs
  seen in UK Core, Synthea and our adapters resolve to one canonical system each. dm+d concept
  ids are SNOMED CT ids, so dm+d and SNOMED CT are one matching space (UK Core codes medicines
  with ``http://snomed.info/sct``).
* **Normalisation.** ICD-10 and OPCS-4 codes compare upper-case without the dot
  (``E11.9`` = ``E119``); other systems compare exactly.
* **Prefix and range** matching for classifications (ICD-10, OPCS-4): ``prefix: "E11"`` matches
  ``E11`` and every code under it; ``range: "E10-E14"`` matches every code whose leading
  characters, as long as the bounds, fall between the bounds inclusive.
* **Concepts**: named code groups for measurements people ask about by name (HbA1c in either
  unit's LOINC code, eGFR by any equation, ...), and the molecular markers and cancer staging
  used by oncology criteria.
"""

from __future__ import annotations

from dataclasses import dataclass

# Systems, aliases, dots and tokens live in the one code normaliser; re-exported here for the
# feasibility engines and criteria.
from core.codes import (
    AJCC,
    CLASSIFICATIONS,
    DMD,
    ICD10,
    INTERPRETATION,
    LOINC,
    OPCS4,
    SNOMED,
    UnknownSystem,
    canonical_system,
    normalise_code,
    prefix_covers,
    range_bounds,
    range_covers,
    system_of_data,
    token,
)


@dataclass(frozen=True)
class Concept:
    """A named group of codes (and, for markers, the coded answers that mean each status)."""

    name: str
    display: str
    codes: tuple[tuple[str, str], ...]


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept(
            "hba1c",
            "Haemoglobin A1c",
            ((LOINC, "59261-8"), (LOINC, "4548-4"), (LOINC, "17856-6")),
        ),
        Concept(
            "egfr",
            "Estimated glomerular filtration rate",
            (
                (LOINC, "62238-1"),
                (LOINC, "33914-3"),
                (LOINC, "48642-3"),
                (LOINC, "48643-1"),
                (LOINC, "69405-9"),
                (LOINC, "98979-8"),
            ),
        ),
        Concept(
            "ldl_cholesterol",
            "LDL cholesterol",
            ((LOINC, "22748-8"), (LOINC, "18262-6"), (LOINC, "13457-7"), (LOINC, "2089-1")),
        ),
        Concept("total_cholesterol", "Total cholesterol", ((LOINC, "14647-2"), (LOINC, "2093-3"))),
        Concept("bmi", "Body mass index", ((LOINC, "39156-5"),)),
        Concept("bp_panel", "Blood pressure panel", ((LOINC, "85354-9"), (LOINC, "55284-4"))),
        Concept("systolic_bp", "Systolic blood pressure", ((LOINC, "8480-6"),)),
        Concept("diastolic_bp", "Diastolic blood pressure", ((LOINC, "8462-4"),)),
        Concept("stage_group", "Cancer stage group", ((LOINC, "21908-9"), (LOINC, "21902-2"))),
    )
}


@dataclass(frozen=True)
class Marker:
    """A molecular marker: the LOINC tests that report it and the answers for each status."""

    name: str
    tests: tuple[str, ...]
    #: status -> LOINC answer codes
    answers: dict[str, tuple[str, ...]]


_MUTATION: dict[str, tuple[str, ...]] = {"detected": ("LA9633-4",), "not_detected": ("LA9634-2",)}
_EXPRESSION: dict[str, tuple[str, ...]] = {
    "positive": ("LA6576-8",),
    "negative": ("LA6577-6",),
    "equivocal": ("LA11885-5",),
}

MARKERS: dict[str, Marker] = {
    m.name: m
    for m in (
        Marker("EGFR", ("21665-5", "41103-3", "55770-2"), _MUTATION),
        Marker("KRAS", ("21702-6", "53930-4", "55201-8"), _MUTATION),
        Marker("BRAF", ("53844-7", "58415-1"), _MUTATION),
        Marker("ALK", ("46264-8", "78205-7"), _MUTATION),
        Marker("HER2", ("48676-1", "18474-7", "31150-6"), _EXPRESSION),
    )
}

#: AJCC stage groups in order, for prefix matching ("III" covers IIIA, IIIB, IIIC).
STAGES = ("0", "I", "IA", "IB", "II", "IIA", "IIB", "III", "IIIA", "IIIB", "IIIC", "IV", "IVA",
          "IVB")  # fmt: skip


def stage_matches(wanted: str, found: str) -> bool:
    """A recorded stage group matches a wanted one exactly or as a sub-stage of it."""
    w = wanted.strip().upper().removeprefix("STAGE ").strip()
    f = found.strip().upper().removeprefix("STAGE ").strip()
    if f == w:
        return True
    # "III" covers "IIIA" but "I" must not cover "II" or "IV": the rest must be a letter suffix
    return f.startswith(w) and f[len(w) :].isalpha() and not f[len(w) :].startswith(("I", "V"))


__all__ = [
    "AJCC",
    "CLASSIFICATIONS",
    "CONCEPTS",
    "DMD",
    "ICD10",
    "INTERPRETATION",
    "LOINC",
    "MARKERS",
    "OPCS4",
    "SNOMED",
    "STAGES",
    "Concept",
    "Marker",
    "UnknownSystem",
    "canonical_system",
    "normalise_code",
    "prefix_covers",
    "range_bounds",
    "range_covers",
    "stage_matches",
    "system_of_data",
    "token",
]
