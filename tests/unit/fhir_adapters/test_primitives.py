"""Checked reading of FHIR primitives: every rule the fast path relies on, case by case."""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime
from typing import Any

import pytest

from core.contracts.facts import Coding
from fhir_adapters.primitives import (
    InvalidElement,
    get_bool,
    get_code,
    get_codeable_concept,
    get_date,
    get_datetime,
    get_decimal,
    get_id,
    get_list,
    get_object,
    get_string,
    get_uri,
    parse_date,
    parse_datetime,
    parse_instant,
    read_coding,
    read_identifier_token,
    read_period,
    read_quantity,
    read_reference,
)

UCUM = "http://unitsofmeasure.org"


def invalid(expression: str | None = None) -> Any:
    """Expect an InvalidElement, optionally naming exactly ``expression``."""
    return pytest.raises(
        InvalidElement, match=None if expression is None else f"^{re.escape(expression)}:"
    )


# --- date ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024", date(2024, 1, 1)),
        ("2024-07", date(2024, 7, 1)),
        ("2024-07-15", date(2024, 7, 15)),
        ("2024-02-29", date(2024, 2, 29)),
        ("2000-02-29", date(2000, 2, 29)),  # divisible by 400: a leap year
        ("0001-01-01", date(1, 1, 1)),
    ],
)
def test_date_valid(text: str, expected: date) -> None:
    assert parse_date(text, "Patient.birthDate") == expected


@pytest.mark.parametrize(
    "text",
    [
        "2023-02-29",  # not a leap year
        "1900-02-29",  # divisible by 100, not by 400
        "2024-04-31",
        "2024-13",
        "2024-00-10",
        "2024-1-5",
        "24",
        "2024-07-15T10:00:00Z",  # a dateTime is not a date
        "2024/07/15",
        " 2024-07-15",
        "2024-07-15 ",
        "2024-07-15\n",  # '$' would let a trailing newline through
        "",
        "0000",  # year 0 does not exist in Python's calendar
    ],
)
def test_date_invalid(text: str) -> None:
    with invalid("Patient.birthDate"):
        parse_date(text, "Patient.birthDate")


@pytest.mark.parametrize("value", [20240715, 2024.0, None, True, ["2024"], {"value": "2024"}])
def test_date_wrong_json_type(value: object) -> None:
    with invalid("Patient.birthDate") as info:
        parse_date(value, "Patient.birthDate")
    assert "expected a date string" in info.value.message


def test_get_date_absent_is_none_and_expression_is_built() -> None:
    assert get_date({}, "birthDate", "Patient") is None
    with invalid("Patient.birthDate"):
        get_date({"birthDate": "2023-02-29"}, "birthDate", "Patient")


def test_calendar_error_names_the_element() -> None:
    with invalid("Condition.onsetDateTime") as info:
        parse_datetime("2023-02-29", "Condition.onsetDateTime")
    assert info.value.expression == "Condition.onsetDateTime"
    assert "not a calendar date" in info.value.message


# --- dateTime --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-02", datetime(2024, 2, 1, tzinfo=UTC)),
        ("2024-02-29", datetime(2024, 2, 29, tzinfo=UTC)),
        ("2024-02-29T12:30:00Z", datetime(2024, 2, 29, 12, 30, tzinfo=UTC)),
        ("2024-06-01T00:30:00+01:00", datetime(2024, 5, 31, 23, 30, tzinfo=UTC)),
        ("2024-06-01T23:30:00-05:30", datetime(2024, 6, 2, 5, 0, tzinfo=UTC)),
        ("2024-12-31T23:00:00+14:00", datetime(2024, 12, 31, 9, 0, tzinfo=UTC)),
        ("2024-01-01T00:00:00-13:59", datetime(2024, 1, 1, 13, 59, tzinfo=UTC)),
        ("2024-01-01T00:00:00.5Z", datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2024-01-01T00:00:00.123456789Z", datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        ("2024-01-01T00:00:00+00:00", datetime(2024, 1, 1, tzinfo=UTC)),
    ],
)
def test_datetime_valid_and_in_utc(text: str, expected: datetime) -> None:
    parsed = parse_datetime(text, "Observation.effectiveDateTime")
    assert parsed == expected
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0


