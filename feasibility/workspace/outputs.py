"""The workspace's outputs as exact sets, and their protected layout.

Each output adds named sets (:attr:`~feasibility.disclosure.answer.AnswerSets.extra`) and the
relations a reader knows between them (:class:`~feasibility.disclosure.answer.Breakdown`) to
the question's answer, so that one disclosure-control plan protects the funnel, the sites and
the new cells together (``docs/explanation/sponsor-workspace.md``). Rates and shares are
computed here from the protected cells only, never from exact counts.

Cell names: ``profile:sex:S``, ``profile:S:BAND``; ``impact:i``; ``entries:SITE``,
``entries:recruiting``, ``entries:total``; ``candidates|opted_out|limited|invited|consented|
enrolled:SITE`` and ``...:total``; ``series:YYYY-MM-DD``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import polars as pl
from pyroaring import BitMap

from core.contracts.invitations import RECRUITMENT_KINDS

from ..criteria import AgeCriterion, ExclusionStep, Question, step_label
from ..disclosure.answer import AnswerSets, Breakdown, Cell, ProtectedAnswer

#: Age bands of the profile: label, first and last year of age (None: no upper bound).
AGE_BANDS: tuple[tuple[str, int, int | None], ...] = (
    ("0-17", 0, 17),
    ("18-29", 18, 29),
    ("30-39", 30, 39),
    ("40-49", 40, 49),
    ("50-59", 50, 59),
    ("60-69", 60, 69),
    ("70-79", 70, 79),
    ("80+", 80, None),
)
#: Administrative sex as the facts hold it (FHIR's gender codes).
SEXES: tuple[str, ...] = ("female", "male", "other", "unknown")

#: What a ratio of protected cells reads when either is withheld.
WITHHELD_RATIO = {"value": None, "display": "withheld", "suppressed": True}


def ratio(numerator: Cell, denominator: Cell, scale: float = 1.0) -> dict[str, Any]:
    """``numerator / denominator * scale`` from two protected cells: withheld when either is
    withheld, not defined (``None``, display ``-``) over a shown zero."""
    if numerator.suppressed or denominator.suppressed:
        return dict(WITHHELD_RATIO)
    if numerator.value is None or denominator.value is None or denominator.value == 0:
        return {"value": None, "display": "-", "suppressed": False}
    value = numerator.value / denominator.value * scale
    return {"value": round(value, 3), "display": f"{value:.2f}", "suppressed": False}


def with_extra(
    sets: AnswerSets,
    extra: Mapping[str, BitMap],
    breakdowns: Sequence[Breakdown],
    structural: Iterable[str] = (),
) -> AnswerSets:
    return AnswerSets(
        cohort=sets.cohort,
        by_site=sets.by_site,
        site_region=sets.site_region,
        by_region=sets.by_region,
        funnel=sets.funnel,
        extra={**sets.extra, **extra},
        breakdowns=[*sets.breakdowns, *breakdowns],
        structural=sets.structural | frozenset(structural),
    )


# ------------------------------------------------------------------------------- profile


def _age(birth: pl.Expr, day: date) -> pl.Expr:
    """Whole years of age on ``day``."""
    years = pl.lit(day.year) - birth.dt.year()
    before_birthday = (pl.lit(day.month) < birth.dt.month()) | (
        (pl.lit(day.month) == birth.dt.month()) & (pl.lit(day.day) < birth.dt.day())
    )
    return years - before_birthday.cast(pl.Int32)


def profile_sets(
    sets: AnswerSets, patients: pl.DataFrame, day: date
) -> tuple[dict[str, BitMap], list[Breakdown]]:
    """The cohort by sex and by age band within sex (age on the index day); patients without
    a birth date are in no band (an unpublished rest). Regions are the answer's own."""
    ids = pl.Series("pid", list(sets.cohort), dtype=pl.UInt32)
    members = patients.filter(pl.col("pid").is_in(ids.implode())).select(
        "pid",
        pl.col("sex").fill_null("unknown"),
        _age(pl.col("birth_date"), day).alias("age"),
    )
    extra: dict[str, BitMap] = {}
    breakdowns: list[Breakdown] = []
    for sex in SEXES:
        of_sex = members.filter(
            pl.col("sex") == sex if sex != "unknown" else ~pl.col("sex").is_in(SEXES[:-1])
        )
        extra[f"profile:sex:{sex}"] = BitMap(of_sex.get_column("pid").to_list())
        bands = []
        for label, low, high in AGE_BANDS:
            age = pl.col("age")
            within = (age >= low) if high is None else (age >= low) & (age <= high)
            name = f"profile:{sex}:{label}"
            extra[name] = BitMap(of_sex.filter(within).get_column("pid").to_list())
            bands.append(name)
        breakdowns.append(Breakdown(f"profile:sex:{sex}", tuple(bands)))
    breakdowns.append(Breakdown("total", tuple(f"profile:sex:{s}" for s in SEXES)))
    return extra, breakdowns


