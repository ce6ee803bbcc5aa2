"""The tree-based scan statistic (conditional Poisson) on small trees worked by hand, its Monte
Carlo p-value against the exact one, and the alpha-spending plan.

The hand-worked tree (5 nodes, 3 leaves, total C = 12)::

    root
    ├── A            leaves a1 (observed 7, expected 2) and a2 (observed 2, expected 2)
    │   ├── a1
    │   └── a2
    └── b1           (observed 3, expected 8)

Expected counts sum to 12 = C, so no scaling. For a cut with c observed, E expected:
``LLR = c ln(c/E) + (C - c) ln((C - c)/(C - E))`` when c > E, else 0.

* a1: c = 7, E = 2: 7 ln 3.5 + 5 ln(5/10) = 8.769341 - 3.465736 = 5.303605
* A:  c = 9, E = 4: 9 ln 2.25 + 3 ln(3/8) = 7.298372 - 2.942488 = 4.355884
* a2: c = 2, E = 2: not above its expectation, 0
* b1: c = 3, E = 8: 0
* root: c = C: 0
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from surveillance_stream.statistics.treescan import (
    AlphaSpending,
    Tree,
    conditional_poisson_llr,
    tree_scan,
)

NAMES = ("root", "A", "a1", "a2", "b1")
PARENTS = (-1, 0, 1, 1, 0)


def hand_tree(observed: tuple[int, int, int] = (7, 2, 3)) -> Tree:
    a1, a2, b1 = observed
    return Tree(
        label="hand",
        names=NAMES,
        parents=PARENTS,
        observed=(0, 0, a1, a2, b1),  # inner nodes' own values are ignored
        expected=(0.0, 0.0, 2.0, 2.0, 8.0),
    )


def test_llr_of_every_cut_of_the_hand_worked_tree() -> None:
    tree = hand_tree()
    assert tree.leaves == (2, 3, 4)
    counts = tree.cut_sums(tree.leaf_observed)
    expected = tree.cut_sums(tree.leaf_expected)
    assert counts.tolist() == [12, 9, 7, 2, 3]
    assert expected.tolist() == [12, 4, 2, 2, 8]
    llr = conditional_poisson_llr(counts, expected, 12)
    assert llr.tolist() == pytest.approx([0.0, 4.355884, 5.303605, 0.0, 0.0], abs=1e-6)


def test_expected_counts_are_scaled_to_the_total() -> None:
    tree = Tree("t", NAMES, PARENTS, (0, 0, 7, 2, 3), (0.0, 0.0, 1.0, 1.0, 4.0))
    assert tree.leaf_expected.tolist() == [2.0, 2.0, 8.0]


def test_the_most_likely_cut_leads_and_the_root_never_signals() -> None:
    result = tree_scan([hand_tree()], replications=999, alpha=0.05, seed=3)
    assert [c.node for c in result.cuts[:2]] == ["a1", "A"]
    assert result.statistic == pytest.approx(5.303605, abs=1e-6)
    root = next(c for c in result.cuts if c.node == "root")
    assert (root.llr, root.signal) == (0.0, False)


def _exact_p(tree: Tree, threshold: float) -> float:
    """P(max LLR >= threshold) under the null, by enumerating every way of putting the total on
    the leaves (multinomial with the scaled expectations)."""
    total = tree.total
    probabilities = tree.leaf_expected / total
    expected = tree.cut_sums(tree.leaf_expected)
    p = 0.0
    for a1 in range(total + 1):
        for a2 in range(total + 1 - a1):
            b1 = total - a1 - a2
            weight = (
                math.factorial(total)
                / (math.factorial(a1) * math.factorial(a2) * math.factorial(b1))
                * probabilities[0] ** a1
                * probabilities[1] ** a2
                * probabilities[2] ** b1
            )
            counts = tree.cut_sums(np.array([a1, a2, b1], dtype=float))
            if conditional_poisson_llr(counts, expected, total).max() >= threshold - 1e-9:
                p += weight
    return p


def test_monte_carlo_p_value_agrees_with_the_exact_one() -> None:
    tree = hand_tree()
    result = tree_scan([tree], replications=19_999, alpha=0.5, seed=11, early_stop=False)
    top = result.cuts[0]
    exact = _exact_p(tree, top.llr)
    sd = math.sqrt(exact * (1 - exact) / 20_000)
    assert top.p_value == pytest.approx(exact, abs=4 * sd + 1e-4)
    # the secondary cut A is compared with the family's maximum too
    a_cut = next(c for c in result.cuts if c.node == "A")
    assert a_cut.p_value == pytest.approx(_exact_p(tree, a_cut.llr), abs=4 * sd + 1e-3)


def test_a_strong_cluster_signals_and_stopping_early_decides_the_same() -> None:
    strong = hand_tree((11, 1, 0))  # 11 of 12 events where 2 are expected
    full = tree_scan([strong], replications=999, alpha=0.01, seed=5, early_stop=False)
    early = tree_scan([strong], replications=999, alpha=0.01, seed=5)
    assert full.cuts[0].node == "a1" and full.cuts[0].signal
    assert [(c.node, c.signal) for c in early.cuts] == [(c.node, c.signal) for c in full.cuts]
    null = hand_tree((2, 2, 8))  # exactly as expected: nothing to find
    stopped = tree_scan([null], replications=9_999, alpha=0.01, seed=5)
    assert not any(c.signal for c in stopped.cuts)
    assert not stopped.complete and stopped.replications < 9_999


def test_a_family_of_trees_shares_one_maximum() -> None:
    """Two trees scanned together: each cut is compared with the maximum over both, so the same
    cluster has a larger p-value in a larger family."""
    alone = tree_scan([hand_tree()], replications=4_999, alpha=0.5, seed=2, early_stop=False)
    other = Tree("other", NAMES, PARENTS, (0, 0, 4, 4, 4), (0.0, 0.0, 4.0, 4.0, 4.0))
    both = tree_scan([hand_tree(), other], replications=4_999, alpha=0.5, seed=2, early_stop=False)
    cut = next(c for c in both.cuts if (c.tree, c.node) == ("hand", "a1"))
    assert cut.p_value >= alone.cuts[0].p_value - 0.02
    assert {c.tree for c in both.cuts} == {"hand", "other"}


def test_a_tree_with_no_events_is_left_out_and_bad_trees_are_refused() -> None:
    empty = Tree("empty", NAMES, PARENTS, (0, 0, 0, 0, 0), (0.0, 0.0, 1.0, 1.0, 1.0))
    result = tree_scan([empty, hand_tree()], replications=99, alpha=0.05, seed=1)
    assert {c.tree for c in result.cuts} == {"hand"}
    with pytest.raises(ValueError, match="one value per node"):
        Tree("bad", NAMES, PARENTS, (0, 0, 1), (0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="invalid parent"):
        Tree("bad", ("x",), (0,), (1,), (1.0,))


def test_alpha_spending_spends_alpha_over_the_planned_looks() -> None:
    plan = AlphaSpending(alpha=0.05, looks=104, rho=1.0)
    increments = [plan.at(k) for k in range(1, 105)]
    assert sum(increments) == pytest.approx(0.05)
    assert increments[0] == pytest.approx(0.05 / 104)
    assert plan.at(105) == 0.0  # nothing left after the plan
    late = AlphaSpending(alpha=0.05, looks=4, rho=2.0)  # spends little early, more late
    assert [late.spent(k) for k in range(5)] == pytest.approx(
        [0.0, 0.003125, 0.0125, 0.028125, 0.05]
    )
    assert all(a < b for a, b in itertools.pairwise(late.at(k) for k in range(1, 5)))


def test_keep_reports_only_the_highest_cuts_and_every_signal() -> None:
    strong = hand_tree((11, 1, 0))
    every = tree_scan([strong], replications=999, alpha=0.01, seed=5)
    kept = tree_scan([strong], replications=999, alpha=0.01, seed=5, keep=2)
    assert [c.node for c in kept.cuts] == [c.node for c in every.cuts[:2]]
    assert {c.node for c in kept.cuts if c.signal} == {c.node for c in every.cuts if c.signal}
