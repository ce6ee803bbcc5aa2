"""Disclosure control, case by case: small cells, rounding, complementary suppression over the
site/region/total hierarchy and the funnel, overlap control with a persistent registry,
determinism, and the query budget with lockout (on an injected clock).

Expected values are worked out by hand from the rules in ``feasibility.disclosure``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from pyroaring import BitMap, FrozenBitMap

from feasibility.disclosure.answer import (
    FUNNEL_FIELDS,
    AnswerSets,
    Cell,
    FunnelStepSets,
    ProtectedAnswer,
)
from feasibility.disclosure.budget import BudgetExceeded, LockedOut, QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.disclosure.tables import publications_table

EXACT = DisclosurePolicy(rounding=1, overlap_control=False)  # shown counts are the true counts
PLAIN = DisclosurePolicy(overlap_control=False)  # the default rounding, no registry
HIDDEN = Cell(None, "withheld", True)


def ids(*ranges: tuple[int, int]) -> BitMap:
    out = BitMap()
    for start, stop in ranges:
        out.add_range(start, stop)
    return out


def answer(
    sites: Mapping[str, tuple[str, int]],
    population: int = 1000,
    extra_cohort: BitMap | None = None,
) -> AnswerSets:
    """Sites with (region, count), patients numbered site after site from 0; a population of
    ``population`` and one inclusion step that keeps exactly the cohort (nobody unknown)."""
    by_site: dict[str, BitMap] = {}
    start = 0
    for name, (_, n) in sites.items():
        by_site[name] = ids((start, start + n))
        start += n
    cohort = BitMap().union(*by_site.values()) | (extra_cohort or BitMap())
    site_region = {name: region for name, (region, _) in sites.items()}
    by_region: dict[str, BitMap] = {}
    for name, region in site_region.items():
        by_region[region] = by_region.get(region, BitMap()) | by_site[name]
    return AnswerSets(cohort, by_site, site_region, by_region, simple_funnel(cohort, population))


def simple_funnel(cohort: BitMap, population: int = 1000) -> list[FunnelStepSets]:
    everyone = ids((0, population))
    return [
        FunnelStepSets(
            "population", "population", everyone, everyone, BitMap(), BitMap(), everyone
        ),
        FunnelStepSets(
            "criterion", "inclusion", everyone, cohort, everyone - cohort, BitMap(), cohort
        ),
    ]


def shown(cell: Cell) -> int | None:
    return None if cell.suppressed else cell.value


def site_view(result: ProtectedAnswer) -> dict[str, int | None]:
    return {name: shown(c) for name, c in result.by_site.items()}


def region_view(result: ProtectedAnswer) -> dict[str, int | None]:
    return {name: shown(c) for name, c in result.by_region.items()}


def determined(
    values: Mapping[str, int | None], relations: Iterable[tuple[str, list[str]]]
) -> set[str]:
    """Withheld names (value None) that the shown ones and the relations pin down."""
    unknown = sorted(k for k, v in values.items() if v is None)
    column = {k: j for j, k in enumerate(unknown)}
    rows = []
    for parent, children in relations:
        row = np.zeros(len(unknown))
        for name, sign in [(parent, 1.0), *[(c, -1.0) for c in children]]:
            if name in column:
                row[column[name]] += sign
        if row.any():
            rows.append(row)
    if not rows:
        return set()
    _, s, vt = np.linalg.svd(np.array(rows))
    null = vt[int((s > 1e-9).sum()) :]
    return {k for k, j in column.items() if null.shape[0] == 0 or np.all(np.abs(null[:, j]) < 1e-9)}


def geography(
    result: ProtectedAnswer, site_region: Mapping[str, str]
) -> tuple[dict[str, int | None], list[tuple[str, list[str]]]]:
    values: dict[str, int | None] = {"total": shown(result.total)}
    values.update({f"r:{k}": v for k, v in region_view(result).items()})
    values.update({f"s:{k}": v for k, v in site_view(result).items()})
    regions = sorted(set(site_region.values()))
    relations = [("total", [f"r:{r}" for r in regions]), ("total", [f"s:{s}" for s in site_region])]
    relations += [
        (f"r:{r}", [f"s:{s}" for s in site_region if site_region[s] == r]) for r in regions
    ]
    return values, relations


# ----------------------------------------------------------------------------------- policy


def test_policy_defaults_validation_and_dict() -> None:
    policy = DisclosurePolicy()
    assert (policy.threshold, policy.rounding, policy.suppress_zero, policy.overlap_control) == (
        10,
        5,
        True,
        True,
    )
    assert policy.to_dict() == {
        "threshold": 10,
        "rounding": 5,
        "suppress_zero": True,
        "overlap_control": True,
    }
    with pytest.raises(ValueError, match="threshold"):
        DisclosurePolicy(threshold=0)
    with pytest.raises(ValueError, match="rounding"):
        DisclosurePolicy(rounding=0)
    with pytest.raises(TypeError):
        DisclosurePolicy(threshold=True)
    with pytest.raises(TypeError):
        DisclosurePolicy(rounding=2.5)  # type: ignore[arg-type]


def test_policy_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CONCIERGE_DC_THRESHOLD": "5",
        "CONCIERGE_DC_ROUNDING": "1",
        "CONCIERGE_DC_SUPPRESS_ZERO": "false",
        "CONCIERGE_DC_OVERLAP_CONTROL": "off",
    }
    assert DisclosurePolicy.from_env(env) == DisclosurePolicy(5, 1, False, False)
    assert DisclosurePolicy.from_env({}) == DisclosurePolicy()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert DisclosurePolicy.from_env() == DisclosurePolicy(5, 1, False, False)
    with pytest.raises(ValueError, match="CONCIERGE_DC_THRESHOLD"):
        DisclosurePolicy.from_env({"CONCIERGE_DC_THRESHOLD": "ten"})
    with pytest.raises(ValueError, match="at least 1"):
        DisclosurePolicy.from_env({"CONCIERGE_DC_ROUNDING": "0"})
    with pytest.raises(ValueError, match="boolean"):
        DisclosurePolicy.from_env({"CONCIERGE_DC_SUPPRESS_ZERO": "maybe"})


# -------------------------------------------------------------------- rules 1 and 2, by hand


@pytest.mark.parametrize(
    ("n", "display"),
    [
        (0, "withheld"),  # zero suppressed too (suppress_zero)
        (1, "withheld"),
        (9, "withheld"),
        (10, "10"),
        (12, "10"),  # 2.4 -> 2
        (13, "15"),  # 2.6 -> 3
        (17, "15"),
        (18, "20"),
        (22, "20"),
        (23, "25"),
        (1232, "1230"),
        (1233, "1235"),
    ],
)
def test_small_cells_and_rounding_defaults(n: int, display: str) -> None:
    result, _ = protect(answer({"A": ("North", n)}, population=2000), PLAIN, None, "Acme", "q")
    assert result.total.display == display
    assert result.total.suppressed == (display == "withheld")
    assert result.total.value == (None if display == "withheld" else int(display))
    # a region with a single site, and the site: the same set, so the same cell
    assert result.by_site["A"] == result.by_region["North"] == result.total


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # ties round half up
        (DisclosurePolicy(rounding=10), {14: 10, 15: 20, 25: 30, 24: 20}),
        # never rounded below the threshold: 12 -> 10 would look like a small cell, so 15
        (DisclosurePolicy(threshold=12, rounding=5), {12: 15, 13: 15, 17: 15, 18: 20}),
        (DisclosurePolicy(threshold=10, rounding=3), {10: 12, 11: 12, 13: 12, 14: 15}),
        (DisclosurePolicy(rounding=1), {10: 10, 11: 11, 999: 999}),
    ],
)
def test_rounding_half_up_and_floor(policy: DisclosurePolicy, expected: dict[int, int]) -> None:
    for n, value in expected.items():
        assert policy.rounded(n) == value, n
        assert not policy.is_small(n)
    assert policy.floor == -(-policy.threshold // policy.rounding) * policy.rounding


def test_zero_shown_when_not_suppressed() -> None:
    policy = DisclosurePolicy(suppress_zero=False, overlap_control=False)
    assert not policy.is_small(0) and policy.is_small(1) and policy.is_small(9)
    result, _ = protect(answer({"A": ("North", 0)}), policy, None, "Acme", "q")
    assert result.total == Cell(0, "0", False)


def test_population_step_structural_zeros_are_shown() -> None:
    result, _ = protect(answer({"A": ("North", 40)}), PLAIN, None, "Acme", "q")
    population = result.funnel[0]
    assert population["failed"] == population["unknown"] == Cell(0, "0", False)
    assert population["entered"] == population["passed"] == population["remaining"]
    assert population["entered"] == Cell(1000, "1000", False)


# ------------------------------------------------------------ rule 3, the geographical tables


def test_one_small_site_hides_its_only_sibling() -> None:
    sites = {"A": ("North", 50), "B": ("North", 3), "C": ("South", 40), "D": ("South", 30)}
    result, audit = protect(answer(sites), EXACT, None, "Acme", "q")
    assert site_view(result) == {"A": None, "B": None, "C": 40, "D": 30}
    assert region_view(result) == {"North": 53, "South": 70}
    assert shown(result.total) == 123
    # primary: B, and the criterion step's unknown (0); secondary: A
    assert (audit.primary_suppressed, audit.secondary_suppressed) == (2, 1)
    # with the default rounding
    rounded, _ = protect(answer(sites), PLAIN, None, "Acme", "q")
    assert site_view(rounded) == {"A": None, "B": None, "C": 40, "D": 30}
    assert region_view(rounded) == {"North": 55, "South": 70}
    assert rounded.total.display == "125"


def test_the_smallest_sibling_is_withheld_then_by_name() -> None:
    sites = {"A": ("North", 50), "E": ("North", 20), "B": ("North", 3), "C": ("South", 40)}
    result, _ = protect(answer(sites), EXACT, None, "Acme", "q")
    assert site_view(result) == {"A": 50, "B": None, "C": 40, "E": None}
    tie = {"Z": ("North", 20), "Y": ("North", 20), "B": ("North", 3), "C": ("South", 40)}
    result, _ = protect(answer(tie), EXACT, None, "Acme", "q")
    assert site_view(result) == {"B": None, "C": 40, "Y": None, "Z": 20}


def test_small_cells_summing_to_a_small_group_need_a_third() -> None:
    # B and E are small; together 7, still small: the smallest other site (F) joins them
    sites = {"A": ("North", 50), "F": ("North", 30), "B": ("North", 3), "E": ("North", 4)}
    result, _ = protect(answer(sites), EXACT, None, "Acme", "q")
    assert site_view(result) == {"A": 50, "B": None, "E": None, "F": None}
    assert shown(result.total) == 87


def test_a_region_with_a_single_site() -> None:
    sites = {"A": ("North", 50), "C": ("South", 4), "D": ("West", 30), "E": ("West", 25)}
    result, _ = protect(answer(sites), EXACT, None, "Acme", "q")
    # South is its site C: small, so both; the total then needs another region withheld.
    # North (a single site too) rather than West: withholding West would leave West alone
    # unknown in West = D + E.
    assert result.by_region["South"] == result.by_site["C"] == HIDDEN
    assert result.by_region["North"] == result.by_site["A"] == HIDDEN
    assert region_view(result)["West"] == 55
    assert site_view(result) == {"A": None, "C": None, "D": 30, "E": 25}
    assert shown(result.total) == 109


def test_a_hidden_region_hides_another_region() -> None:
    sites = {"A": ("North", 5), "B": ("North", 4), "C": ("South", 40), "D": ("West", 30)}
    sites["E"] = ("West", 20)
    result, _ = protect(answer(sites), EXACT, None, "Acme", "q")
    assert region_view(result) == {"North": None, "South": None, "West": 50}
    assert site_view(result) == {"A": None, "B": None, "C": None, "D": 30, "E": 20}
    assert shown(result.total) == 99


@pytest.mark.parametrize(
    "sites",
    [
        {"A": ("North", 30), "B": ("North", 3), "C": ("South", 40)},
        {"A": ("North", 30), "B": ("North", 3), "C": ("South", 2), "D": ("South", 60)},
        {"A": ("North", 12), "B": ("North", 1), "C": ("South", 9), "D": ("East", 70)},
        {"A": ("North", 25), "B": ("North", 0), "C": ("South", 33), "D": ("South", 0)},
    ],
)
def test_no_hidden_site_is_derivable_from_total_region_and_other_sites(
    sites: dict[str, tuple[str, int]],
) -> None:
    sets = answer(sites)
    result, _ = protect(sets, EXACT, None, "Acme", "q")
    values, relations = geography(result, sets.site_region)
    assert not determined(values, relations)
    for region in set(sets.site_region.values()):
        if shown(result.by_region[region]) is not None:
            withheld = [
                s
                for s, r in sets.site_region.items()
                if r == region and shown(result.by_site[s]) is None
            ]
            assert len(withheld) != 1
            group = sum(len(sets.by_site[s]) for s in withheld)
            assert not withheld or group >= 10


def test_all_withheld_cells_look_alike() -> None:
    """Primary and complementary cells are marked the same: a distinct mark for complementary
    cells would say "at least 10" and bound the small cell they protect."""
    sites = {"A": ("North", 50), "B": ("North", 3), "C": ("South", 40)}
    result, audit = protect(answer(sites), PLAIN, None, "Acme", "q")
    assert audit.primary_suppressed == 2 and audit.secondary_suppressed == 1  # B, unknown; A
    assert result.by_site["A"] == result.by_site["B"] == Cell(None, "withheld", True)


def test_patients_without_a_site_are_a_group_too() -> None:
    # 3 cohort members have no site: total - regions would show them
    sets = answer({"A": ("North", 60), "B": ("North", 40)}, extra_cohort=ids((900, 903)))
    result, _ = protect(sets, EXACT, None, "Acme", "q")
    total, region = shown(result.total), shown(result.by_region["North"])
    assert total is None or region is None or total - region >= 10


# -------------------------------------------------------------------------------- the funnel


def two_step_funnel() -> AnswerSets:
    everyone = ids((0, 200))
    step1_passed = ids((0, 150))
    # an exclusion that keeps unknowns: not excluded 0-119, excluded 120-144, unknown 145-149
    passed2, failed2, unknown2 = ids((0, 120)), ids((120, 145)), ids((145, 150))
    cohort = passed2 | unknown2
    funnel = [
        FunnelStepSets(
            "population", "population", everyone, everyone, BitMap(), BitMap(), everyone
        ),
        FunnelStepSets(
            "inclusion",
            "inclusion",
            everyone,
            step1_passed,
            ids((150, 196)),
            ids((196, 200)),
            step1_passed,
        ),
        FunnelStepSets("exclusion", "exclusion", step1_passed, passed2, failed2, unknown2, cohort),
    ]
    by_site = {"X": ids((0, 100)), "Y": ids((100, 120), (145, 150))}
    return AnswerSets(cohort, by_site, {"X": "North", "Y": "North"}, {"North": cohort}, funnel)


def funnel_view(result: ProtectedAnswer) -> list[list[int | None]]:
    return [[shown(step[f]) for f in FUNNEL_FIELDS] for step in result.funnel]


def test_funnel_cells_are_protected_alike() -> None:
    result, _ = protect(two_step_funnel(), EXACT, None, "Acme", "q")
    assert funnel_view(result) == [
        [200, 200, 0, 0, 200],
        # unknown (4) is small: failed joins it (a part, rather than the subtotal passed)
        [200, 150, None, None, 150],
        # unknown (5) is small, and failed (25) = entered - remaining whatever is withheld, so
        # withholding failed would protect nothing: passed joins it instead
        [150, None, 25, None, 125],
    ]
    assert [step["label"] for step in result.funnel] == ["population", "inclusion", "exclusion"]
    assert [step["kind"] for step in result.funnel] == ["population", "inclusion", "exclusion"]
    # remaining of a step is entered of the next, the last remaining is the total
    assert result.funnel[0]["remaining"] == result.funnel[1]["entered"]
    assert result.funnel[1]["remaining"] == result.funnel[2]["entered"]
    assert result.funnel[2]["remaining"] == result.total
    assert site_view(result) == {"X": 100, "Y": 25}


def test_funnel_relations_never_leave_one_cell_or_a_small_group() -> None:
    result, _ = protect(two_step_funnel(), EXACT, None, "Acme", "q")
    values: dict[str, int | None] = {}
    relations: list[tuple[str, list[str]]] = []
    for i, step in enumerate(result.funnel):
        values.update({f"{i}:{f}": shown(step[f]) for f in FUNNEL_FIELDS})
        relations.append((f"{i}:entered", [f"{i}:passed", f"{i}:failed", f"{i}:unknown"]))
        if i:
            relations.append((f"{i - 1}:remaining", [f"{i}:entered"]))
    relations.append(("2:remaining", ["2:passed", "2:unknown"]))  # keeps unknowns
    assert not determined(values, relations)


def test_inconsistent_sets_are_refused() -> None:
    good = answer({"A": ("North", 30), "B": ("South", 20)})
    overlapping = dict(good.by_site, B=good.by_site["B"] | ids((0, 1)))
    with pytest.raises(ValueError, match="sites overlap"):
        protect(
            AnswerSets(good.cohort, overlapping, good.site_region, good.by_region, good.funnel),
            EXACT,
            None,
            "o",
            "q",
        )
    with pytest.raises(ValueError, match="no region"):
        protect(
            AnswerSets(good.cohort, good.by_site, {"A": "North"}, good.by_region, good.funnel),
            EXACT,
            None,
            "o",
            "q",
        )
    wrong_region = dict(good.by_region, North=ids((0, 5)))
    with pytest.raises(ValueError, match="union of its sites"):
        protect(
            AnswerSets(good.cohort, good.by_site, good.site_region, wrong_region, good.funnel),
            EXACT,
            None,
            "o",
            "q",
        )
    step = good.funnel[1]
    broken = FunnelStepSets(
        step.label,
        "inclusion",
        step.entered,
        step.passed,
        step.failed - ids((999, 1000)),
        step.unknown,
        step.remaining,
    )
    with pytest.raises(ValueError, match="partition"):
        protect(
            AnswerSets(
                good.cohort,
                good.by_site,
                good.site_region,
                good.by_region,
                [good.funnel[0], broken],
            ),
            EXACT,
            None,
            "o",
            "q",
        )
    detached = FunnelStepSets(
        step.label, "inclusion", ids((0, 10)), ids((0, 10)), BitMap(), BitMap(), ids((0, 10))
    )
    with pytest.raises(ValueError, match="previous step"):
        protect(
            AnswerSets(
                good.cohort,
                good.by_site,
                good.site_region,
                good.by_region,
                [good.funnel[0], detached],
            ),
            EXACT,
            None,
            "o",
            "q",
        )


# ---------------------------------------------------------------- rules 4 and 6, the registry


def test_overlap_control_needs_a_registry() -> None:
    with pytest.raises(ValueError, match="PublicationRegistry"):
        protect(answer({"A": ("North", 30)}), DisclosurePolicy(), None, "Acme", "q")


def test_repeating_a_question_gives_the_identical_answer() -> None:
    sets = two_step_funnel()
    assert protect(sets, EXACT, None, "Acme", "q") == protect(sets, EXACT, None, "Acme", "q")
    registry = PublicationRegistry("sqlite://")
    policy = DisclosurePolicy(rounding=1)
    first, audit = protect(sets, policy, registry, "Acme", "q")
    size = len(registry)
    for org in ("Acme", "Rival"):
        again, repeat = protect(sets, policy, registry, org, "q")
        assert again == first
        assert repeat.repeated == repeat.cells - 2  # all but the two structural zeros
        assert repeat.overlap_hits == repeat.primary_suppressed == repeat.secondary_suppressed == 0
    assert len(registry) == size  # an identical set is recorded once
    assert audit.repeated == 0


def test_near_sets_get_the_earlier_publication_and_the_output_does_not_say_so() -> None:
    registry = PublicationRegistry("sqlite://")
    policy = DisclosurePolicy(rounding=1)
    sites = {"A": ("North", 50), "C": ("South", 40), "D": ("South", 30)}
    first, first_audit = protect(answer(sites), policy, registry, "Acme", "q1")
    assert shown(first.total) == 120 and shown(first.by_site["A"]) == 50
    # three fewer patients at A (by a colluding sponsor): the differencing attack
    fewer = dict(sites, A=("North", 47))
    second, audit = protect(answer(fewer), policy, registry, "Rival", "q2")
    assert second.total == first.total  # 117 true, shown as before
    assert second.by_site["A"] == first.by_site["A"]  # 47 true
    assert second.by_region["North"] == first.by_region["North"]
    assert second.by_site["C"] == first.by_site["C"]
    assert audit.overlap_hits > 0 and first_audit.overlap_hits == 0
    # nothing in the sponsor's view tells the two apart, and the rules are the same
    assert json.dumps(second.to_dict(), sort_keys=True).count("overlap") == json.dumps(
        first.to_dict(), sort_keys=True
    ).count("overlap")
    assert second.rules == first.rules
    view = {k: v for k, v in second.to_dict().items() if k not in ("rules", "policy")}
    assert "overlap" not in json.dumps(view)


def test_a_set_near_a_withheld_one_is_withheld() -> None:
    registry = PublicationRegistry("sqlite://")
    policy = DisclosurePolicy(rounding=1)
    sites = {"A": ("North", 50), "B": ("North", 3), "C": ("South", 40)}
    first, _ = protect(answer(sites), policy, registry, "Acme", "q1")
    assert first.by_site["A"].suppressed  # complementary
    # A, less two patients, asked as its own question
    alone = answer({"A": ("North", 48)})
    second, audit = protect(alone, policy, registry, "Acme", "q2")
    assert second.total.suppressed and second.by_site["A"].suppressed
    assert audit.overlap_hits > 0


def test_the_nearest_then_the_earliest_neighbour_is_copied() -> None:
    registry = PublicationRegistry("sqlite://")
    policy = DisclosurePolicy(threshold=10, rounding=1)
    x1, x2 = ids((0, 100)), ids((8, 108))  # 16 apart: both published fresh
    for n, cohort in enumerate((x1, x2)):
        sets = AnswerSets(
            cohort, {"A": cohort}, {"A": "N"}, {"N": cohort}, simple_funnel(cohort, 500)
        )
        protect(sets, policy, registry, "Acme", f"q{n}")
    first = registry.match(x1, 10)
    second = registry.match(x2, 10)
    assert first is not None and first.exact and second is not None and second.exact
    nearer_first = registry.match(ids((3, 104)), 10)  # 7 from x1, 9 from x2
    nearer_second = registry.match(ids((5, 106)), 10)  # 9 from x1, 7... from x2
    tie = registry.match(ids((4, 104)), 10)  # 8 from each
    assert nearer_first is not None and nearer_first.entry.id == first.entry.id
    assert nearer_second is not None and nearer_second.entry.id == second.entry.id
    assert tie is not None and tie.entry.id == first.entry.id
    assert registry.match(ids((20, 120)), 10) is None  # 20 and 12 away: fresh


def site_restriction_pair() -> tuple[AnswerSets, AnswerSets]:
    """Q1: 84 patients at four sites; its last criterion drops 6, so the total is withheld (with
    the cohort), S0 (1 patient) is small and S1 protects it. Q2: Q1 restricted to site S1, as
    one more criterion: its "failed" is everyone at S0, S2 and S3."""
    everyone, first, cohort = ids((0, 200)), ids((0, 90)), ids((0, 84))
    funnel = [
        FunnelStepSets(
            "population", "population", everyone, everyone, BitMap(), BitMap(), everyone
        ),
        FunnelStepSets("first", "inclusion", everyone, first, everyone - first, BitMap(), first),
        FunnelStepSets("second", "inclusion", first, cohort, first - cohort, BitMap(), cohort),
    ]
    sites = {"S0": ids((0, 1)), "S1": ids((1, 19)), "S2": ids((19, 55)), "S3": ids((55, 84))}
    q1 = AnswerSets(cohort, sites, {s: "North" for s in sites}, {"North": cohort}, funnel)
    s1 = sites["S1"]
    restricted = [
        *funnel,
        FunnelStepSets("at S1", "inclusion", cohort, s1, cohort - s1, BitMap(), s1),
    ]
    only_s1 = {s: (b if s == "S1" else BitMap()) for s, b in sites.items()}
    q2 = AnswerSets(s1, only_s1, q1.site_region, {"North": s1}, restricted)
    return q1, q2


def test_relations_of_earlier_answers_are_taken_into_account() -> None:
    q1, q2 = site_restriction_pair()
    registry = PublicationRegistry("sqlite://")
    policy = DisclosurePolicy(rounding=1)
    first, _ = protect(q1, policy, registry, "Acme", "q1")
    assert shown(first.total) is None
    assert site_view(first) == {"S0": None, "S1": None, "S2": 36, "S3": 29}
    second, _ = protect(q2, policy, registry, "Rival", "q2")
    assert second.total.suppressed and second.by_site["S1"].suppressed
    # Q2 alone would show failed = 66, and 66 - 36 - 29 = 1 = S0: Q1's relation total = S0 + S1
    # + S2 + S3 is recorded, and it involves two sets Q2 publishes again (total, S1)
    assert second.funnel[3]["failed"].suppressed
    values = {"q1:total": None, "q2:failed": shown(second.funnel[3]["failed"])}
    values.update({f"q1:{s}": v for s, v in site_view(first).items()})
    relations = [
        ("q1:total", ["q1:S0", "q1:S1", "q1:S2", "q1:S3"]),
        ("q1:total", ["q1:S1", "q2:failed"]),  # what Q2's last step says (unknown: 0)
        ("q2:failed", ["q1:S0", "q1:S2", "q1:S3"]),  # known to whoever wrote Q2
    ]
    assert not determined(values, relations)


def test_registry_persists_across_instances(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dc.sqlite'}"
    policy = DisclosurePolicy(rounding=1)
    sites = {"A": ("North", 50), "B": ("North", 3), "C": ("South", 40)}
    registry = PublicationRegistry(url)
    first, _ = protect(answer(sites), policy, registry, "Acme", "q1")
    recorded = len(registry)
    registry.close()

    reopened = PublicationRegistry(url)
    assert len(reopened) == recorded
    again, audit = protect(answer(sites), policy, reopened, "Rival", "q1")
    assert again == first and audit.repeated == audit.cells - 2
    near, audit = protect(answer(dict(sites, C=("South", 37))), policy, reopened, "Rival", "q2")
    assert near.by_site["C"] == first.by_site["C"] and audit.overlap_hits > 0
    with reopened.engine.connect() as conn:
        rows = conn.execute(publications_table.select()).all()
    assert {row.org for row in rows} == {"Acme", "Rival"}
    for row in rows:
        assert len(FrozenBitMap.deserialize(row.bitmap)) == row.cardinality
        assert (row.value is None) == row.hidden
        assert row.display == ("withheld" if row.hidden else str(row.value))
    reopened.close()


def test_recorded_relations_persist(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dc.sqlite'}"
    q1, q2 = site_restriction_pair()
    policy = DisclosurePolicy(rounding=1)
    registry = PublicationRegistry(url)
    protect(q1, policy, registry, "Acme", "q1")
    registry.close()
    reopened = PublicationRegistry(url)
    second, _ = protect(q2, policy, reopened, "Rival", "q2")
    assert second.funnel[3]["failed"].suppressed
    reopened.close()


def test_registry_lookups_stay_fast_with_thousands_of_entries() -> None:
    registry = PublicationRegistry("sqlite://")
    rng = np.random.default_rng(7)
    rows: list[dict[str, Any]] = []
    sets: list[BitMap] = []
    for i in range(4000):
        size = int(rng.integers(20, 400))
        bits = BitMap(rng.choice(100_000, size=size, replace=False).tolist())
        sets.append(bits)
        rows.append(
            {
                "org": "Acme",
                "fingerprint": f"q{i}",
                "cardinality": len(bits),
                "bitmap": bits.serialize(),
                "value": len(bits),
                "display": str(len(bits)),
                "hidden": False,
                "copied_from": None,
                "created_at": datetime(2026, 1, 1, tzinfo=UTC),
            }
        )
    with registry.engine.begin() as conn:
        conn.execute(publications_table.insert(), rows)
    registry.refresh()
    assert len(registry) == 4000
    probes = [BitMap(rng.choice(100_000, size=200, replace=False).tolist()) for _ in range(300)]
    started = time.perf_counter()
    for probe in probes:
        registry.match(probe, 10)
    assert time.perf_counter() - started < 1.0
    known = sets[17]
    match = registry.match(known, 10)
    assert match is not None and match.exact
    near = known.copy()
    near.remove(known.min())
    match = registry.match(near, 10)
    assert match is not None and not match.exact and match.distance == 1


# ------------------------------------------------------------------------------ the output


def test_rules_in_force_and_json() -> None:
    result, _ = protect(
        answer({"A": ("North", 50), "B": ("North", 3)}),
        DisclosurePolicy(),
        PublicationRegistry(),
        "Acme",
        "q",
    )
    assert result.rules[:4] == [
        "counts under 10 suppressed (zero counts too)",
        "rounded to the nearest 5",
        "complementary suppression across site, region and total",
        "funnel cells protected alike",
    ]
    assert any(
        r.startswith("overlap control: answers to questions whose cohorts differ by fewer than 10")
        for r in result.rules
    )
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"total", "by_site", "by_region", "funnel", "rules", "policy", "notes"}
    assert data["policy"] == DisclosurePolicy().to_dict()
    assert set(data["funnel"][1]) == {"label", "kind", "note", *FUNNEL_FIELDS}
    assert data["by_site"]["B"] == {"value": None, "display": "withheld", "suppressed": True}
    plain = DisclosurePolicy(rounding=1, overlap_control=False).rules()
    assert not any("rounded" in r or "overlap" in r for r in plain)


def test_audit_counts_are_for_the_audit_log() -> None:
    _, audit = protect(answer({"A": ("North", 50), "B": ("North", 3)}), EXACT, None, "Acme", "q")
    assert audit.to_dict() == {
        "cells": 14,  # total, 1 region, 2 sites, 2 funnel steps of 5
        "primary_suppressed": 1 + 1,  # B, and unknown (0) of the criterion step
        "secondary_suppressed": 1,
        "overlap_hits": 0,
        "repeated": 0,
        "unprotectable": 0,
        "republished": False,
    }
    assert not audit.overlap_fired


# -------------------------------------------------------------------------- rule 7, budget


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_budget_per_rolling_window() -> None:
    clock = Clock()
    budget = QueryBudget("sqlite://", max_queries=3, window=timedelta(hours=1), clock=clock)
    for used in (1, 2, 3):
        status = budget.charge("Acme")
        assert (status.used, status.remaining, status.locked) == (used, 3 - used, False)
        clock.advance(60)
    with pytest.raises(BudgetExceeded) as exc:
        budget.charge("Acme")
    assert exc.value.retry_after_seconds == 3600 - 180  # when the first question leaves the window
    assert not isinstance(exc.value, LockedOut)
    assert budget.status("Acme").used == 3  # the refused question was not counted
    assert budget.charge("Rival").used == 1  # per organisation
    clock.advance(3600 - 180 + 1)
    assert budget.charge("Acme").used == 3  # the first one has rolled out
    status = budget.status("Acme")
    assert status.to_dict() == {
        "org": "Acme",
        "used": 3,
        "limit": 3,
        "remaining": 0,
        "window_seconds": 3600,
        "locked": False,
        "retry_after_seconds": status.retry_after_seconds,
    }


def test_budget_persists_and_reads_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'budget.sqlite'}"
    clock = Clock()
    env = {"CONCIERGE_DC_QUERY_BUDGET": "2", "CONCIERGE_DC_LOCKOUT_AFTER": "1"}
    budget = QueryBudget.from_env(url, clock=clock, environ=env)
    assert (budget.max_queries, budget.lockout_after, budget.window) == (2, 1, 86400)
    budget.charge("Acme")
    budget.close()
    again = QueryBudget.from_env(url, clock=clock, environ=env)
    again.charge("Acme")
    with pytest.raises(BudgetExceeded):
        again.charge("Acme")
    defaults = QueryBudget.from_env(url, environ={})
    assert (defaults.max_queries, defaults.lockout_after) == (200, 20)


def test_lockout_after_repeated_overlap_until_an_admin_unlocks() -> None:
    clock = Clock()
    registry = PublicationRegistry("sqlite://", clock=clock)
    budget = QueryBudget(registry.engine, max_queries=100, lockout_after=2, clock=clock)
    policy = DisclosurePolicy(rounding=1)
    base = {"A": ("North", 80), "C": ("South", 60)}
    budget.charge("Mallory")
    protect(answer(base), policy, registry, "Mallory", "q0")
    for k in (1, 2, 3):  # each question differs from the first by k patients at A
        budget.charge("Mallory")
        clock.advance(10)
        _, audit = protect(
            answer(dict(base, A=("North", 80 - k))), policy, registry, "Mallory", f"q{k}"
        )
        assert audit.overlap_fired
    assert budget.overlap_fires("Mallory") == 3  # for the audit log only
    assert "overlap" not in json.dumps(budget.status("Mallory").to_dict())
    with pytest.raises(LockedOut) as exc:
        budget.charge("Mallory")
    assert exc.value.retry_after_seconds == 86400 and "administrator" in str(exc.value)
    assert budget.status("Mallory").locked
    assert not budget.status("Acme").locked and budget.charge("Acme").used == 1
    clock.advance(2 * 86400)  # the lock does not expire by itself
    with pytest.raises(LockedOut):
        budget.charge("Mallory")
    budget.unlock("Mallory")
    assert budget.overlap_fires("Mallory") == 0
    assert budget.charge("Mallory").locked is False


def test_budget_validation() -> None:
    with pytest.raises(ValueError):
        QueryBudget(max_queries=0)
    with pytest.raises(ValueError):
        QueryBudget(window=0)
    with pytest.raises(ValueError):
        QueryBudget(lockout_after=-1)


def test_budget_exceeded_is_an_exception_with_an_int() -> None:
    exc = BudgetExceeded(42)
    assert exc.retry_after_seconds == 42 and "42" in str(exc)
    assert isinstance(LockedOut(10), BudgetExceeded)


# --------------------------------------------- rule 4 and rule 7: repeats are not attacks


def drifted(i: int) -> AnswerSets:
    """The cohort of :func:`answer` with sites A 50, C 40, D 30, after ``i`` polls of a live
    question whose data drifts without the published answer changing: one patient of A has left
    the cohort and one newcomer (id 500 + i) has joined A, so every set of the answer is a new
    set, two patients from the first poll's."""
    base = answer({"A": ("North", 50), "C": ("South", 40), "D": ("South", 30)})
    if i == 0:
        return base
    site_a = (base.by_site["A"] - BitMap([i % 50])) | BitMap([500 + i])
    cohort = (base.cohort - BitMap([i % 50])) | BitMap([500 + i])
    by_site = dict(base.by_site, A=site_a)
    by_region = dict(base.by_region, North=site_a)
    return AnswerSets(cohort, by_site, base.site_region, by_region, simple_funnel(cohort))