def age_limits(question: Question) -> tuple[int | None, int | None]:
    """The youngest and oldest age every member has, as the question itself says: from the
    inclusion steps that are a single age criterion (None: no such limit)."""
    low: int | None = None
    high: int | None = None
    for step in question.inclusion:
        if len(step.any_of) != 1 or not isinstance(step.any_of[0], AgeCriterion):
            continue
        age = step.any_of[0]
        if age.min is not None:
            low = age.min if low is None else max(low, age.min)
        if age.max is not None:
            high = age.max if high is None else min(high, age.max)
    return low, high


def profile_structural(question: Question) -> frozenset[str]:
    """The profile's age bands the question's age limits leave empty, for every sex: a reader
    of the criteria knows they are 0 (``0-17`` of an adults-only question). They are shown as
    0 rather than withheld: a withheld zero everyone knows would only make the plan withhold a
    real band beside it, which a reader then works out (seen on the sponsor page: one band
    shown, the others of its row withheld)."""
    low, high = age_limits(question)
    empty = [
        label
        for label, band_low, band_high in AGE_BANDS
        if (low is not None and band_high is not None and band_high < low)
        or (high is not None and band_low > high)
    ]
    return frozenset(f"profile:{sex}:{label}" for sex in SEXES for label in empty)


def profile_layout(protected: ProtectedAnswer) -> dict[str, Any]:
    cells = protected.extra
    return {
        "age_bands": [label for label, _, _ in AGE_BANDS],
        "sexes": list(SEXES),
        "by_sex": {s: cells[f"profile:sex:{s}"].to_dict() for s in SEXES},
        "age_by_sex": {
            s: {label: cells[f"profile:{s}:{label}"].to_dict() for label, _, _ in AGE_BANDS}
            for s in SEXES
        },
        "by_region": {r: c.to_dict() for r, c in protected.by_region.items()},
    }


# -------------------------------------------------------------------------------- impact


def keep_expressions(question: Question) -> list[pl.Expr]:
    """Per step, whether a patient goes on past it (the step frame's ``s{i}`` as 1/0/null)."""
    out = []
    for i, step in enumerate(question.steps):
        column = pl.col(f"s{i}")
        if isinstance(step, ExclusionStep):
            keep = column == 0
            if question.exclusion_unknown == "keep":
                keep = keep | column.is_null()
        else:
            keep = column == 1
        out.append(keep.fill_null(False))
    return out


def impact_sets(
    question: Question, steps: pl.DataFrame, sets: AnswerSets
) -> tuple[dict[str, BitMap], list[Breakdown]]:
    """Per step, the cohort with that step removed and every other kept (independent of the
    steps' order). Each contains the cohort; the patients only that step removes are an
    unpublished rest. Removing the last step gives the funnel's last ``entered``, which the
    reader knows, so that relation is stated too."""
    population = steps.filter(pl.col("in_population"))
    keeps = keep_expressions(question)
    extra: dict[str, BitMap] = {}
    breakdowns: list[Breakdown] = []
    for i in range(len(keeps)):
        kept = pl.lit(True)
        for j, keep in enumerate(keeps):
            if j != i:
                kept = kept & keep
        name = f"impact:{i}"
        extra[name] = BitMap(population.filter(kept).get_column("pid").to_list())
        breakdowns.append(Breakdown(name, ("total",)))
    if keeps:
        last = len(keeps) - 1
        breakdowns.append(Breakdown(f"impact:{last}", (f"funnel:{last + 1}:entered",)))
    return extra, breakdowns