def test_datetime_offset_crossing_a_leap_day() -> None:
    parsed = parse_datetime("2024-03-01T01:00:00+02:00", "X")
    assert parsed == datetime(2024, 2, 29, 23, 0, tzinfo=UTC)


def test_datetime_sixty_seconds_is_accepted_within_its_minute() -> None:
    # A leap second: valid FHIR. Python has no second 60; it must not be rejected nor shift the day.
    parsed = parse_datetime("2016-12-31T23:59:60Z", "Observation.effectiveDateTime")
    assert parsed.date() == date(2016, 12, 31)
    assert (parsed.hour, parsed.minute) == (23, 59)
    instant = parse_instant("2016-12-31T23:59:60.5Z", "Observation.issued")
    assert instant.date() == date(2016, 12, 31)


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-01T10:00:00",  # a time needs a zone
        "2024-01-01T10:00Z",  # seconds are required
        "2024-01-01T24:00:00Z",
        "2024-01-01T10:60:00Z",
        "2024-01-01T10:00:61Z",
        "2024-01-01T10:00:00+15:00",
        "2024-01-01T10:00:00+14:30",
        "2024-01-01T10:00:00+0100",
        "2024-01-01T10:00:00.Z",
        "2024-01-01T10:00:00.1234567890Z",
        "2024-01-01 10:00:00Z",
        "2024-01T10:00:00Z",
        "2023-02-29T10:00:00Z",
        "2024-02-30",
        "2024-01-01T10:00:00Z\n",
        "yesterday",
        "",
    ],
)
def test_datetime_invalid(text: str) -> None:
    with invalid("Observation.effectiveDateTime"):
        parse_datetime(text, "Observation.effectiveDateTime")


def test_time_without_zone_is_rejected_by_get_datetime() -> None:
    with invalid("Condition.onsetDateTime"):
        get_datetime({"onsetDateTime": "2024-03-04T08:15:00"}, "onsetDateTime", "Condition")


@pytest.mark.parametrize("value", [1700000000, 1.5, True, [], {}])
def test_datetime_wrong_json_type(value: object) -> None:
    with invalid("X.when"):
        parse_datetime(value, "X.when")


# --- instant ---------------------------------------------------------------------------------


def test_instant_valid() -> None:
    assert parse_instant("2024-05-06T07:08:09.123+02:00", "Resource.meta.lastUpdated") == (
        datetime(2024, 5, 6, 5, 8, 9, 123000, tzinfo=UTC)
    )


@pytest.mark.parametrize(
    "value",
    [
        "2024-05-06",  # instants are never partial
        "2024-05",
        "2024",
        "2024-05-06T07:08:09",  # nor without a zone
        "2023-02-29T00:00:00Z",  # a real calendar date
        "2024-05-06T07:08Z",
        "2024-05-06T07:08:09Z\n",
        12345,
        None,
    ],
)
def test_instant_invalid(value: object) -> None:
    with invalid("Resource.meta.lastUpdated"):
        parse_instant(value, "Resource.meta.lastUpdated")


# --- decimals, booleans, strings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0.0), (7, 7.0), (-1.25, -1.25), (1e300, 1e300)]
)
def test_decimal_valid(value: object, expected: float) -> None:
    assert get_decimal({"value": value}, "value", "Quantity") == expected


@pytest.mark.parametrize("value", [True, False, "1.5", "NaN", [1], {"value": 1}])
def test_decimal_wrong_json_type(value: object) -> None:
    with invalid("Quantity.value") as info:
        get_decimal({"value": value}, "value", "Quantity")
    assert "expected a JSON number" in info.value.message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_decimal_not_finite(value: float) -> None:
    with invalid("Quantity.value") as info:
        get_decimal({"value": value}, "value", "Quantity")
    assert "finite" in info.value.message