def budget_and_registry(lockout_after: int = 20) -> tuple[PublicationRegistry, QueryBudget]:
    clock = Clock()
    registry = PublicationRegistry("sqlite://", clock=clock)
    budget = QueryBudget(registry.engine, max_queries=999, lockout_after=lockout_after, clock=clock)
    return registry, budget


@pytest.mark.parametrize("kind", ["saved (the data drifts)", "ad hoc (the same sets)"])
def test_a_hundred_repeats_of_an_unchanged_answer_are_no_overlap_hits(kind: str) -> None:
    """The demo polls its saved question every 5 s: re-asking a question whose published answer
    has not changed tells the sponsor nothing new, so it is neither an overlap hit (which would
    lock the sponsor out after 20) nor a reason to grow the registry."""
    registry, budget = budget_and_registry()
    policy = DisclosurePolicy()
    first, audit = protect(drifted(0), policy, registry, "Demo Pharma", "t2dm")
    assert audit.overlap_hits == 0
    size = len(registry)
    drifting = kind.startswith("saved")
    for i in range(1, 101):
        sets = drifted(i) if drifting else drifted(0)
        again, audit = protect(sets, policy, registry, "Demo Pharma", "t2dm")
        assert again == first
        assert audit.overlap_hits == 0 and not audit.overlap_fired and audit.republished
        budget.charge("Demo Pharma")  # not locked out
    assert budget.overlap_fires("Demo Pharma") == 0
    assert len(registry) == size