def impact_layout(question: Question, protected: ProtectedAnswer) -> list[dict[str, Any]]:
    """Per step: the cohort without it, and how many more that is than the cohort (from the
    protected cells: withheld when either is)."""
    total = protected.total
    out = []
    for i, step in enumerate(question.steps):
        without = protected.extra[f"impact:{i}"]
        if without.suppressed or total.suppressed:
            more: dict[str, Any] = dict(WITHHELD_RATIO)
        else:
            assert without.value is not None and total.value is not None
            n = without.value - total.value
            more = {"value": n, "display": str(n), "suppressed": False}
        out.append(
            {
                "step": i,
                "label": step_label(step, i),
                "kind": "exclusion" if isinstance(step, ExclusionStep) else "inclusion",
                "without_it": without.to_dict(),
                "more_than_cohort": more,
            }
        )
    return out


# --------------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteSets:
    """Exact sets (snapshot patient ids) behind the site selection of one saved question."""

    #: Days of arrivals the entries cover (0: none observed yet).
    window_days: float
    #: Patients who first entered the cohort within the window, by site label.
    entries: Mapping[str, BitMap]
    #: Entries whose site is none of the answer's sites.
    entries_elsewhere: BitMap = field(default_factory=BitMap)
    #: The trial's recruiting sites.
    recruiting: Sequence[str] = ()
    #: Per kind of :data:`RECRUITMENT_KINDS`, per recruiting site: patients (each at one
    #: site, the site of their candidacy).
    recruitment: Mapping[str, Mapping[str, BitMap]] = field(default_factory=dict)


def site_selection_sets(
    sets: AnswerSets, sites: SiteSets
) -> tuple[dict[str, BitMap], list[Breakdown]]:
    extra: dict[str, BitMap] = {}
    breakdowns: list[Breakdown] = []
    labels = sorted(sets.by_site)
    recruiting = [s for s in sites.recruiting if s in sets.by_site]
    total = BitMap(sites.entries_elsewhere)
    for site in labels:
        extra[f"entries:{site}"] = BitMap(sites.entries.get(site, BitMap()))
        total |= extra[f"entries:{site}"]
    extra["entries:total"] = total
    if recruiting:
        extra["entries:recruiting"] = BitMap().union(*(extra[f"entries:{s}"] for s in recruiting))
        breakdowns.append(
            Breakdown("entries:recruiting", tuple(f"entries:{s}" for s in recruiting))
        )
        breakdowns.append(
            Breakdown(
                "entries:total",
                ("entries:recruiting", *(f"entries:{s}" for s in labels if s not in recruiting)),
            )
        )
    else:
        breakdowns.append(Breakdown("entries:total", tuple(f"entries:{s}" for s in labels)))
    if recruiting and sites.recruitment:
        for kind in RECRUITMENT_KINDS:
            by_site = sites.recruitment.get(kind, {})
            for site in recruiting:
                extra[f"{kind}:{site}"] = BitMap(by_site.get(site, BitMap()))
            extra[f"{kind}:total"] = BitMap().union(*(extra[f"{kind}:{s}"] for s in recruiting))
            breakdowns.append(Breakdown(f"{kind}:total", tuple(f"{kind}:{s}" for s in recruiting)))
        for where in [*recruiting, "total"]:
            breakdowns.append(
                Breakdown(f"candidates:{where}", (f"opted_out:{where}", f"limited:{where}"))
            )
            breakdowns.append(Breakdown(f"invited:{where}", (f"consented:{where}",)))
            breakdowns.append(Breakdown(f"consented:{where}", (f"enrolled:{where}",)))
    return extra, breakdowns


def series_sets(days: Mapping[str, BitMap]) -> dict[str, BitMap]:
    """The live count at the end of each day (``YYYY-MM-DD`` -> members then)."""
    return {f"series:{day}": BitMap(ids) for day, ids in days.items()}


__all__ = [
    "AGE_BANDS",
    "RECRUITMENT_KINDS",
    "SEXES",
    "SiteSets",
    "age_limits",
    "impact_layout",
    "impact_sets",
    "keep_expressions",
    "profile_layout",
    "profile_sets",
    "profile_structural",
    "ratio",
    "series_sets",
    "site_selection_sets",
    "with_extra",
]
