"""Reading a definitional FHIR R5 ``Group`` as criteria.

A definitional Group (``membership: definitional``) describes a cohort by ``characteristic``s,
each a ``code`` (what is characterised), a ``value[x]`` and ``exclude``. This reader maps the
characteristics people use for eligibility onto the criteria model, one funnel step each
(``exclude: true`` makes an exclusion step), and refuses anything else with a clear error rather
than guessing:

* ``code`` SNOMED 439401001 *Diagnosis* (or LOINC 29308-4), CodeableConcept value: condition;
* SNOMED 410942007 *Drug or medicament* (or 763158003), CodeableConcept: medication;
* SNOMED 71388002 *Procedure*, CodeableConcept: procedure;
* SNOMED 397669002 *Age*, Range or Quantity in years (UCUM ``a``): age;
* SNOMED 263495000 *Gender*, CodeableConcept (male/female/other): sex;
* any LOINC observation code, Quantity (with comparator) or Range: the latest value in that
  unit; with a CodeableConcept: the latest coded result (e.g. a marker's answer).

The Group is validated with fhir.resources (R5) first, so malformed FHIR gets FHIR's own errors.
R5 Groups combine characteristics with AND, which is what inclusion-AND-NOT-exclusion means.
Absolute ``period``s are not supported (criteria windows are relative to the index date).
"""

from __future__ import annotations

from typing import Any

from .criteria import Question, parse_question
from .terminology import LOINC, SNOMED, canonical_system

DIAGNOSIS = {(SNOMED, "439401001"), (LOINC, "29308-4")}
MEDICATION = {(SNOMED, "410942007"), (SNOMED, "763158003")}
PROCEDURE = {(SNOMED, "71388002")}
AGE = {(SNOMED, "397669002")}
GENDER = {(SNOMED, "263495000"), ("http://hl7.org/fhir/administrative-gender", "gender")}
_COMPARATORS = {">": "gt", ">=": "ge", "<": "lt", "<=": "le"}


class GroupError(ValueError):
    pass


def _codings(concept: dict[str, Any] | None) -> list[tuple[str, str]]:
    out = []
    for coding in (concept or {}).get("coding") or ():
        system, code = coding.get("system"), coding.get("code")
        if system and code:
            try:
                out.append((canonical_system(system), code))
            except ValueError:
                out.append((system, code))
    return out


def _codes(concept: dict[str, Any], where: str) -> list[dict[str, str]]:
    codes = [{"system": s, "code": c} for s, c in _codings(concept)]
    if not codes:
        raise GroupError(f"{where}: valueCodeableConcept has no coding with system and code")
    return codes


def _value_test(characteristic: dict[str, Any], where: str) -> dict[str, Any]:
    if "valueQuantity" in characteristic:
        quantity = characteristic["valueQuantity"]
        bound = _COMPARATORS.get(quantity.get("comparator", ""), "eq")
        return {bound: quantity["value"], "unit": quantity.get("code") or quantity.get("unit")}
    if "valueRange" in characteristic:
        low = characteristic["valueRange"].get("low") or {}
        high = characteristic["valueRange"].get("high") or {}
        test: dict[str, Any] = {"unit": low.get("code") or high.get("code")}
        if "value" in low:
            test["ge"] = low["value"]
        if "value" in high:
            test["le"] = high["value"]
        return test
    raise GroupError(f"{where}: a measurement needs valueQuantity or valueRange")


def characteristic_criterion(characteristic: dict[str, Any], where: str) -> dict[str, Any]:
    if characteristic.get("period"):
        raise GroupError(f"{where}: absolute periods are not supported; use relative windows")
    code = set(_codings(characteristic.get("code")))
    label = (characteristic.get("code") or {}).get("text")
    base: dict[str, Any] = {"label": label} if label else {}
    if code & DIAGNOSIS:
        concept = characteristic.get("valueCodeableConcept") or {}
        return {**base, "type": "condition", "codes": _codes(concept, where)}
    if code & MEDICATION:
        concept = characteristic.get("valueCodeableConcept") or {}
        return {**base, "type": "medication", "codes": _codes(concept, where)}
    if code & PROCEDURE:
        concept = characteristic.get("valueCodeableConcept") or {}
        return {**base, "type": "procedure", "codes": _codes(concept, where)}
    if code & AGE:
        test = _value_test(characteristic, where)
        if test.get("unit") not in (None, "a", "yr", "year", "years"):
            raise GroupError(f"{where}: age must be in years (UCUM 'a'), not {test['unit']!r}")
        if "eq" in test:
            return {**base, "type": "age", "min": int(test["eq"]), "max": int(test["eq"])}
        low = test.get("ge", test.get("gt"))
        high = test.get("le", test.get("lt"))
        age: dict[str, Any] = {**base, "type": "age"}
        if low is not None:
            age["min"] = int(low) + (1 if "gt" in test else 0)
        if high is not None:
            age["max"] = int(high) - (1 if "lt" in test else 0)
        return age
    if code & GENDER:
        values = [c for _, c in _codings(characteristic.get("valueCodeableConcept"))]
        if not values:
            raise GroupError(f"{where}: gender needs a valueCodeableConcept")
        return {**base, "type": "sex", "values": values}
    loinc = [c for s, c in code if s == LOINC]
    if loinc:
        observation: dict[str, Any] = {
            **base,
            "type": "observation",
            "codes": [{"system": "loinc", "code": c} for c in loinc],
        }
        if "valueCodeableConcept" in characteristic:
            observation["value_codes"] = _codes(characteristic["valueCodeableConcept"], where)
        else:
            observation["value"] = _value_test(characteristic, where)
        return observation
    raise GroupError(
        f"{where}: characteristic code {sorted(code) or 'missing'} is not one this reader maps "
        "(diagnosis, medication, procedure, age, gender, or a LOINC observation)"
    )


def question_from_group(group: dict[str, Any]) -> Question:
    """Criteria from a definitional R5 Group; raises :class:`GroupError` or FHIR's errors."""
    if group.get("resourceType") != "Group":
        raise GroupError("not a Group resource")
    from fhir.resources.group import Group  # R5: fhir.resources' top-level models

    try:
        Group.model_validate(group)
    except ValueError as exc:
        raise GroupError(f"invalid FHIR R5 Group: {exc}") from None
    if group.get("membership") != "definitional":
        raise GroupError("only definitional Groups (membership: definitional) describe criteria")
    inclusion: list[dict[str, Any]] = []
    exclusion: list[dict[str, Any]] = []
    for i, characteristic in enumerate(group.get("characteristic") or ()):
        criterion = characteristic_criterion(characteristic, f"Group.characteristic[{i}]")
        (exclusion if characteristic.get("exclude") else inclusion).append(criterion)
    if not inclusion:
        raise GroupError("the Group has no inclusion characteristic (exclude: false)")
    return parse_question(
        {"title": group.get("name") or group.get("title"), "inclusion": inclusion,
         "exclusion": exclusion}
    )  # fmt: skip


__all__ = ["GroupError", "characteristic_criterion", "question_from_group"]