def test_a_genuinely_different_overlapping_set_is_still_a_hit() -> None:
    """The same drifted sets asked as another question, or by another organisation, are the
    differencing attack: overlap control fires and counts towards the lockout."""
    registry, budget = budget_and_registry(lockout_after=2)
    policy = DisclosurePolicy()
    first, _ = protect(drifted(0), policy, registry, "Acme", "q0")
    for k in (1, 2, 3):  # another question each time, two patients away from the first
        budget.charge("Acme")
        near, audit = protect(drifted(k), policy, registry, "Acme", f"q{k}")
        assert near.total == first.total  # the copied publication
        assert audit.overlap_fired
    with pytest.raises(LockedOut):
        budget.charge("Acme")
    # another organisation asking the first question's drifted sets: also a hit
    _, audit = protect(drifted(7), policy, registry, "Rival", "q0")
    assert audit.overlap_fired


def test_a_changed_answer_to_the_same_question_counts_only_news() -> None:
    """When a re-asked question's answer changes (a site crossed the threshold), the cells copied
    from neighbours whose value the sponsor already saw for that cell are no hits; the answer is
    recorded again, so the next identical repeat is a repeat."""
    registry, _ = budget_and_registry()
    policy = DisclosurePolicy(rounding=1)
    sites = {"A": ("North", 50), "C": ("South", 40), "D": ("South", 30)}
    first, _ = protect(answer(sites), policy, registry, "Acme", "q")
    # a new site E with 12 patients appears (ids 120..132): a changed answer; every old cell is
    # the same set as before or (the funnel's failed) 12 away, so fresh
    grown = answer(dict(sites, E=("South", 12)))
    second, audit = protect(grown, policy, registry, "Acme", "q")
    assert second != first and shown(second.by_site["E"]) == 12
    assert audit.overlap_hits == 0
    size = len(registry)
    third, audit = protect(grown, policy, registry, "Acme", "q")
    assert third == second and audit.repeated == audit.cells - 2 and len(registry) == size


