"""Human-readable rendering of criteria: a reader of the criteria model, like the engines."""

from __future__ import annotations

from typing import Any

from .criteria import (
    AgeCriterion,
    AllOf,
    AnyOf,
    CancerStageCriterion,
    Code,
    ConditionCriterion,
    DeviceCriterion,
    ExclusionStep,
    InclusionStep,
    MedicationCriterion,
    MolecularMarkerCriterion,
    Not,
    ObservationCriterion,
    ProcedureCriterion,
    Question,
    RegionCriterion,
    SexCriterion,
    SiteCriterion,
    ValueTest,
    Window,
)
from .terminology import CONCEPTS


def code(c: Code) -> str:
    if c.concept:
        return CONCEPTS[c.concept].display
    if c.ecl is not None:
        size = f", {c.expansion.size} codes" if c.expansion is not None else ""
        return f"SNOMED CT {c.ecl}{size}"
    if c.valueset is not None:
        size = f", {c.expansion.size} codes" if c.expansion is not None else ""
        return f"ValueSet {c.valueset}{'|' + c.version if c.version else ''}{size}"
    what = c.code or (f"{c.prefix}*" if c.prefix else c.range)
    label = f" ({c.display})" if c.display else ""
    return f"{c.system} {what}{label}"


def codes(cs: list[Code]) -> str:
    return " or ".join(code(c) for c in cs)


def window(w: Window | None) -> str:
    if w is None:
        return "ever"
    anchor = "the index date" if w.anchor == "index" else f"the first {w.anchor}"
    if w.start is not None and w.end == 0 and w.start <= 0 and w.anchor == "index":
        return f"in the {-w.start} days before {anchor}"
    start = "any time" if w.start is None else f"{w.start:+d} days"
    end = "the index date" if w.end is None else f"{w.end:+d} days"
    return f"from {start} to {end} relative to {anchor}"


def value(v: ValueTest) -> str:
    parts = []
    for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("eq", "=")):
        bound = getattr(v, name)
        if bound is not None:
            parts.append(f"{symbol} {bound:g}")
    return " and ".join(parts) + (f" {v.unit}" if v.unit else "")


def criterion(c: Any) -> str:
    count = f"at least {c.min_count} records of " if getattr(c, "min_count", 1) > 1 else ""
    if isinstance(c, ConditionCriterion):
        return f"{count}diagnosis of {codes(c.codes)}, {window(c.window)}"
    if isinstance(c, MedicationCriterion):
        return f"{count}medicine {codes(c.codes)}, {window(c.window)}"
    if isinstance(c, ProcedureCriterion):
        return f"{count}procedure {codes(c.codes)}, {window(c.window)}"
    if isinstance(c, DeviceCriterion):
        what = [codes(c.device_types) if c.device_types else "", ", ".join(c.model or ()),
                ", ".join(c.manufacturer or ())]  # fmt: skip
        return f"{count}device {' / '.join(w for w in what if w)}, {window(c.window)}"
    if isinstance(c, ObservationCriterion):
        subject = codes(c.codes) + (f" ({codes(c.component)})" if c.component else "")
        tests = []
        if c.value:
            tests.append(value(c.value))
        if c.value_codes:
            tests.append("result " + codes(c.value_codes))
        if c.interpretation:
            tests.append("flagged " + "/".join(c.interpretation))
        if not tests:
            if c.min_count > 1:
                return f"at least {c.min_count} {subject} results, {window(c.window)}"
            return f"a {subject} result, {window(c.window)}"
        if c.select == "any":
            many = (
                f"at least {c.min_count} {subject} results"
                if c.min_count > 1
                else (f"any {subject} result")
            )
            return f"{many} {' and '.join(tests)}, {window(c.window)}"
        return f"{c.select} {subject} {' and '.join(tests)}, {window(c.window)}"
    if isinstance(c, AgeCriterion):
        if c.min is not None and c.max is not None:
            return f"aged {c.min} to {c.max}"
        return f"aged {c.min} or over" if c.min is not None else f"aged {c.max} or under"
    if isinstance(c, SexCriterion):
        return "sex " + " or ".join(c.values)
    if isinstance(c, SiteCriterion):
        return "at site " + ", ".join(c.sites)
    if isinstance(c, RegionCriterion):
        return "in " + ", ".join(c.regions)
    if isinstance(c, CancerStageCriterion):
        return "latest stage " + ", ".join(c.stages)
    if isinstance(c, MolecularMarkerCriterion):
        return f"latest {c.marker} {c.status.replace('_', ' ')}"
    if isinstance(c, AllOf):
        return "all of (" + "; ".join(criterion(x) for x in c.criteria) + ")"
    if isinstance(c, AnyOf):
        return "any of (" + "; ".join(criterion(x) for x in c.criteria) + ")"
    if isinstance(c, Not):
        return "not (" + criterion(c.criterion) + ")"
    raise TypeError(type(c).__name__)


def step(number: int, s: InclusionStep | ExclusionStep) -> str:
    """One funnel step in words: its number, whether it includes or excludes, its label, and
    its criteria (OR within an inclusion step, AND within an exclusion step)."""
    if isinstance(s, InclusionStep):
        kind, joiner, items = "include", " OR ", s.any_of
    else:
        kind, joiner, items = "exclude", " AND ", s.all_of
    label = f" ({s.label})" if s.label else ""
    return f"  {number}. {kind}{label}: " + joiner.join(criterion(c) for c in items)


def render(question: Question) -> str:
    lines = [question.title or "Feasibility question"]
    when = question.index_date.isoformat() if question.index_date else "the time of asking"
    lines.append(f"Index date: {when}")
    lines.append("Included when every step holds:")
    lines += [step(i + 1, s) for i, s in enumerate(question.inclusion)]
    if question.exclusion:
        lines.append("Excluded when any step holds:")
        first = len(question.inclusion) + 1
        lines += [step(first + i, s) for i, s in enumerate(question.exclusion)]
    if question.exclusion:
        keep = "kept" if question.exclusion_unknown == "keep" else "excluded"
        lines.append(f"Patients whose exclusion criteria cannot be decided are {keep}.")
    return "\n".join(lines)


__all__ = ["criterion", "render", "step"]