def test_decimal_integer_too_large_for_a_float_is_invalid_not_a_crash() -> None:
    with invalid("Quantity.value"):
        get_decimal({"value": 10**400}, "value", "Quantity")


def test_decimal_absent() -> None:
    assert get_decimal({}, "value", "Quantity") is None
    assert get_decimal({"value": None}, "value", "Quantity") is None


@pytest.mark.parametrize("value", ["true", 1, 0, None])
def test_bool(value: object) -> None:
    if value is None:
        assert get_bool({"active": None}, "active", "Patient") is None
        return
    with invalid("Patient.active"):
        get_bool({"active": value}, "active", "Patient")


def test_bool_valid() -> None:
    assert get_bool({"active": False}, "active", "Patient") is False
    assert get_bool({"active": True}, "active", "Patient") is True


@pytest.mark.parametrize("value", ["", "   ", "\n\t", 5, ["a"], {"a": 1}])
def test_string_invalid(value: object) -> None:
    with invalid("Organization.name"):
        get_string({"name": value}, "name", "Organization")


def test_string_valid_keeps_value() -> None:
    assert get_string({"name": " Leeds GP "}, "name", "Organization") == " Leeds GP "


def test_object_and_list_types() -> None:
    assert get_object({}, "meta", "Patient") is None
    assert get_list({}, "identifier", "Patient") == []
    with invalid("Patient.meta"):
        get_object({"meta": []}, "meta", "Patient")
    with invalid("Patient.identifier"):
        get_list({"identifier": {"value": "x"}}, "identifier", "Patient")


# --- codes, ids, uris ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["final", "entered-in-error", "a b", "<=", "ü"])
def test_code_valid(value: str) -> None:
    assert get_code({"status": value}, "status", "Observation") == value


@pytest.mark.parametrize(
    "value", ["", " final", "final ", "a  b", "a\tb", "line\nbreak", "final\n", 1, True, ["final"]]
)
def test_code_invalid(value: object) -> None:
    with invalid("Observation.status"):
        get_code({"status": value}, "status", "Observation")


def test_code_required_binding() -> None:
    allowed = frozenset({"final", "amended"})
    assert get_code({"status": "final"}, "status", "Observation", allowed) == "final"
    with invalid("Observation.status") as info:
        get_code({"status": "Final"}, "status", "Observation", allowed)
    assert "value set" in info.value.message


@pytest.mark.parametrize(
    "value", ["a", "A-1.b", "x" * 64, "123", "4c0f6b6e-6a5a-4b5e-9b6e-1f1f1f1f1f1f"]
)
def test_id_valid(value: str) -> None:
    assert get_id({"id": value}, "id", "Patient") == value


@pytest.mark.parametrize("value", ["", "x" * 65, "a_b", "a/b", "a b", "a|b", "é", "a\n", 123])
def test_id_invalid(value: object) -> None:
    with invalid("Patient.id"):
        get_id({"id": value}, "id", "Patient")


@pytest.mark.parametrize(
    "value", ["http://snomed.info/sct", "urn:oid:2.16.840.1.113883.6.1", "urn:uuid:1", "x"]
)
def test_uri_valid(value: str) -> None:
    assert get_uri({"system": value}, "system", "Coding") == value


@pytest.mark.parametrize("value", ["", "http://a b", " http://x", "http://x\n", 5, {}])
def test_uri_invalid(value: object) -> None:
    with invalid("Coding.system"):
        get_uri({"system": value}, "system", "Coding")


def test_coding_and_concept() -> None:
    coding = read_coding(
        {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}, "C.code"
    )
    assert coding == Coding(system="http://snomed.info/sct", code="44054006", display="Diabetes")
    # A coding without a code carries nothing to extract.
    assert read_coding({"system": "http://snomed.info/sct", "display": "x"}, "C") is None
    with invalid("Condition.code.coding[1].code"):
        get_codeable_concept(
            {"code": {"coding": [{"system": "http://a", "code": "1"}, {"code": " bad"}]}},
            "code",
            "Condition",
        )
    with invalid("Condition.code"):
        get_codeable_concept({"code": [{"text": "x"}]}, "code", "Condition")
    assert get_codeable_concept({"code": {"text": "only text"}}, "code", "Condition") == ()