def test_the_last_answer_per_question_survives_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dc.sqlite'}"
    policy = DisclosurePolicy()
    registry = PublicationRegistry(url)
    first, _ = protect(drifted(0), policy, registry, "Demo Pharma", "t2dm")
    registry.close()
    reopened = PublicationRegistry(url)
    size = len(reopened)
    again, audit = protect(drifted(5), policy, reopened, "Demo Pharma", "t2dm")
    assert again == first and not audit.overlap_fired and len(reopened) == size
    reopened.close()


def test_an_ad_hoc_and_a_live_answer_to_the_same_question_alternating_are_no_hits() -> None:
    """The demo asks its question ad hoc, then polls it as a saved question: two answers to one
    fingerprint (snapshot and stream), each drifting on its own. Neither counts as differencing
    once the sponsor has seen its values."""
    registry, budget = budget_and_registry()
    policy = DisclosurePolicy()

    def live(i: int) -> AnswerSets:  # the stream's view: ten fewer at A, so published fresh
        sets = drifted(i)
        fewer = BitMap(range(40, 50))
        by_site = dict(sets.by_site, A=sets.by_site["A"] - fewer)
        by_region = dict(sets.by_region, North=by_site["A"])
        cohort = sets.cohort - fewer
        return AnswerSets(cohort, by_site, sets.site_region, by_region, simple_funnel(cohort))

    first_ad_hoc, _ = protect(drifted(0), policy, registry, "Demo Pharma", "t2dm")
    first_live, _ = protect(live(0), policy, registry, "Demo Pharma", "t2dm")
    assert first_live != first_ad_hoc
    for i in range(1, 51):
        ad_hoc, audit = protect(drifted(i), policy, registry, "Demo Pharma", "t2dm")
        assert ad_hoc == first_ad_hoc and not audit.overlap_fired
        again, audit = protect(live(i), policy, registry, "Demo Pharma", "t2dm")
        assert again == first_live and not audit.overlap_fired
    assert budget.overlap_fires("Demo Pharma") == 0


