"""Expanding ECL expressions and ValueSets to explicit code sets, with the versions they came
from: what feasibility calls when it compiles a question (:mod:`feasibility.expansion`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from core.codes import SNOMED

from . import ecl
from .hierarchy import Hierarchy
from .store import NoRelease, TerminologyStore
from .valuesets import Expansion, ValueSetError


class ExpansionFailed(ValueError):
    """An ECL expression or ValueSet that cannot be expanded here (the reason in words)."""


@dataclass(frozen=True)
class CodeExpansion:
    #: canonical system -> sorted codes
    codes: dict[str, list[str]]
    method: str  # "ecl", "compose", "expansion"
    release: str | None = None
    valueset: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.codes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "codes": self.codes,
            "method": self.method,
            "release": self.release,
            "valueset": self.valueset,
            "warnings": self.warnings,
        }


def expand_ecl(hierarchy: Hierarchy, version: str, text: str) -> CodeExpansion:
    """The concepts ``text`` selects in ``hierarchy`` (release ``version``), with a warning per
    focus concept that is not active in it and when nothing at all is selected."""
    try:
        parsed = ecl.parse(text)
    except ecl.EclSyntaxError as exc:
        raise ExpansionFailed(str(exc)) from None
    result = ecl.evaluate(parsed, hierarchy)
    warnings = [
        f"concept {sctid} is not an active concept of release {version}"
        for sctid in dict.fromkeys(result.unknown)
    ]
    codes = hierarchy.codes(result.index)
    if not codes:
        warnings.append(f"the expression matches no concept in release {version}")
    return CodeExpansion({SNOMED: codes} if codes else {}, "ecl", version, None, warnings)


class HierarchySource:
    """ECL expansion over a hierarchy held in memory (no store, no ValueSets): for tests and
    tools that build a hierarchy themselves."""

    def __init__(self, hierarchy: Hierarchy, version: str = "in-memory") -> None:
        self.hierarchy = hierarchy
        self.version = version

    def expand_ecl(self, text: str) -> CodeExpansion:
        return expand_ecl(self.hierarchy, self.version, text)

    def expand_valueset(self, url: str, version: str | None = None) -> CodeExpansion:
        raise ExpansionFailed(f"ValueSet {url}: no ValueSets in an in-memory hierarchy")


class Terminology:
    """ECL and ValueSet expansion over a :class:`~terminology.store.TerminologyStore`; each
    expansion is cached until the store's next load."""

    def __init__(self, store: TerminologyStore, max_expansion: int = 50_000) -> None:
        self.store = store
        self.max_expansion = max_expansion
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, str, str, str | None], CodeExpansion] = OrderedDict()

    def generation(self) -> int:
        return self.store.generation()

    def release(self) -> str | None:
        info = self.store.current()
        return info.version if info is not None else None

    def _cached(self, key: tuple[int, str, str, str | None]) -> CodeExpansion | None:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def _keep(self, key: tuple[int, str, str, str | None], value: CodeExpansion) -> None:
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > 256:
                self._cache.popitem(last=False)

    def _checked(self, expansion: CodeExpansion, what: str) -> CodeExpansion:
        if expansion.size > self.max_expansion:
            raise ExpansionFailed(
                f"{what} expands to {expansion.size} codes, more than the "
                f"{self.max_expansion} allowed (CONCIERGE_TERMINOLOGY_MAX_EXPANSION): narrow it"
            )
        return expansion

    def _hierarchy(self) -> tuple[str, Hierarchy]:
        try:
            info, hierarchy = self.store.hierarchy()
        except NoRelease as exc:
            raise ExpansionFailed(str(exc)) from None
        return info.version, hierarchy

    def expand_ecl(self, text: str) -> CodeExpansion:
        key = (self.generation(), "ecl", text, None)
        found = self._cached(key)
        if found is not None:
            return found
        version, hierarchy = self._hierarchy()
        expansion = self._checked(expand_ecl(hierarchy, version, text), f"ECL {text!r}")
        self._keep(key, expansion)
        return expansion

    def expand_valueset(self, url: str, version: str | None = None) -> CodeExpansion:
        key = (self.generation(), "valueset", url, version)
        found = self._cached(key)
        if found is not None:
            return found
        resource = self.store.valueset(url, version)
        if resource is None:
            loaded = [v["version"] for v in self.store.valuesets() if v["url"] == url]
            raise ExpansionFailed(
                f"ValueSet {url}{'|' + version if version else ''} is not loaded"
                + (f" (versions loaded: {', '.join(str(v) for v in loaded)})" if loaded else "")
                + " (concierge terminology load FILE.json)"
            )
        expander = Expansion(self._hierarchy, self.store.valueset)
        try:
            expanded = expander.expand(resource)
        except ValueSetError as exc:
            raise ExpansionFailed(str(exc)) from None
        codes = {s: sorted(c) for s, c in sorted(expanded.codes.items())}
        warnings = list(expanded.warnings)
        name = f"{url}|{resource.get('version') or ''}".rstrip("|")
        if not codes:
            warnings.append(f"ValueSet {name} expands to no code")
        expansion = self._checked(
            CodeExpansion(codes, expanded.method, expanded.release, name, warnings),
            f"ValueSet {name}",
        )
        self._keep(key, expansion)
        return expansion


__all__ = ["CodeExpansion", "ExpansionFailed", "HierarchySource", "Terminology", "expand_ecl"]
