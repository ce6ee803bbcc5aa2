"""Checked reading of FHIR primitives and datatypes at the edge.

The fast validation path reads every element the product extracts through these functions. Each
checks the element against the FHIR specification's rules for its datatype (the regular
expressions of the specification, real calendar dates, JSON types) and raises
:class:`InvalidElement` naming the element by its FHIRPath expression, so a dead-letter reason is
as precise as a full model validation would give.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from core.contracts.facts import Coding


class InvalidElement(ValueError):
    """An element the product reads is not valid FHIR."""

    def __init__(self, expression: str, message: str) -> None:
        super().__init__(f"{expression}: {message}")
        self.expression = expression
        self.message = message


ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}\Z")
#: What an id may not be although the pattern allows it: path segments that mean "this" and
#: "parent" in every URL (``Patient/..`` is not a resource, and must not become a path).
DOT_SEGMENTS = frozenset({".", ".."})


def is_id(value: object) -> bool:
    """Whether ``value`` is a FHIR id (1 to 64 of A-Z a-z 0-9 - .) that is not ``.`` or
    ``..``; ids are used in URLs (``Location``, references), so a dot segment is refused."""
    return isinstance(value, str) and bool(ID_RE.match(value)) and value not in DOT_SEGMENTS


def id_problem(value: object) -> str:
    """Why ``value`` is not an id (for an OperationOutcome), or ``""`` if it is one."""
    if is_id(value):
        return ""
    shown = repr(value) if not isinstance(value, str) else repr(value[:80])
    if isinstance(value, str) and value in DOT_SEGMENTS:
        return f"invalid id {shown}: '.' and '..' are path segments, not ids"
    return f"invalid id {shown} (1-64 of A-Z a-z 0-9 - .)"


#: FHIR strings SHOULD NOT carry control characters, and the stores (PostgreSQL: the vault, the
#: recruitment database the facts reach) cannot keep U+0000: it is refused in every string read,
#: so the resource is dead-lettered with the reason instead of failing the batch.
NUL_MESSAGE = "contains U+0000 (NUL), which FHIR strings should not and the stores cannot carry"


def no_nul(value: str, expression: str) -> str:
    if "\x00" in value:
        raise InvalidElement(expression, NUL_MESSAGE)
    return value


CODE_RE = re.compile(r"^[^\s]+( [^\s]+)*\Z")
URI_RE = re.compile(r"^\S*\Z")
DATE_RE = re.compile(r"^(?P<y>[0-9]{4})(-(?P<m>0[1-9]|1[0-2])(-(?P<d>0[1-9]|[12][0-9]|3[01]))?)?\Z")
DATETIME_RE = re.compile(
    r"^(?P<y>[0-9]{4})(-(?P<m>0[1-9]|1[0-2])(-(?P<d>0[1-9]|[12][0-9]|3[01])"
    r"(T(?P<H>[01][0-9]|2[0-3]):(?P<M>[0-5][0-9]):(?P<S>[0-5][0-9]|60)(?P<f>\.[0-9]{1,9})?"
    r"(?P<tz>Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?\Z"
)
INSTANT_RE = re.compile(
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:"
    r"([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))\Z"
)


def _type_name(value: object) -> str:
    return type(value).__name__


def get_object(parent: Mapping[str, Any], name: str, path: str) -> Mapping[str, Any] | None:
    value = parent.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidElement(f"{path}.{name}", f"expected an object, got {_type_name(value)}")
    return value


def get_list(parent: Mapping[str, Any], name: str, path: str) -> list[Any]:
    value = parent.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidElement(f"{path}.{name}", f"expected an array, got {_type_name(value)}")
    return value


def get_string(parent: Mapping[str, Any], name: str, path: str) -> str | None:
    value = parent.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidElement(f"{path}.{name}", f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise InvalidElement(f"{path}.{name}", "string must not be empty or only whitespace")
    return no_nul(value, f"{path}.{name}")


def get_code(
    parent: Mapping[str, Any], name: str, path: str, allowed: frozenset[str] | None = None
) -> str | None:
    value = parent.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not CODE_RE.match(no_nul(value, f"{path}.{name}")):
        raise InvalidElement(f"{path}.{name}", f"invalid code {value!r}")
    if allowed is not None and value not in allowed:
        raise InvalidElement(
            f"{path}.{name}",
            f"code {value!r} is not in the required value set ({', '.join(sorted(allowed))})",
        )
    return value


def get_uri(parent: Mapping[str, Any], name: str, path: str) -> str | None:
    value = parent.get(name)
    if value is None:
        return None
    where = f"{path}.{name}"
    if not isinstance(value, str) or not value or not URI_RE.match(no_nul(value, where)):
        raise InvalidElement(where, f"invalid uri {value!r}")
    return value


def get_id(parent: Mapping[str, Any], name: str, path: str) -> str | None:
    value = parent.get(name)
    if value is None:
        return None
    if not is_id(value):
        raise InvalidElement(f"{path}.{name}", id_problem(value))
    assert isinstance(value, str)
    return value


def get_bool(parent: Mapping[str, Any], name: str, path: str) -> bool | None:
    value = parent.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidElement(f"{path}.{name}", f"expected a boolean, got {_type_name(value)}")
    return value


def get_decimal(parent: Mapping[str, Any], name: str, path: str) -> float | None:
    value = parent.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidElement(f"{path}.{name}", f"expected a JSON number, got {_type_name(value)}")
    try:
        result = float(value)
    except OverflowError:
        raise InvalidElement(f"{path}.{name}", "decimal is out of range") from None
    if not math.isfinite(result):
        raise InvalidElement(f"{path}.{name}", "decimal must be finite")
    return result


def _check_calendar(expression: str, year: int, month: int, day: int) -> None:
    try:
        date(year, month, day)
    except ValueError as exc:
        raise InvalidElement(expression, f"not a calendar date: {exc}") from None


def parse_date(value: object, expression: str) -> date:
    """A FHIR ``date`` (YYYY, YYYY-MM or YYYY-MM-DD); partial dates take their first day."""
    if not isinstance(value, str):
        raise InvalidElement(expression, f"expected a date string, got {_type_name(value)}")
    match = DATE_RE.match(value)
    if not match:
        raise InvalidElement(expression, f"invalid date {value!r}")
    year, month, day = int(match["y"]), int(match["m"] or 1), int(match["d"] or 1)
    _check_calendar(expression, year, month, day)
    return date(year, month, day)


def parse_datetime(value: object, expression: str) -> datetime:
    """A FHIR ``dateTime`` as an aware datetime (UTC when the source gives no time zone)."""
    if not isinstance(value, str):
        raise InvalidElement(expression, f"expected a dateTime string, got {_type_name(value)}")
    match = DATETIME_RE.match(value)
    if not match:
        raise InvalidElement(expression, f"invalid dateTime {value!r}")
    year, month, day = int(match["y"]), int(match["m"] or 1), int(match["d"] or 1)
    _check_calendar(expression, year, month, day)
    if match["H"] is None:
        return datetime(year, month, day, tzinfo=UTC)
    if match["tz"] is None:
        raise InvalidElement(expression, f"dateTime {value!r} has a time but no time zone")
    second = min(int(match["S"]), 59)
    micro = int((match["f"] or ".0")[1:].ljust(6, "0")[:6])
    tz = match["tz"]
    if tz == "Z":
        tzinfo: timezone = UTC
    else:
        sign = 1 if tz[0] == "+" else -1
        tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    return datetime(
        year, month, day, int(match["H"]), int(match["M"]), second, micro, tzinfo=tzinfo
    ).astimezone(UTC)


def parse_instant(value: object, expression: str) -> datetime:
    if not isinstance(value, str) or not INSTANT_RE.match(value):
        raise InvalidElement(expression, f"invalid instant {value!r}")
    return parse_datetime(value, expression)


def get_datetime(parent: Mapping[str, Any], name: str, path: str) -> datetime | None:
    value = parent.get(name)
    if value is None:
        return None
    return parse_datetime(value, f"{path}.{name}")


def get_date(parent: Mapping[str, Any], name: str, path: str) -> date | None:
    value = parent.get(name)
    if value is None:
        return None
    return parse_date(value, f"{path}.{name}")


def read_coding(value: object, expression: str) -> Coding | None:
    if not isinstance(value, dict):
        raise InvalidElement(expression, f"expected a Coding object, got {_type_name(value)}")
    system = get_uri(value, "system", expression)
    code = get_code(value, "code", expression)
    display = get_string(value, "display", expression)
    if code is None:
        return None
    return _coding(system or "", code, display)


@lru_cache(maxsize=65_536)
def _coding(system: str, code: str, display: str | None) -> Coding:
    """One shared (frozen, so shareable) Coding per checked triple: the same few thousand
    codes recur across every resource of a population, and building the model was a tenth of
    ingest. Every field was checked by the caller: no re-validation on this hot path."""
    return Coding.model_construct(system=system, code=code, display=display)


def read_codeable_concept(value: object, expression: str) -> tuple[Coding, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidElement(
            expression, f"expected a CodeableConcept object, got {_type_name(value)}"
        )
    get_string(value, "text", expression)
    codings = []
    for index, item in enumerate(get_list(value, "coding", expression)):
        coding = read_coding(item, f"{expression}.coding[{index}]")
        if coding is not None:
            codings.append(coding)
    return tuple(codings)


def get_codeable_concept(parent: Mapping[str, Any], name: str, path: str) -> tuple[Coding, ...]:
    return read_codeable_concept(parent.get(name), f"{path}.{name}")


def get_codeable_concepts(parent: Mapping[str, Any], name: str, path: str) -> tuple[Coding, ...]:
    codings: list[Coding] = []
    for index, item in enumerate(get_list(parent, name, path)):
        codings.extend(read_codeable_concept(item, f"{path}.{name}[{index}]"))
    return tuple(codings)


def first_code(codings: tuple[Coding, ...]) -> str | None:
    return codings[0].code if codings else None


_WHITESPACE = re.compile(r"\s")


def read_reference(value: object, expression: str) -> str | None:
    """The ``reference`` string of a Reference (or None when it carries only an identifier)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidElement(expression, f"expected a Reference object, got {_type_name(value)}")
    reference = get_string(value, "reference", expression)
    if reference is not None and _WHITESPACE.search(reference):
        raise InvalidElement(f"{expression}.reference", f"invalid reference {reference!r}")
    return reference


