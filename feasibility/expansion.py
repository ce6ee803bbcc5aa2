"""Compiling a question: every ECL and ValueSet code entry becomes an explicit code set.

The engines (reference, incremental, polars) match explicit codes only, so an ECL expression
(``{"ecl": "<< 73211009"}``) or a ValueSet (``{"valueset": URL, "version": V}``) is expanded
here, once, against the site's terminology store (:class:`terminology.expand.Terminology`),
before any engine sees the question. The expansion is written into the code entry
(:class:`feasibility.criteria.Expansion`: the codes, the SNOMED CT release and ValueSet
version they came from, warnings), so a saved question's record carries exactly what it was
answered with, and the stream evaluates it without a terminology store.

An entry that cannot be expanded (no release loaded, an unknown ValueSet, too many codes) is a
:class:`ExpansionError`: the request's 422, pointing at the entry. An expression that matches
nothing is not an error but a warning in the answer (``terminology.warnings``): a zero count
from a misspelt concept id must not look like a real zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .criteria import CriteriaError, Question, json_pointer

#: Lists of coded terms in criteria.
_CODE_LISTS = ("codes", "component", "value_codes", "device_types")


class ExpansionSource(Protocol):
    """What compiling needs of a terminology (:class:`terminology.expand.Terminology`)."""

    def expand_ecl(self, text: str) -> Any: ...

    def expand_valueset(self, url: str, version: str | None = None) -> Any: ...


class ExpansionError(CriteriaError):
    """Code entries that could not be expanded (``errors``: ``loc``, ``pointer``, ``msg``)."""


@dataclass
class Compiled:
    question: Question
    #: ``{"expansions": [...], "warnings": [...]}`` for the answer (empty when nothing needed
    #: expanding)
    report: dict[str, Any] = field(default_factory=dict)


def _entries(node: Any, path: list[str | int]) -> Iterator[tuple[list[str | int], dict[str, Any]]]:
    """Every ECL or ValueSet code entry in a dumped question, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _CODE_LISTS and isinstance(value, list):
                for n, entry in enumerate(value):
                    if isinstance(entry, dict) and (entry.get("ecl") or entry.get("valueset")):
                        yield [*path, key, n], entry
            else:
                yield from _entries(value, [*path, key])
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from _entries(value, [*path, n])


def needs_expansion(question: Question) -> bool:
    return any(True for _ in _entries(question.model_dump(by_alias=True), []))


def compile_question(
    question: Question,
    source: ExpansionSource | None,
    body: Any = None,
    prefix: tuple[str | int, ...] = (),
) -> Compiled:
    """``question`` with every ECL and ValueSet entry expanded (again, if it was before), and
    the report of what each expanded to. ``body``: the request as sent, for error pointers;
    ``prefix``: where the criteria sit in it (``("criteria",)`` in a trial)."""
    dumped = question.model_dump(by_alias=True, mode="json")
    entries = list(_entries(dumped, []))
    if not entries:
        return Compiled(question, {})
    errors: list[dict[str, Any]] = []
    report: list[dict[str, Any]] = []
    warnings: list[str] = []
    for path, entry in entries:
        member = "ecl" if entry.get("ecl") else "valueset"
        loc = [*prefix, *path, member]
        pointer = json_pointer(body, loc) if body is not None else _pointer(loc)
        if source is None:
            errors.append(
                _error(
                    loc,
                    pointer,
                    "no terminology store in this service: ECL and ValueSets cannot be expanded",
                )
            )
            continue
        try:
            if member == "ecl":
                found = source.expand_ecl(entry["ecl"])
            else:
                found = source.expand_valueset(entry["valueset"], entry.get("version"))
        except ValueError as exc:  # ExpansionFailed, named by the terminology package
            errors.append(_error(loc, pointer, str(exc)))
            continue
        entry["expansion"] = {
            "codes": found.codes,
            "release": found.release,
            "valueset": found.valueset,
            "method": found.method,
            "warnings": list(found.warnings),
        }
        entry_pointer = pointer.rsplit("/", 1)[0]
        report.append(
            {
                "pointer": entry_pointer,
                member: entry[member],
                "codes": found.size,
                "release": found.release,
                "valueset": found.valueset,
                "method": found.method,
                "warnings": list(found.warnings),
            }
        )
        warnings.extend(f"{entry_pointer}: {w}" for w in found.warnings)
    if errors:
        raise ExpansionError(errors)
    compiled = Question.model_validate(dumped)
    return Compiled(compiled, {"expansions": report, "warnings": warnings})


def report_of(question: Question) -> dict[str, Any]:
    """The expansion report of a question compiled before (a saved question's record)."""
    dumped = question.model_dump(by_alias=True, mode="json")
    report: list[dict[str, Any]] = []
    warnings: list[str] = []
    for path, entry in _entries(dumped, []):
        member = "ecl" if entry.get("ecl") else "valueset"
        expansion = entry.get("expansion") or {}
        pointer = _pointer(path)
        codes = sum(len(c) for c in (expansion.get("codes") or {}).values())
        report.append(
            {
                "pointer": pointer,
                member: entry[member],
                "codes": codes,
                "release": expansion.get("release"),
                "valueset": expansion.get("valueset"),
                "method": expansion.get("method"),
                "warnings": list(expansion.get("warnings") or ()),
            }
        )
        warnings.extend(f"{pointer}: {w}" for w in expansion.get("warnings") or ())
    return {"expansions": report, "warnings": warnings} if report else {}


def expansions(question: Question) -> list[tuple[str, dict[str, list[str]] | None]]:
    """``(pointer, codes)`` of every ECL or ValueSet entry, for comparing two compilations."""
    dumped = question.model_dump(by_alias=True, mode="json")
    return [
        (_pointer(path), (entry.get("expansion") or {}).get("codes"))
        for path, entry in _entries(dumped, [])
    ]


def _pointer(loc: list[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in loc)


def _error(loc: list[str | int], pointer: str, message: str) -> dict[str, Any]:
    return {"loc": ".".join(str(p) for p in loc), "path": loc, "pointer": pointer, "msg": message}


__all__ = [
    "Compiled",
    "ExpansionError",
    "ExpansionSource",
    "compile_question",
    "expansions",
    "needs_expansion",
    "report_of",
]
