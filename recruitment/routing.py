"""Routing: which clinician a candidate goes to, and why.

In order:

1. the patient's registered GP: the first Practitioner in the patient's ``general_practitioners``
   that the reference topic has brought and that is active;
2. the trial's named recruiter at the site (``recruiters`` in the trial record), if known and
   active;
3. any active practitioner whose active role at the site marks them as a trial recruiter;
4. nobody: the candidate stays unrouted with a visible reason ("no clinician found for site
   RA3").

The directory of practitioners is a small interface (:class:`Directory`): the service reads it
from the database, unit tests from memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

RECRUITER_TEXT = "trial recruiter"


class Via(StrEnum):
    GP = "gp"
    NAMED_RECRUITER = "named_recruiter"
    SITE_RECRUITER = "site_recruiter"
    UNROUTED = "unrouted"


@dataclass(frozen=True)
class Route:
    practitioner: str | None
    via: Via
    reason: str

    @property
    def routed(self) -> bool:
        return self.practitioner is not None


class Directory(Protocol):
    def is_active_practitioner(self, key: str) -> bool:
        """The Practitioner exists (not retracted) and is active."""
        ...

    def recruiters_at(self, site: str) -> Sequence[str]:
        """Active practitioners with an active trial-recruiter role at the site, best first."""
        ...


def _practitioner_keys(keys: Iterable[str]) -> Iterable[str]:
    for key in keys:
        parts = key.split("|")
        if len(parts) >= 3 and parts[-2] == "Practitioner":
            yield key


def route(
    site: str,
    general_practitioners: Sequence[str],
    named_recruiter: str | None,
    directory: Directory,
) -> Route:
    for key in _practitioner_keys(general_practitioners):
        if directory.is_active_practitioner(key):
            return Route(key, Via.GP, "the patient's registered GP")
    if named_recruiter and directory.is_active_practitioner(named_recruiter):
        return Route(named_recruiter, Via.NAMED_RECRUITER, f"the trial's recruiter at {site}")
    recruiters = directory.recruiters_at(site)
    if recruiters:
        return Route(recruiters[0], Via.SITE_RECRUITER, f"a trial recruiter at {site}")
    return Route(None, Via.UNROUTED, f"no clinician found for site {site}")


@dataclass(frozen=True)
class RoleCode:
    system: str | None
    code: str | None
    display: str | None = None


def is_trial_recruiter(codes: Iterable[RoleCode], texts: Iterable[str] = ()) -> bool:
    """Whether a PractitionerRole marks its practitioner as a trial recruiter.

    The marker is the words "trial recruiter" in the role's text or in a coding's display.
    Research nurses' roles are usually coded SNOMED 224535009 (Registered nurse) *plus* that
    text; the code alone does not qualify, since most registered nurses do not recruit, so the
    text decides in every case.
    """
    words = [t for t in texts if t] + [c.display for c in codes if c.display]
    return any(RECRUITER_TEXT in w.casefold() for w in words)


@dataclass
class MemoryDirectory:
    """A directory in memory, for unit tests."""

    active: set[str] = field(default_factory=set)
    inactive: set[str] = field(default_factory=set)
    recruiters: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def is_active_practitioner(self, key: str) -> bool:
        return key in self.active

    def recruiters_at(self, site: str) -> Sequence[str]:
        return [k for k in self.recruiters.get(site, ()) if k in self.active]


__all__ = [
    "Directory",
    "MemoryDirectory",
    "RoleCode",
    "Route",
    "Via",
    "is_trial_recruiter",
    "route",
]