def test_reference_and_identifier() -> None:
    assert read_reference({"reference": "Patient/1"}, "Observation.subject") == "Patient/1"
    assert read_reference({"identifier": {"value": "1"}}, "Observation.subject") is None
    with invalid("Observation.subject.reference"):
        read_reference({"reference": "Patient/1 2"}, "Observation.subject")
    with invalid("Observation.subject"):
        read_reference("Patient/1", "Observation.subject")
    assert read_identifier_token({"system": "urn:s", "value": " 42 "}, "I") == "urn:s|42"
    assert read_identifier_token({"value": "42"}, "I") == "|42"
    assert read_identifier_token({"system": "urn:s"}, "I") is None


def test_period() -> None:
    start, end = read_period({"start": "2024-01-01", "end": "2024-01-02T00:00:00Z"}, "P")
    assert start == datetime(2024, 1, 1, tzinfo=UTC)
    assert end == datetime(2024, 1, 2, tzinfo=UTC)
    with invalid("Procedure.performedPeriod") as info:
        read_period({"start": "2024-02-01", "end": "2024-01-01"}, "Procedure.performedPeriod")
    assert "before its start" in info.value.message
    with invalid("Procedure.performedPeriod.end"):
        read_period({"end": "2024-01-01T10:00"}, "Procedure.performedPeriod")


# --- Quantity ---------------------------------------------------------------------------------


def test_quantity_ucum_code_wins_over_human_unit() -> None:
    value, unit = read_quantity(
        {"value": 5.4, "unit": "millimole per litre", "system": UCUM, "code": "mmol/L"}, "Q"
    )
    assert (value, unit) == (5.4, "mmol/L")


def test_quantity_non_ucum_system_keeps_human_unit() -> None:
    value, unit = read_quantity(
        {"value": 2, "unit": "tablet", "system": "http://snomed.info/sct", "code": "428673006"}, "Q"
    )
    assert (value, unit) == (2.0, "tablet")


def test_quantity_without_code_uses_unit_text() -> None:
    assert read_quantity({"value": 1, "unit": "mg"}, "Q") == (1.0, "mg")
    assert read_quantity({"value": 1}, "Q") == (1.0, None)
    assert read_quantity({"unit": "mg", "system": UCUM, "code": "mg"}, "Q") == (None, "mg")


def test_quantity_qty3_code_requires_system() -> None:
    with invalid("Observation.valueQuantity") as info:
        read_quantity({"value": 1, "code": "mg"}, "Observation.valueQuantity")
    assert "qty-3" in info.value.message


@pytest.mark.parametrize(
    ("quantity", "expression"),
    [
        ({"value": "5"}, "Observation.valueQuantity.value"),
        ({"value": True}, "Observation.valueQuantity.value"),
        ({"value": 1, "comparator": "=="}, "Observation.valueQuantity.comparator"),
        ({"value": 1, "system": UCUM, "code": "mm Hg "}, "Observation.valueQuantity.code"),
        ({"value": 1, "system": "not a uri", "code": "x"}, "Observation.valueQuantity.system"),
        ({"value": 1, "unit": ""}, "Observation.valueQuantity.unit"),
    ],
)
def test_quantity_invalid_elements(quantity: dict[str, object], expression: str) -> None:
    with invalid(expression):
        read_quantity(quantity, "Observation.valueQuantity")


@pytest.mark.parametrize("value", [5, "5 mg", [], None])
def test_quantity_must_be_an_object(value: object) -> None:
    with invalid("Observation.valueQuantity"):
        read_quantity(value, "Observation.valueQuantity")


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_quantity_comparators(comparator: str) -> None:
    assert read_quantity({"value": 3, "comparator": comparator}, "Q") == (3.0, None)