# ------------------------------------------------------- what a withheld cell reads (issue 11)


def one_step(population: int, passed: int) -> AnswerSets:
    """A population and one inclusion step that ``passed`` patients pass (the rest fail)."""
    everyone, cohort = ids((0, population)), ids((0, passed))
    return AnswerSets(
        cohort=cohort,
        by_site={"A": cohort},
        site_region={"A": "North"},
        by_region={"North": cohort},
        funnel=[
            FunnelStepSets(
                "population", "population", everyone, everyone, BitMap(), BitMap(), everyone
            ),
            FunnelStepSets(
                "diabetes", "inclusion", everyone, cohort, everyone - cohort, BitMap(), cohort
            ),
        ],
    )


def test_a_large_complementary_cell_reads_withheld_not_under_the_threshold() -> None:
    # the funnel row "failed <10" that was really 116: 4 pass (small), so failed (116) is
    # withheld too, else entered - passed - unknown would give the 4 away
    result, _ = protect(one_step(120, 4), EXACT, None, "Acme", "q")
    step = result.funnel[1]
    assert step["entered"] == Cell(120, "120", False)
    assert step["passed"] == step["failed"] == Cell(None, "withheld", True)
    # all withheld cells still look alike, small (4) or large (116)
    assert {step[f].display for f in ("passed", "failed", "unknown", "remaining")} == {"withheld"}
    assert (
        step["note"] == "passed, failed, unknown and remaining are withheld to protect small counts"
    )
    assert result.funnel[0]["note"] is None
    assert 'funnel step "diabetes": passed, failed, unknown and remaining are withheld' in " ".join(
        result.notes
    )