def read_identifier_token(value: object, expression: str) -> str | None:
    """``system|value`` of an Identifier, the form hashed into pseudonyms."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidElement(expression, f"expected an Identifier object, got {_type_name(value)}")
    system = get_uri(value, "system", expression)
    ident = get_string(value, "value", expression)
    if ident is None:
        return None
    return f"{system or ''}|{ident.strip()}"


def read_period(value: object, expression: str) -> tuple[datetime | None, datetime | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise InvalidElement(expression, f"expected a Period object, got {_type_name(value)}")
    start = get_datetime(value, "start", expression)
    end = get_datetime(value, "end", expression)
    if start and end and end < start:
        raise InvalidElement(expression, "period end is before its start")
    return start, end


def read_quantity(value: object, expression: str) -> tuple[float | None, str | None]:
    """A Quantity's value and unit: the UCUM code when coded in UCUM, else the human unit."""
    if not isinstance(value, dict):
        raise InvalidElement(expression, f"expected a Quantity object, got {_type_name(value)}")
    number = get_decimal(value, "value", expression)
    get_code(value, "comparator", expression, frozenset({"<", "<=", ">=", ">"}))
    unit_text = get_string(value, "unit", expression)
    system = get_uri(value, "system", expression)
    code = get_code(value, "code", expression)
    if code is not None and system is None:
        raise InvalidElement(expression, "Quantity has a code but no system (qty-3)")
    unit = code if code is not None and system == "http://unitsofmeasure.org" else unit_text
    return number, unit
