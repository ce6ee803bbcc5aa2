"""Attacks on the sponsor workspace's outputs: the cohort profile, criterion impact, site
arrivals and recruitment (rates), and the live count's daily series, each published together
with the question's funnel, sites and regions, and all of them asked one after the other.

The attacker knows what each output means: the profile's cells add up to their sex and to the
cohort (with a rest of patients without a birth date), the cohort without a step contains the
cohort (without the last step it *is* that step's entered), arrivals by site add up to all
arrivals, conversion cells nest (invited, consented, enrolled), and a cell asked in two answers
is one set. With ``rounding=1`` (the attacker's best case) shown values are exact. The checker
is the independent SVD solver of ``test_disclosure_attacks.py``, over every answer at once:

* no withheld cell, and no never-published rest smaller than the threshold, is determined;
* within one answer, no two sets closer than the threshold both show their own, different,
  counts (overlap control may show a near set with an earlier set's value: a copy);
* rates computed from shown cells only (a withheld cell gives a withheld rate).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from hypothesis import event, given
from hypothesis import strategies as st
from pyroaring import BitMap

from feasibility.disclosure.answer import AnswerSets, Breakdown, Cell
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.workspace.outputs import ratio, with_extra
from tests.generative.test_disclosure_attacks import (
    Criterion,
    Relation,
    World,
    ask,
    attack,
    cells,
    exact_policies,
    known_relations,
    policies,
    scenarios,
    solve,
    tolerated,
    truths,
)

SEXES = ("female", "male")
BANDS = ("young", "middle", "old")


def keep_of(c: Criterion, p: int) -> bool:
    value = c.values[p]
    if c.kind == "inclusion":
        return value is True
    return value is False or (value is None and c.keep_unknown)


def outputs(
    world: World,
    criteria: Sequence[Criterion],
    sets: AnswerSets,
    seed: int,
    empty_bands: Sequence[str] = (),
) -> dict[str, tuple[dict[str, BitMap], list[Breakdown]]]:
    """Each output's extra sets and the breakdowns a reader knows, as the workspace builds
    them (random attributes; a few patients without a birth date; nobody in ``empty_bands``,
    as an age criterion leaves a band empty)."""
    rng = random.Random(seed)
    sex = [rng.choice(SEXES) for _ in range(world.size)]
    held = [b for b in BANDS if b not in empty_bands]
    band = [rng.choice([*held, *held, None]) for _ in range(world.size)]
    profile: dict[str, BitMap] = {}
    pb: list[Breakdown] = []
    for s in SEXES:
        profile[f"profile:sex:{s}"] = BitMap(p for p in sets.cohort if sex[p] == s)
        for b in BANDS:
            profile[f"profile:{s}:{b}"] = BitMap(
                p for p in sets.cohort if sex[p] == s and band[p] == b
            )
        pb.append(Breakdown(f"profile:sex:{s}", tuple(f"profile:{s}:{b}" for b in BANDS)))
    pb.append(Breakdown("total", tuple(f"profile:sex:{s}" for s in SEXES)))

    impact: dict[str, BitMap] = {}
    ib: list[Breakdown] = []
    for i in range(len(criteria)):
        impact[f"impact:{i}"] = BitMap(
            p
            for p in range(world.size)
            if all(keep_of(c, p) for j, c in enumerate(criteria) if j != i)
        )
        ib.append(Breakdown(f"impact:{i}", ("total",)))
    last = len(criteria) - 1
    ib.append(Breakdown(f"impact:{last}", (f"funnel:{last + 1}:entered",)))

    # arrivals: a random share of the cohort and of the population arrived in the window
    arrived = BitMap(p for p in range(world.size) if rng.random() < 0.3)
    sites = sorted(sets.by_site)
    site_extra: dict[str, BitMap] = {}
    for s in sites:
        site_extra[f"entries:{s}"] = BitMap(p for p in arrived if world.site_of[p] == s)
    site_extra["entries:total"] = arrived
    sb = [Breakdown("entries:total", tuple(f"entries:{s}" for s in sites))]
    recruiting = sites[: max(1, len(sites) // 2)]
    for s in recruiting:
        candidates = BitMap(p for p in sets.by_site[s])
        invited = BitMap(p for p in candidates if rng.random() < 0.6)
        consented = BitMap(p for p in invited if rng.random() < 0.5)
        enrolled = BitMap(p for p in consented if rng.random() < 0.7)
        site_extra.update(
            {
                f"candidates:{s}": candidates,
                f"invited:{s}": invited,
                f"consented:{s}": consented,
                f"enrolled:{s}": enrolled,
            }
        )
        sb += [
            Breakdown(f"invited:{s}", (f"consented:{s}",)),
            Breakdown(f"consented:{s}", (f"enrolled:{s}",)),
        ]
    # the daily series: members drifting by a few patients a day up to the cohort now
    series: dict[str, BitMap] = {}
    members = list(sets.cohort)
    rng.shuffle(members)
    for d in range(6):
        series[f"series:d{d}"] = BitMap(members[: len(members) * (d + 5) // 10])
    series["series:d6"] = BitMap(sets.cohort)
    return {
        "profile": (profile, pb),
        "impact": (impact, ib),
        "sites": (site_extra, sb),
        "series": (series, []),
    }


def relations_of(breakdowns: Sequence[Breakdown], sizes: dict[str, int], prefix: str,
                 sets: Mapping[str, BitMap]) -> list[Relation]:  # fmt: skip
    """The breakdowns as the attacker writes them: parent = parts + rest (a rest is an
    unknown of its own; its true size is recorded in ``sizes``)."""
    out: list[Relation] = []
    for i, b in enumerate(breakdowns):
        parent = sets[b.parent]
        covered = BitMap().union(*(sets[n] for n in b.parts))
        children = [prefix + n for n in b.parts]
        rest = parent - covered
        if rest:
            name = f"{prefix}rest:{i}"
            sizes[name] = len(rest)
            children.append(name)
        out.append((prefix + b.parent, children))
    return out


def own(cell: Cell, n: int, policy: DisclosurePolicy) -> bool:
    """A shown cell shows its own set's count (not a near set's, copied by overlap control)."""
    if n == 0:
        return cell.value == 0
    return cell.value == policy.rounded(n) and not policy.is_small(n)


def attack_all(
    scenario: Any, policy: DisclosurePolicy, order: list[str], empty_bands: Sequence[str] = ()
) -> None:
    world, criteria, seed = scenario
    sets = ask(world, criteria)
    if not sets.cohort:
        event("empty cohort")
        return
    registry = PublicationRegistry("sqlite://")
    built = outputs(world, criteria, sets, seed, empty_bands)
    published: dict[str, Cell] = {}
    sizes: dict[str, int] = {}
    relations: list[Relation] = []
    every_set: dict[str, BitMap] = {}
    for name in order:
        extra, breakdowns = built[name]
        # the bands the criteria leave empty are structural, as the workspace marks them
        empty = (
            {f"profile:{s}:{b}" for s in SEXES for b in empty_bands} if name == "profile" else set()
        )
        full = with_extra(sets, extra, breakdowns, empty)
        protected, _ = protect(full, policy, registry, "Acme", f"q:{name}")
        prefix = f"{name}/"
        these = truths(sets, prefix)
        these.update({prefix + k: v for k, v in extra.items()})
        shown = cells(protected, prefix)
        shown.update({prefix + k: c for k, c in protected.extra.items()})
        published.update(shown)
        sizes.update({k: len(v) for k, v in these.items()})
        every_set.update(these)
        relations += known_relations(world, criteria, prefix)
        named = {**truths(sets), **extra}
        relations += relations_of(breakdowns, sizes, prefix, named)
        # within one answer: no two sets closer than the threshold are shown with different
        # values (overlap control may show a near set with an earlier set's value: a copy)
        fresh = [(k, these[k]) for k, c in shown.items() if not c.suppressed]
        for i, (a, sa) in enumerate(fresh):
            for b, sb in fresh[:i]:
                d = sa.symmetric_difference_cardinality(sb)
                # (with rounding, a copy can show its own rounded count by coincidence)
                mine = own(shown[a], len(sa), policy) and own(shown[b], len(sb), policy)
                if policy.rounding == 1 and 0 < d < policy.threshold and mine:
                    assert shown[a].value == shown[b].value, f"{a} and {b} shown, {d} apart"
        # rates from shown cells only
        for k, c in protected.extra.items():
            if k.startswith("enrolled:"):
                site = k.split(":", 1)[1]
                r = ratio(c, protected.extra[f"invited:{site}"])
                assert r["suppressed"] == (
                    c.suppressed or protected.extra[f"invited:{site}"].suppressed
                )
    # a cell asked in several answers (the total, a site, a funnel cell) is one set, and the
    # attacker knows it
    first_of: dict[str, str] = {}
    for name in every_set:
        plain = name.split("/", 1)[1]
        if plain in first_of:
            relations.append((first_of[plain], [name]))
        else:
            first_of[plain] = name
    # a value copied from a near set under overlap control is not its cell's count: the
    # attacker cannot tell, so an equation on it is wrong, never a disclosure; as unknown here
    for name, c in list(published.items()):
        n = sizes[name]
        if not c.suppressed and not own(c, n, policy):
            published[name] = Cell(None, "withheld", True)
    # rests are never published: unknowns of the attacker's system
    for name in sizes:
        if name not in published:
            published[name] = Cell(None, "withheld", True)
    # the bands the criteria leave empty: the reader knows they are 0 (withheld as zeros)
    known = {k: 0 for k in sizes if tolerated(k, sizes)}
    known.update({f"profile/profile:{s}:{b}": 0 for s in SEXES for b in empty_bands})
    derived = solve(published, relations, known)
    for name, value in derived.determined.items():
        if tolerated(name, sizes):
            continue
        n = sizes[name]
        rest = "rest:" in name
        if rest and (n >= policy.threshold or (n == 0 and not policy.suppress_zero)):
            continue  # a large never-published group may be worked out (as patients without a site)
        if policy.rounding == 1:
            assert round(value) == n
        raise AssertionError(f"{name} (true size {n}) is determined")
    event(f"{sum(1 for c in published.values() if c.suppressed)} withheld")


@attack(10)
@given(
    scenarios(max_steps=3),
    exact_policies,
    st.permutations(["profile", "impact", "sites", "series"]),
)
def test_workspace_outputs_with_exact_counts(scenario: Any, policy: DisclosurePolicy,
                                             order: list[str]) -> None:  # fmt: skip
    attack_all(scenario, policy, order)


@attack(6)
@given(scenarios(max_steps=3, p_pass=(0.85, 0.99)), policies)
def test_workspace_outputs_with_criteria_that_drop_few(
    scenario: Any, policy: DisclosurePolicy
) -> None:
    """Criteria that drop only a few patients: the cohort without one of them is within the
    threshold of the cohort, and must not be both shown."""
    attack_all(scenario, policy, ["impact", "profile", "sites", "series"])


@attack(10)
@given(
    scenarios(max_steps=3),
    exact_policies,
    st.permutations(["profile", "impact", "sites", "series"]),
    st.sampled_from(BANDS),
)
def test_profile_bands_the_criteria_leave_empty(
    scenario: Any, policy: DisclosurePolicy, order: list[str], empty: str
) -> None:
    """Seen on the sponsor page: a profile row with one age band shown and the others withheld,
    the question's age criterion leaving some of them empty (nobody under 18 in an adults-only
    question). The reader knows those are 0; withheld as zeros, they made the plan withhold a
    real band beside them, which the reader then worked out (a large count, so no small group
    was told, but a withheld cell was determined). The workspace marks them structural, shown
    as 0: no withheld cell is determined with them known."""
    attack_all(scenario, policy, order, empty_bands=(empty,))


def test_the_checker_finds_a_derivable_cell() -> None:
    """The checker is not blind: a profile cell published exactly beside its sex and siblings
    is determined."""
    shown = {
        "p": Cell(20, "20", False),
        "a": Cell(12, "12", False),
        "b": Cell(None, "withheld", True),
    }
    derived = solve(shown, [("p", ["a", "b"])])
    assert np.isclose(derived.determined["b"], 8)
