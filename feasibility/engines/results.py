"""What every engine returns, and the funnel and breakdowns computed from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..criteria import ExclusionStep, Question, step_label

#: Three-valued logic: True, False, or None for UNKNOWN (no data to decide).
Tri = bool | None


@dataclass(frozen=True)
class PatientResult:
    """One patient's evaluation: in the base population (alive, with demographics) and, if so,
    each funnel step's result in criterion order (inclusion steps, then exclusion steps)."""

    in_population: bool
    steps: tuple[Tri, ...]
    site: str | None = None
    region: str | None = None
    #: Per step, the results its criteria skipped because their unit does not convert to
    #: the criterion's (or they have none): distinct (resource, component) in the window.
    unconvertible: tuple[int, ...] = ()

    def member(self, question: Question) -> bool:
        return self.in_population and is_member(question, self.steps)

    def letters(self) -> str:
        return "".join("P" if s is True else "F" if s is False else "U" for s in self.steps)


def is_member(question: Question, steps: Sequence[Tri]) -> bool:
    n = len(question.inclusion)
    if not all(s is True for s in steps[:n]):
        return False
    for s in steps[n:]:
        if s is True or (s is None and question.exclusion_unknown == "exclude"):
            return False
    return True


def kleene_and(values: Sequence[Tri]) -> Tri:
    if any(v is False for v in values):
        return False
    if all(v is True for v in values):
        return True
    return None


def kleene_or(values: Sequence[Tri]) -> Tri:
    if any(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return None


def kleene_not(value: Tri) -> Tri:
    return None if value is None else not value


@dataclass(frozen=True)
class FunnelStep:
    """Patients reaching a step and how they fared. For an exclusion step ``passed`` means not
    excluded (the step's criteria are not all TRUE) and ``failed`` means excluded."""

    label: str
    kind: str  # population | inclusion | exclusion
    entered: frozenset[str]
    passed: frozenset[str]
    failed: frozenset[str]
    unknown: frozenset[str]
    remaining: frozenset[str]


def funnel(question: Question, results: Mapping[str, PatientResult]) -> list[FunnelStep]:
    """The attrition funnel in criterion order, as sets of patients."""
    population = frozenset(p for p, r in results.items() if r.in_population)
    steps = [
        FunnelStep("population", "population", population, population, frozenset(), frozenset(),
                   population)
    ]  # fmt: skip
    remaining = population
    n_inclusion = len(question.inclusion)
    for i, step in enumerate(question.steps):
        exclusion = isinstance(step, ExclusionStep)
        values = {p: results[p].steps[i] for p in remaining}
        true = frozenset(p for p, v in values.items() if v is True)
        false = frozenset(p for p, v in values.items() if v is False)
        unknown = frozenset(p for p, v in values.items() if v is None)
        if exclusion:
            passed, failed = false, true
            keep = passed | unknown if question.exclusion_unknown == "keep" else passed
        else:
            passed, failed = true, false
            keep = passed
        steps.append(
            FunnelStep(
                step_label(step, i),
                "exclusion" if i >= n_inclusion else "inclusion",
                remaining,
                passed,
                failed,
                unknown,
                keep,
            )
        )
        remaining = keep
    return steps


def cohort(question: Question, results: Mapping[str, PatientResult]) -> frozenset[str]:
    return frozenset(p for p, r in results.items() if r.member(question))


__all__ = [
    "FunnelStep",
    "PatientResult",
    "Tri",
    "cohort",
    "funnel",
    "is_member",
    "kleene_and",
    "kleene_not",
    "kleene_or",
]
