"""Attacks on disclosure control: an adversary who sees only protected answers.

Random populations (50-400 patients, random sites and regions) and random questions (a funnel of
inclusion and exclusion criteria with missing data) are protected, then attacked:

(a) differencing two questions whose cohorts differ by 1..threshold-1 patients (also by two
    colluding sponsors): the published totals (and per-site cells) never both move;
(b) repeating a question 20 times and averaging: the answers are identical;
(c) solving the linear relations between published cells (total = sum of regions = sum of sites,
    region = sum of its sites, the funnel identities): no withheld cell is determined, and no
    relation leaves a small residual group; with rounding=1 every shown value is exact, which is
    the attacker's best case;
(d) the same for the funnel alone, with criteria that fail or lack data for only a few patients;
(e) asking the cohort restricted to one site as its own question: a withheld site stays withheld,
    even solving both answers' relations together.

The checker is independent of the library's own: it solves the attacker's equations with numpy's
SVD (the null space tells which unknowns are determined), over the relations an attacker knows
from the question's semantics, not over the library's internal ones.

The ``ci`` profile (default) runs a small deterministic set; ``HYPOTHESIS_PROFILE=long`` runs
randomised and about forty times as many examples.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from feasibility.disclosure.answer import (
    FUNNEL_FIELDS,
    AnswerSets,
    Cell,
    FunnelStepSets,
    ProtectedAnswer,
)
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.disclosure.registry import PublicationRegistry

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def attack(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples * 40 if LONG else examples,
        derandomize=not LONG,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    size: int
    site_of: tuple[str, ...] = field(repr=False)
    region_of: Mapping[str, str]


@dataclass(frozen=True)
class Criterion:
    label: str
    kind: str  # inclusion | exclusion
    values: tuple[bool | None, ...] = field(repr=False)
    keep_unknown: bool = False


def make_world(rng: random.Random, size: int, sites: int, regions: int) -> World:
    names = [f"S{i:02d}" for i in range(sites)]
    region_names = [f"R{i}" for i in range(regions)]
    region_of = {
        s: region_names[i % regions] if i < regions else rng.choice(region_names)
        for i, s in enumerate(names)
    }
    weights = [rng.random() ** 2 + 0.02 for _ in names]  # some sites much smaller than others
    site_of = tuple(rng.choices(names, weights=weights, k=size))
    return World(size, site_of, region_of)


def make_criterion(
    rng: random.Random, world: World, index: int, p_pass: float, p_unknown: float
) -> Criterion:
    kind = rng.choice(["inclusion", "exclusion"])
    values: list[bool | None] = []
    for _ in range(world.size):
        r = rng.random()
        if r < p_unknown:
            values.append(None)
        else:
            passes = rng.random() < p_pass
            values.append(passes if kind == "inclusion" else not passes)
    keep = kind == "exclusion" and rng.random() < 0.5
    return Criterion(f"c{index}", kind, tuple(values), keep)


def only(patients: BitMap, world: World, kind: str, label: str) -> Criterion:
    """A criterion true exactly for ``patients`` (no missing data)."""
    return Criterion(label, kind, tuple(p in patients for p in range(world.size)))


def ask(world: World, criteria: Sequence[Criterion]) -> AnswerSets:
    population = BitMap(range(world.size))
    funnel = [
        FunnelStepSets(
            "population",
            "population",
            population,
            population.copy(),
            BitMap(),
            BitMap(),
            population.copy(),
        )
    ]
    remaining = population
    for c in criteria:
        true = BitMap(p for p in remaining if c.values[p] is True)
        false = BitMap(p for p in remaining if c.values[p] is False)
        unknown = BitMap(p for p in remaining if c.values[p] is None)
        passed, failed = (false, true) if c.kind == "exclusion" else (true, false)
        keep = passed | unknown if c.keep_unknown else passed.copy()
        kind: Any = c.kind
        funnel.append(FunnelStepSets(c.label, kind, remaining, passed, failed, unknown, keep))
        remaining = keep
    cohort = remaining
    sites = sorted(world.region_of)
    by_site = {s: BitMap(p for p in cohort if world.site_of[p] == s) for s in sites}
    by_region: dict[str, BitMap] = {r: BitMap() for r in set(world.region_of.values())}
    for s in sites:
        by_region[world.region_of[s]] |= by_site[s]
    return AnswerSets(cohort, by_site, dict(world.region_of), by_region, funnel)


# ------------------------------------------------------------------------- what is published


def cells(answer: ProtectedAnswer, prefix: str = "") -> dict[str, Cell]:
    out = {f"{prefix}total": answer.total}
    out.update({f"{prefix}region:{r}": c for r, c in answer.by_region.items()})
    out.update({f"{prefix}site:{s}": c for s, c in answer.by_site.items()})
    for i, step in enumerate(answer.funnel):
        out.update({f"{prefix}funnel:{i}:{f}": step[f] for f in FUNNEL_FIELDS})
    return out


def truths(sets: AnswerSets, prefix: str = "") -> dict[str, BitMap]:
    out = {f"{prefix}total": sets.cohort}
    out.update({f"{prefix}region:{r}": b for r, b in sets.by_region.items()})
    out.update({f"{prefix}site:{s}": b for s, b in sets.by_site.items()})
    for i, step in enumerate(sets.funnel):
        out.update({f"{prefix}funnel:{i}:{f}": getattr(step, f) for f in FUNNEL_FIELDS})
    return out


Relation = tuple[str, list[str]]  # parent = sum of children


def known_relations(
    world: World, criteria: Sequence[Criterion], prefix: str = ""
) -> list[Relation]:
    """What the attacker knows holds between the cells of an answer, from its meaning alone."""
    p = prefix
    regions = sorted(set(world.region_of.values()))
    sites = sorted(world.region_of)
    rels: list[Relation] = [
        (f"{p}total", [f"{p}region:{r}" for r in regions]),
        (f"{p}total", [f"{p}site:{s}" for s in sites]),
    ]
    rels += [
        (f"{p}region:{r}", [f"{p}site:{s}" for s in sites if world.region_of[s] == r])
        for r in regions
    ]
    for i in range(len(criteria) + 1):
        f = f"{p}funnel:{i}:"
        rels.append((f + "entered", [f + "passed", f + "failed", f + "unknown"]))
        keep_unknown = i > 0 and criteria[i - 1].keep_unknown
        rels.append(
            (f + "remaining", [f + "passed", f + "unknown"] if keep_unknown else [f + "passed"])
        )
        if i < len(criteria):
            rels.append((f + "remaining", [f"{p}funnel:{i + 1}:entered"]))
    rels.append((f"{p}funnel:{len(criteria)}:remaining", [f"{p}total"]))
    return rels


@dataclass
class Derivation:
    determined: dict[str, float]  # withheld cell -> the value the attacker derives


def solve(
    published: Mapping[str, Cell],
    relations: Sequence[Relation],
    known: Mapping[str, int] | None = None,
) -> Derivation:
    """Everything an attacker can determine exactly from the shown values (taken as exact) and
    the relations: a withheld cell is determined iff every null-space vector of the system
    vanishes on it."""
    given = {
        k: float(c.value) for k, c in published.items() if not c.suppressed and c.value is not None
    }
    given.update({k: float(v) for k, v in (known or {}).items()})
    unknown = sorted({k for k in published if k not in given})
    if not unknown:
        return Derivation({})
    column = {k: j for j, k in enumerate(unknown)}
    rows, rhs = [], []
    for parent, children in relations:
        row = np.zeros(len(unknown))
        b = 0.0
        for name, sign in [(parent, 1.0), *[(c, -1.0) for c in children]]:
            if name in column:
                row[column[name]] += sign
            else:
                b -= sign * given[name]
        if row.any():
            rows.append(row)
            rhs.append(b)
    if not rows:
        return Derivation({})
    a = np.array(rows)
    _, s, vt = np.linalg.svd(a)
    rank = int((s > 1e-9).sum())
    null = vt[rank:]
    x = np.linalg.lstsq(a, np.array(rhs), rcond=None)[0]
    determined = {
        k: float(x[j])
        for k, j in column.items()
        if null.shape[0] == 0 or np.all(np.abs(null[:, j]) < 1e-9)
    }
    return Derivation(determined)


def tolerated(name: str, sizes: Mapping[str, int]) -> bool:
    """A zero count of patients without data: the attacker may know it (criteria on codes are
    never unknown), so it protects nothing and may be derived (documented policy)."""
    return name.endswith(":unknown") and sizes[name] == 0


def zero_unknowns(sizes: Mapping[str, int]) -> dict[str, int]:
    """What the attacker is assumed to know besides the answer: the zero ``unknown`` counts."""
    return {name: 0 for name in sizes if tolerated(name, sizes)}


def assert_relations_protected(
    published: Mapping[str, Cell],
    sizes: Mapping[str, int],
    relations: Sequence[Relation],
    policy: DisclosurePolicy,
) -> None:
    """Per relation: never exactly one withheld term; a shown parent never leaves a small group
    of withheld children (fewer than the threshold, or zero under suppress_zero)."""
    t = policy.threshold
    for parent, children in relations:
        terms = [parent, *children]
        # withheld and not known anyway (zero "unknown" counts are assumed known)
        hidden = [k for k in terms if published[k].suppressed and not tolerated(k, sizes)]
        assert len(hidden) != 1, f"{hidden[0]} alone withheld in {parent} = {' + '.join(children)}"
        if not published[parent].suppressed or tolerated(parent, sizes):
            group = [k for k in children if k in hidden]
            if group:
                residual = sum(sizes[k] for k in group)
                assert residual >= t or (residual == 0 and not policy.suppress_zero), (
                    f"{parent} minus its shown parts leaves {residual} in {group}"
                )


def assert_nothing_determined(
    published: Mapping[str, Cell],
    sizes: Mapping[str, int],
    relations: Sequence[Relation],
    policy: DisclosurePolicy,
    known: Mapping[str, int] | None = None,
) -> None:
    derived = solve(published, relations, {**zero_unknowns(sizes), **(known or {})})
    exact = policy.rounding == 1
    for name, value in derived.determined.items():
        if exact:  # shown values are exact, so the derived value is the true one
            assert round(value) == sizes[name]
            assert not 1 <= round(value) < policy.threshold, f"{name} = {value} derived"
        if tolerated(name, sizes):
            continue
        raise AssertionError(f"withheld {name} (true size {sizes[name]}) is determined")


# ------------------------------------------------------------------------------ strategies


class Scenario:
    """A world and a question (printed briefly: the seed and sizes reproduce it)."""

    def __init__(self, world: World, criteria: list[Criterion], seed: int) -> None:
        self.world, self.criteria, self.seed = world, criteria, seed

    def __iter__(self) -> Any:
        return iter((self.world, self.criteria, self.seed))

    def __repr__(self) -> str:
        steps = ", ".join(f"{c.kind}(keep_unknown={c.keep_unknown})" for c in self.criteria)
        return (
            f"Scenario(seed={self.seed}, size={self.world.size}, "
            f"region_of={dict(self.world.region_of)}, steps=[{steps}])"
        )


@st.composite
def scenarios(
    draw: st.DrawFn,
    min_steps: int = 1,
    max_steps: int = 4,
    p_pass: tuple[float, float] = (0.3, 0.98),
) -> Scenario:
    seed = draw(st.integers(0, 2**32 - 1))
    size = draw(st.integers(50, 400))
    sites = draw(st.integers(1, 8))
    regions = draw(st.integers(1, min(4, sites)))
    steps = draw(st.integers(min_steps, max_steps))
    rng = random.Random(seed)
    world = make_world(rng, size, sites, regions)
    criteria = [
        make_criterion(
            rng,
            world,
            i,
            draw(st.floats(*p_pass)),
            draw(st.sampled_from([0.0, 0.0, 0.01, 0.03, 0.1])),
        )
        for i in range(steps)
    ]
    return Scenario(world, criteria, seed)


policies = st.builds(
    DisclosurePolicy,
    threshold=st.sampled_from([10, 10, 5, 3]),
    rounding=st.sampled_from([1, 5]),
    suppress_zero=st.booleans(),
    overlap_control=st.just(True),
)
exact_policies = st.builds(
    DisclosurePolicy,
    threshold=st.sampled_from([10, 10, 5]),
    rounding=st.just(1),
    suppress_zero=st.booleans(),
    overlap_control=st.just(True),
)


# ----------------------------------------------------------------------------------- attacks


def nearer_copy(
    published: Cell,
    target: BitMap,
    reference: BitMap,
    earlier_sets: Mapping[str, BitMap],
    earlier: Mapping[str, Cell],
) -> bool:
    """``published`` is the publication of an earlier cell strictly nearer to ``target`` than
    ``reference`` (overlap control copies the nearest earlier publication)."""
    limit = target.symmetric_difference_cardinality(reference)
    return any(
        earlier[k] == published and 0 < target.symmetric_difference_cardinality(b) < limit
        for k, b in earlier_sets.items()
    )


@attack(60)
@given(scenarios(), policies, st.data())
def test_a_differencing_nearly_equal_cohorts(
    scenario: Any, policy: DisclosurePolicy, data: st.DataObject
) -> None:
    world, criteria, seed = scenario
    first = ask(world, criteria)
    cohort = first.cohort
    if not cohort:
        event("empty cohort: nothing to difference")
        return
    t = policy.threshold
    k = data.draw(st.integers(1, min(t - 1, len(cohort))), label="removed")
    removed = BitMap(random.Random(seed + 1).sample(list(cohort), k))
    second = ask(world, [*criteria, only(removed, world, "exclusion", "minus a few")])
    registry = PublicationRegistry("sqlite://")
    colluding = data.draw(st.booleans(), label="colluding")
    order = data.draw(st.booleans(), label="smaller first")
    questions = [(first, "Acme"), (second, "Rival" if colluding else "Acme")]
    if order:
        questions.reverse()
    results = {}
    for sets, org in questions:
        results[id(sets)] = protect(sets, policy, registry, org, f"q-{org}")[0]
    one, two = results[id(first)], results[id(second)]
    earlier_sets, earlier = (
        (truths(first), cells(one)) if not order else (truths(second), cells(two))
    )
    later_sets, later = (truths(second), cells(two)) if not order else (truths(first), cells(one))

    # the totals: identical, or one withheld (or the later copies an even nearer earlier cell)
    a, b = earlier["total"], later["total"]
    event(
        "totals identical"
        if a == b
        else "a total withheld"
        if a.suppressed or b.suppressed
        else "later total copies a nearer cell"
    )
    if not a.suppressed:
        event("the earlier total was shown")
    assert (
        a == b
        or a.suppressed
        or b.suppressed
        or nearer_copy(b, later_sets["total"], earlier_sets["total"], earlier_sets, earlier)
    ), (a, b)
    # the same for every pair of cells that differ by 1..t-1 patients
    for name, target in later_sets.items():
        if name not in earlier_sets:
            continue
        distance = target.symmetric_difference_cardinality(earlier_sets[name])
        if 0 < distance < t:
            x, y = earlier[name], later[name]
            assert (
                x == y
                or x.suppressed
                or y.suppressed
                or nearer_copy(y, target, earlier_sets[name], earlier_sets, earlier)
            ), (name, x, y)


@attack(30)
@given(scenarios(max_steps=3), policies)
def test_b_repeating_and_averaging_gains_nothing(scenario: Any, policy: DisclosurePolicy) -> None:
    world, criteria, _ = scenario
    sets = ask(world, criteria)
    registry = PublicationRegistry("sqlite://")
    answers = [protect(sets, policy, registry, "Acme", "q")[0].to_dict() for _ in range(20)]
    assert all(a == answers[0] for a in answers)
    # and without overlap control (no registry) the answer is a pure function of the sets
    plain = DisclosurePolicy(policy.threshold, policy.rounding, policy.suppress_zero, False)
    again = [protect(sets, plain, None, "Acme", "q")[0].to_dict() for _ in range(3)]
    assert all(a == again[0] for a in again)


@attack(100)
@given(scenarios(), exact_policies)
def test_c_linked_tables_reveal_no_small_cell(scenario: Any, policy: DisclosurePolicy) -> None:
    world, criteria, _ = scenario
    sets = ask(world, criteria)
    answer, audit = protect(sets, policy, PublicationRegistry("sqlite://"), "Acme", "q")
    published = cells(answer)
    sizes = {k: len(b) for k, b in truths(sets).items()}
    relations = known_relations(world, criteria)
    assert audit.unprotectable == 0
    event("complementary suppression used" if audit.secondary_suppressed else "none needed")
    for name, cell in published.items():  # rule 1 and 2 hold cell by cell
        if not cell.suppressed:
            assert cell.value == sizes[name]  # rounding=1, a fresh registry: exact
            assert (
                sizes[name] >= policy.threshold
                or (sizes[name] == 0 and not policy.suppress_zero)
                or (name.endswith((":failed", ":unknown")) and name.startswith("funnel:0:"))
            )
    assert_relations_protected(published, sizes, relations, policy)
    assert_nothing_determined(published, sizes, relations, policy)


@attack(40)
@given(scenarios(), policies)
def test_c_linked_tables_with_rounding(scenario: Any, policy: DisclosurePolicy) -> None:
    """The same structure holds whatever the rounding (rounding only adds uncertainty)."""
    world, criteria, _ = scenario
    sets = ask(world, criteria)
    answer, _ = protect(sets, policy, PublicationRegistry("sqlite://"), "Acme", "q")
    published = cells(answer)
    sizes = {k: len(b) for k, b in truths(sets).items()}
    relations = known_relations(world, criteria)
    assert_relations_protected(published, sizes, relations, policy)
    assert_nothing_determined(published, sizes, relations, policy)
    for cell in published.values():
        if not cell.suppressed and cell.value:
            assert cell.value % policy.rounding == 0
            assert cell.value >= policy.threshold


@attack(80)
@given(scenarios(min_steps=2, max_steps=5, p_pass=(0.9, 0.999)), exact_policies)
def test_d_funnel_reveals_no_small_cell(scenario: Any, policy: DisclosurePolicy) -> None:
    """Criteria that fail (or lack data) for only a handful of patients: small funnel cells."""
    world, criteria, _ = scenario
    sets = ask(world, criteria)
    answer, audit = protect(sets, policy, PublicationRegistry("sqlite://"), "Acme", "q")
    published = cells(answer)
    sizes = {k: len(b) for k, b in truths(sets).items()}
    relations = known_relations(world, criteria)
    funnel_relations = [r for r in relations if r[0].startswith("funnel:")]
    assert audit.unprotectable == 0
    assert_relations_protected(published, sizes, funnel_relations, policy)
    assert_nothing_determined(published, sizes, relations, policy)
    # dropped at each step (entered - remaining) is a group too: never shown small
    for i in range(len(criteria) + 1):
        entered, remaining = (published[f"funnel:{i}:{f}"] for f in ("entered", "remaining"))
        if not entered.suppressed and not remaining.suppressed:
            assert entered.value is not None and remaining.value is not None
            dropped = entered.value - remaining.value
            assert not policy.is_small(dropped) or (i == 0 and dropped == 0), (i, dropped)


@attack(50)
@given(scenarios(), exact_policies, st.data())
def test_e_a_site_asked_on_its_own_stays_withheld(
    scenario: Any, policy: DisclosurePolicy, data: st.DataObject
) -> None:
    world, criteria, _ = scenario
    first_sets = ask(world, criteria)
    registry = PublicationRegistry("sqlite://")
    first, _ = protect(first_sets, policy, registry, "Acme", "q1")
    hidden_sites = sorted(s for s, c in first.by_site.items() if c.suppressed)
    if not hidden_sites:
        event("no withheld site to attack")
        return
    event("attacking a withheld site")
    site = data.draw(st.sampled_from(hidden_sites), label="site")
    at_site = BitMap(p for p in range(world.size) if world.site_of[p] == site)
    restricted = [*criteria, only(at_site, world, "inclusion", f"at {site}")]
    second_sets = ask(world, restricted)
    org = data.draw(st.sampled_from(["Acme", "Rival"]), label="org")
    second, _ = protect(second_sets, policy, registry, org, "q2")

    # hidden stays hidden, wherever the same set appears
    k = len(criteria) + 1
    assert second.total.suppressed
    assert second.by_site[site].suppressed
    assert second.by_region[world.region_of[site]].suppressed
    assert second.funnel[k]["passed"].suppressed and second.funnel[k]["remaining"].suppressed

    # and solving both answers together (with everything the attacker knows links them)
    published = {**cells(first, "1:"), **cells(second, "2:")}
    sizes = {
        k_: len(b) for k_, b in {**truths(first_sets, "1:"), **truths(second_sets, "2:")}.items()
    }
    relations = known_relations(world, criteria, "1:") + known_relations(world, restricted, "2:")
    for i in range(len(criteria) + 1):  # the first steps are the same sets
        relations += [(f"1:funnel:{i}:{f}", [f"2:funnel:{i}:{f}"]) for f in FUNNEL_FIELDS]
    relations.append(("1:total", [f"2:funnel:{k}:entered"]))
    relations.append((f"1:site:{site}", ["2:total"]))
    others = [f"1:site:{s}" for s in sorted(world.region_of) if s != site]
    relations.append((f"2:funnel:{k}:failed", others))
    zero = {f"2:site:{s}": 0 for s in world.region_of if s != site}
    zero.update(
        {f"2:region:{r}": 0 for r in set(world.region_of.values()) if r != world.region_of[site]}
    )
    zero[f"2:funnel:{k}:unknown"] = 0
    derived = solve(published, relations, {**zero_unknowns(sizes), **zero})
    for name, value in derived.determined.items():
        assert not 1 <= round(value) < policy.threshold, (name, value, sizes[name])
        if name in (f"1:site:{site}", "2:total"):
            # The attacker may pin the site to a number, but never to its true size unless that
            # is 0: an empty site's "failed" is the first question's published total itself
            # (nothing left to withhold); otherwise "failed" is near that total and overlap
            # control gives it the total's publication, so the pinned value is wrong.
            assert round(value) != sizes[name] or sizes[name] == 0, (name, value, sizes[name])
