"""FHIR ValueSets: reading resources and expanding them to explicit codes.

A ValueSet's ``expansion`` is used when it has one (``contains``, nested, abstract entries left
out). Otherwise its ``compose`` is expanded here: each ``include`` is its ``concept`` list, or
its ``filter``s (all must hold), or, with neither, every concept of its system; intersected
with any ``valueSet`` it names; the includes are united and the ``exclude``s taken away.
Filters are resolved against the loaded SNOMED CT release:

* ``concept is-a X``: X and its descendants; ``concept descendent-of X``: its descendants only;
* ``concept is-not-a X``: every concept but X and its descendants;
* ``concept = X``: X alone; ``constraint = ECL`` (and ``expression = ECL``): the ECL's concepts.

A filter on another system, or another property or operator, is a :class:`ValueSetError`
naming it: a ValueSet is never expanded to fewer or more codes than it means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.codes import SNOMED, normalise_code, system_of_data

from . import ecl
from .hierarchy import Hierarchy, Index


class ValueSetError(ValueError):
    """A ValueSet that cannot be read or expanded (why, and where, in the message)."""


def valuesets_in(document: Any, name: str = "") -> list[dict[str, Any]]:
    """The ValueSet resources in a JSON document (a ValueSet, or a Bundle of entries)."""
    if not isinstance(document, dict):
        return []
    kind = document.get("resourceType")
    if kind == "ValueSet":
        if not isinstance(document.get("url"), str) or not document["url"]:
            raise ValueSetError(f"{name}: a ValueSet needs a url to be named by criteria")
        return [document]
    if kind == "Bundle":
        out: list[dict[str, Any]] = []
        for n, entry in enumerate(document.get("entry") or ()):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "ValueSet":
                out.extend(valuesets_in(resource, f"{name} entry {n}"))
        return out
    return []


#: canonical system -> codes
CodeSets = dict[str, set[str]]


@dataclass
class Expanded:
    codes: CodeSets
    #: "expansion" (the resource's own) or "compose" (expanded here)
    method: str
    #: the SNOMED CT release the compose was resolved against, when it needed one
    release: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: url|version of every ValueSet this one drew on (itself first)
    used: list[str] = field(default_factory=list)


def _add(into: CodeSets, system: str, codes: set[str]) -> None:
    into.setdefault(system, set()).update(codes)


def _from_expansion(contains: list[Any], into: CodeSets) -> None:
    for item in contains:
        if not isinstance(item, dict):
            continue
        code, system = item.get("code"), item.get("system")
        if code and system and not item.get("abstract"):
            canonical = system_of_data(system)
            _add(into, canonical, {normalise_code(canonical, str(code))})
        _from_expansion(item.get("contains") or [], into)


class Expansion:
    """Expands ValueSets with a SNOMED CT hierarchy (loaded lazily: a ValueSet of LOINC codes
    needs none) and a way to find the ValueSets another one names."""

    def __init__(
        self,
        hierarchy: Callable[[], tuple[str, Hierarchy]],
        find: Callable[[str, str | None], dict[str, Any] | None],
    ) -> None:
        self._hierarchy = hierarchy
        self._find = find
        self.release: str | None = None

    def snomed(self) -> Hierarchy:
        version, hierarchy = self._hierarchy()
        self.release = version
        return hierarchy

    def expand(self, resource: dict[str, Any], depth: int = 0) -> Expanded:
        url = f"{resource.get('url')}|{resource.get('version') or ''}".rstrip("|")
        if depth > 10:
            raise ValueSetError(f"ValueSets nest more than 10 deep at {url} (a cycle?)")
        expansion = resource.get("expansion")
        if isinstance(expansion, dict) and expansion.get("contains"):
            codes: CodeSets = {}
            _from_expansion(expansion["contains"], codes)
            total = expansion.get("total")
            warnings: list[str] = []
            if isinstance(total, int) and total > sum(len(c) for c in codes.values()):
                raise ValueSetError(
                    f"{url}: its expansion is paged ({total} codes, "
                    f"{sum(len(c) for c in codes.values())} included); load the whole expansion"
                )
            return Expanded(codes, "expansion", None, warnings, [url])
        compose = resource.get("compose")
        if not isinstance(compose, dict) or not compose.get("include"):
            raise ValueSetError(f"{url}: neither an expansion nor a compose with include")
        out = Expanded({}, "compose", None, [], [url])
        for n, include in enumerate(compose["include"]):
            _union(out.codes, self._part(include, f"{url} include[{n}]", depth, out))
        for n, exclude in enumerate(compose.get("exclude") or ()):
            removed = self._part(exclude, f"{url} exclude[{n}]", depth, out)
            for system, gone in removed.items():
                if system in out.codes:
                    out.codes[system] -= gone
        out.codes = {s: c for s, c in out.codes.items() if c}
        out.release = self.release
        return out

    def _part(self, part: dict[str, Any], where: str, depth: int, out: Expanded) -> CodeSets:
        system_uri = part.get("system")
        concepts = part.get("concept") or []
        filters = part.get("filter") or []
        if concepts and filters:
            raise ValueSetError(f"{where}: has both concept and filter (FHIR does not allow it)")
        result: CodeSets | None = None
        if system_uri:
            system = system_of_data(system_uri)
            if concepts:
                codes = {
                    normalise_code(system, str(c.get("code")))
                    for c in concepts
                    if isinstance(c, dict) and c.get("code")
                }
                if system == SNOMED:
                    hierarchy = self.snomed()
                    missing = [
                        c for c in codes if not c.isdigit() or hierarchy.index_of(int(c)) is None
                    ]
                    if missing:
                        out.warnings.append(
                            f"{where}: {len(missing)} concept(s) not active in the loaded "
                            f"release ({', '.join(sorted(missing)[:5])})"
                        )
                result = {system: codes}
            else:
                if system != SNOMED:
                    what = "filters on" if filters else "all codes of"
                    raise ValueSetError(
                        f"{where}: {what} {system_uri} cannot be expanded here (only SNOMED CT "
                        "has a hierarchy loaded); use a ValueSet with an expansion"
                    )
                hierarchy = self.snomed()
                index = hierarchy.everything()
                for k, f in enumerate(filters):
                    index = np.intersect1d(index, self._filter(f, f"{where} filter[{k}]", out))
                result = {SNOMED: set(hierarchy.codes(index))}
        for k, canonical in enumerate(part.get("valueSet") or ()):
            url, _, version = str(canonical).partition("|")
            resource = self._find(url, version or None)
            if resource is None:
                raise ValueSetError(f"{where} valueSet[{k}]: {canonical} is not loaded")
            inner = self.expand(resource, depth + 1)
            out.used.extend(inner.used)
            out.warnings.extend(inner.warnings)
            result = inner.codes if result is None else _intersect(result, inner.codes)
        if result is None:
            raise ValueSetError(f"{where}: names neither a system nor a valueSet")
        return result

    def _filter(self, f: dict[str, Any], where: str, out: Expanded) -> Index:
        prop, op, value = f.get("property"), f.get("op"), f.get("value")
        hierarchy = self.snomed()
        if prop in ("constraint", "expression") and op == "=":
            try:
                parsed = ecl.parse(str(value))
            except ecl.EclSyntaxError as exc:
                raise ValueSetError(f"{where}: {exc}") from None
            found = ecl.evaluate(parsed, hierarchy)
            if found.unknown:
                out.warnings.append(
                    f"{where}: {', '.join(map(str, found.unknown))} not active in the release"
                )
            return found.index
        if prop != "concept" or op not in ("is-a", "descendent-of", "is-not-a", "="):
            raise ValueSetError(
                f"{where}: filter {prop} {op} is not supported (concept is-a, descendent-of, "
                "is-not-a, =; constraint = ECL)"
            )
        code = str(value or "")
        i = hierarchy.index_of(int(code)) if code.isdigit() else None
        if i is None:
            out.warnings.append(f"{where}: concept {code} is not active in the loaded release")
            return np.zeros(0, dtype=np.int32) if op != "is-not-a" else hierarchy.everything()
        seed = np.asarray([i], dtype=np.int32)
        if op == "=":
            return seed
        below = hierarchy.closure(seed, down=True)
        if op == "descendent-of":
            return below
        with_self = np.union1d(below, seed).astype(np.int32)
        if op == "is-a":
            return with_self
        return np.setdiff1d(hierarchy.everything(), with_self).astype(np.int32)


def _union(into: CodeSets, other: CodeSets) -> None:
    for system, codes in other.items():
        _add(into, system, codes)


def _intersect(a: CodeSets, b: CodeSets) -> CodeSets:
    return {s: a[s] & b[s] for s in a.keys() & b.keys() if a[s] & b[s]}


__all__ = ["CodeSets", "Expanded", "Expansion", "ValueSetError", "valuesets_in"]