def test_a_large_site_withheld_to_protect_a_small_one_reads_withheld_and_is_said_in_words() -> None:
    sites = {"A": ("North", 3), "B": ("North", 116), "C": ("South", 60)}
    result, _ = protect(answer(sites), EXACT, None, "Acme", "q")
    assert result.by_site["B"] == result.by_site["A"] == Cell(None, "withheld", True)
    assert result.by_site["C"] == Cell(60, "60", False)
    assert result.by_region["North"] == Cell(119, "119", False)
    assert result.notes[0] == "2 of 3 sites are withheld to protect small counts"
    assert not any("region" in note for note in result.notes)
    assert any('every withheld cell reads "withheld", whatever its size' in r for r in result.rules)
    data = result.to_dict()
    assert data["notes"] == result.notes
    assert "<10" not in json.dumps(data)


def test_publications_recorded_as_under_the_threshold_read_withheld_again(tmp_path: Path) -> None:
    # a registry written before "withheld" holds "<10" for every hidden publication
    url = f"sqlite:///{tmp_path / 'dc.sqlite'}"
    policy = DisclosurePolicy(rounding=1)
    sites = {"A": ("North", 50), "B": ("North", 3), "C": ("South", 40)}
    registry = PublicationRegistry(url)
    first, _ = protect(answer(sites), policy, registry, "Acme", "q1")
    with registry.engine.begin() as conn:
        conn.execute(
            publications_table.update().where(publications_table.c.hidden).values(display="<10")
        )
        conn.execute(sa.text("UPDATE dc_answers SET answer = replace(answer, 'withheld', '<10')"))
    registry.close()
    reopened = PublicationRegistry(url)
    again, audit = protect(answer(sites), policy, reopened, "Acme", "q1")
    assert again == first and "<10" not in json.dumps(again.to_dict())
    assert audit.overlap_hits == 0
    reopened.close()
