"""The one code normaliser: which code system a coding belongs to and how its codes compare.

Every package that matches codes (feasibility criteria, device classes and outcomes, the
patient view's match tokens) reads codes through this module, so a code means the same thing
everywhere (``docs/explanation/architecture.md``):

* **Systems.** Aliases (``snomed``, ``icd10``, ``loinc``, ``dmd``, ``opcs4``, ...) and the URIs
  seen in UK Core, NHS England, Synthea and our adapters resolve to one canonical system each
  (:func:`canonical_system` for criteria, :func:`system_of_data` for data). dm+d concept ids
  are SNOMED CT ids, so dm+d and SNOMED CT are one matching space.
* **Normalisation.** ICD-10 and OPCS-4 (:data:`CLASSIFICATIONS`) compare upper-case without
  dots or spaces (``E11.9`` = ``e119``, ``W37.1`` = ``W371``); other systems compare exactly
  (surrounding blanks dropped).
* **Tokens.** One string per (canonical system, normalised code), ``system|code``
  (:func:`token`): the unit of matching and indexing.
* **Prefix and range** matching for classifications: ``prefix E11`` covers ``E11`` and every
  code under it; ``range E10-E14`` every code whose leading characters, as long as the bounds,
  fall between the bounds inclusive (:func:`prefix_covers`, :func:`range_covers`).
"""

from __future__ import annotations

from functools import lru_cache

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
DMD = "https://dmd.nhs.uk"
#: OPCS-4 has no HL7-registered URI; the product uses this one throughout.
OPCS4 = "https://fhir.hl7.org.uk/Id/opcs-4"
AJCC = "http://cancerstaging.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

#: alias or URI (lower-cased) -> canonical matching system
SYSTEMS: dict[str, str] = {
    "snomed": SNOMED,
    "sct": SNOMED,
    "snomed-ct": SNOMED,
    "snomedct": SNOMED,
    SNOMED: SNOMED,
    "http://snomed.info/sct/83821000000107": SNOMED,  # UK edition module URI
    "dmd": SNOMED,
    "dm+d": SNOMED,
    DMD: SNOMED,
    "http://dmd.nhs.uk": SNOMED,
    "https://fhir.nhs.uk/id/dmd": SNOMED,
    "icd10": ICD10,
    "icd-10": ICD10,
    "icd10uk": ICD10,
    "icd-10-uk": ICD10,
    ICD10: ICD10,
    "http://hl7.org/fhir/sid/icd-10-uk": ICD10,
    "http://hl7.org/fhir/sid/icd-10-cm": ICD10,
    "loinc": LOINC,
    LOINC: LOINC,
    "opcs4": OPCS4,
    "opcs-4": OPCS4,
    "opcs": OPCS4,
    OPCS4.lower(): OPCS4,
    "https://fhir.nhs.uk/id/opcs-4": OPCS4,  # NHS England's URI (any case)
    "http://www.datadictionary.nhs.uk/opcs-4": OPCS4,
    "ajcc": AJCC,
    AJCC: AJCC,
    "interpretation": INTERPRETATION,
    INTERPRETATION.lower(): INTERPRETATION,
}

#: Systems whose codes are classification codes with optional dots (prefix/range allowed).
CLASSIFICATIONS = frozenset({ICD10, OPCS4})

#: ``(canonical system, normalised code)``
Code = tuple[str, str]


class UnknownSystem(ValueError):
    pass


def canonical_system(system: str) -> str:
    """The canonical system of an alias or URI written by a person (a criterion, a device
    class); other URIs stay as they are; an unknown bare word raises :class:`UnknownSystem`."""
    found = SYSTEMS.get(system.strip().lower())
    if found is not None:
        return found
    if "://" in system or system.startswith("urn:"):
        return system.strip()
    raise UnknownSystem(
        f"unknown code system {system!r}: use a URI or one of "
        "snomed, icd10, loinc, dmd, opcs4, ajcc"
    )


def system_of_data(system: str | None) -> str:
    """Canonical system of a coding found in the data (never raises; unknown systems stay as
    recorded)."""
    if not system:
        return ""
    return SYSTEMS.get(system.lower(), system)


def normalise_code(system: str, code: str) -> str:
    """The form codes of ``system`` (canonical) are compared in."""
    if system in CLASSIFICATIONS:
        return code.replace(".", "").replace(" ", "").upper()
    return code.strip()


@lru_cache(maxsize=262_144)
def code_of(system: str | None, code: str) -> Code:
    """A coding from the data as ``(canonical system, normalised code)``. Cached: the same few
    thousand codes recur across millions of facts."""
    canonical = system_of_data(system)
    return canonical, normalise_code(canonical, code)


@lru_cache(maxsize=262_144)
def token(system: str | None, code: str) -> str:
    """One string per (canonical system, normalised code): the unit of matching and indexing."""
    canonical, value = code_of(system, code)
    return f"{canonical}|{value}"


def term_code(system: str, code: str) -> Code:
    """A code written by a person (an alias or URI, maybe dotted) as ``(canonical system,
    normalised code)``."""
    canonical = canonical_system(system)
    return canonical, normalise_code(canonical, code)


def prefix_covers(prefix: str, value: str) -> bool:
    """Whether normalised ``value`` is ``prefix`` (normalised) or a code under it."""
    return value.startswith(prefix)


def range_covers(low: str, high: str, value: str) -> bool:
    """Whether normalised ``value``'s leading characters, as long as ``low``, fall in
    ``[low, high]`` (bounds normalised)."""
    return len(value) >= len(low) and low <= value[: len(low)] <= high


def range_bounds(system: str, text: str) -> tuple[str, str]:
    """``(low, high)`` of a range written ``"E10-E14"``, normalised for ``system``."""
    low, _, high = text.partition("-")
    return normalise_code(system, low), normalise_code(system, high)


__all__ = [
    "AJCC",
    "CLASSIFICATIONS",
    "DMD",
    "ICD10",
    "INTERPRETATION",
    "LOINC",
    "OPCS4",
    "SNOMED",
    "SYSTEMS",
    "Code",
    "UnknownSystem",
    "canonical_system",
    "code_of",
    "normalise_code",
    "prefix_covers",
    "range_bounds",
    "range_covers",
    "system_of_data",
    "term_code",
    "token",
]
