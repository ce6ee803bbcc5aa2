"""The tree-based scan statistic (Kulldorff et al. 2003), conditional Poisson variant, with Monte
Carlo p-values, and an alpha-spending plan for repeated looks.

Variant
    The **conditional Poisson** tree scan, as TreeScan's Poisson model conditioned on the total:
    each leaf ``i`` of a tree has an observed count ``c_i`` and an expected count ``e_i`` under
    the null (here: person-time times the tree's own stratum-specific rates), scaled so that
    ``sum(e_i) = C``, the tree's total. For a cut ``G`` (any node: the leaves under it),
    with ``c = sum c_i`` and ``E = sum e_i`` over ``G``::

        LLR(G) = c ln(c / E) + (C - c) ln((C - c) / (C - E))     if c > E, else 0

    (``0 ln 0 = 0``). The test statistic is the largest LLR over every cut of every tree in
    the family.

Monte Carlo p-values
    Under the null, given ``C``, the leaf counts of a tree are multinomial with probabilities
    ``e_i / C``; trees are independent given their totals. Each replication draws every tree,
    takes the largest LLR over the whole family, and a cut's p-value is ``(r + 1) / (R + 1)``
    where ``r`` of ``R`` replications reached its LLR (comparing every cut with the family's
    maximum, which is what makes the p-values adjusted for the number of cuts and trees).

    A look only asks whether a p-value is at most its alpha ``a``: once more than
    ``a (R + 1) - 1`` replications have reached the observed maximum, no cut can be rejected,
    and the replications stop there (Besag and Clifford's sequential Monte Carlo test, with
    the same decision as running all ``R``). The p-values of such a look are reported as
    estimates from the replications run (``complete = False``).

Alpha spending
    :class:`AlphaSpending` spends ``alpha * (k / K) ** rho`` by look ``k`` of ``K`` planned
    looks; look ``k`` may reject at its increment. By the union bound the chance of any false
    rejection over all looks is at most ``alpha`` whatever the correlation between looks. (A
    group-sequential boundary that used that correlation, as Sentinel's sequential TreeScan
    does by simulating the whole sequence, would be less conservative.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "AlphaSpending",
    "CutResult",
    "ScanResult",
    "Tree",
    "conditional_poisson_llr",
    "tree_scan",
]


@dataclass(frozen=True)
class Tree:
    """One tree: nodes (cuts) given by their parent index (``-1`` for the root), leaf counts.

    ``observed`` and ``expected`` are per node; only leaves' values are used (a node's counts
    are the sums over the leaves under it) and ``expected`` is scaled to the observed total.
    ``label`` names the tree (e.g. its class and outcome).
    """

    label: str
    names: tuple[str, ...]
    parents: tuple[int, ...]
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    leaves: tuple[int, ...] = field(init=False)
    #: per leaf, the cuts it belongs to (itself and its ancestors), padded with ``len(names)``
    ancestors: NDArray[np.int64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.parents) == len(self.observed) == len(self.expected) == n):
            raise ValueError("names, parents, observed and expected must have one value per node")
        children = [0] * n
        for i, parent in enumerate(self.parents):
            if parent >= n or parent == i or parent < -1:
                raise ValueError(f"node {self.names[i]!r} has an invalid parent {parent}")
            if parent >= 0:
                children[parent] += 1
        leaves = tuple(i for i in range(n) if children[i] == 0)
        paths = []
        for leaf in leaves:
            path, node = [], leaf
            while node >= 0:
                path.append(node)
                node = self.parents[node]
                if len(path) > n:
                    raise ValueError("the parents form a cycle")
            paths.append(path)
        depth = max((len(p) for p in paths), default=1)
        ancestors = np.full((len(leaves), depth), n, dtype=np.int64)
        for row, path in enumerate(paths):
            ancestors[row, : len(path)] = path
        for leaf in leaves:
            if self.observed[leaf] < 0 or not self.expected[leaf] >= 0:
                raise ValueError(f"leaf {self.names[leaf]!r}: counts must be >= 0")
        object.__setattr__(self, "leaves", leaves)
        object.__setattr__(self, "ancestors", ancestors)

    def recount(self, observed: Sequence[int], expected: Sequence[float]) -> Tree:
        """The same tree with other counts (the structure's work is kept)."""
        if not (len(observed) == len(expected) == len(self.names)):
            raise ValueError("observed and expected must have one value per node")
        if any(observed[i] < 0 or not expected[i] >= 0 for i in self.leaves):
            raise ValueError("leaf counts must be >= 0")
        other = object.__new__(Tree)
        for name in ("label", "names", "parents", "leaves", "ancestors"):
            object.__setattr__(other, name, getattr(self, name))
        object.__setattr__(other, "observed", tuple(observed))
        object.__setattr__(other, "expected", tuple(expected))
        return other

    @cached_property
    def leaf_observed(self) -> NDArray[np.float64]:
        return np.array([self.observed[i] for i in self.leaves], dtype=float)

    @cached_property
    def leaf_expected(self) -> NDArray[np.float64]:
        """Leaf expectations scaled so their sum is the observed total (zero if it is zero)."""
        raw = np.array([self.expected[i] for i in self.leaves], dtype=float)
        total, weight = self.leaf_observed.sum(), raw.sum()
        if total == 0 or weight <= 0:
            return np.zeros_like(raw)
        return raw * (total / weight)

    @cached_property
    def total(self) -> int:
        return int(self.leaf_observed.sum())

    def cut_sums(self, leaf_values: NDArray[np.float64]) -> NDArray[np.float64]:
        """Per cut, the sum of the leaf values under it."""
        depth = self.ancestors.shape[1]
        sums = np.bincount(
            self.ancestors.ravel(),
            weights=np.repeat(np.asarray(leaf_values, dtype=float), depth),
            minlength=len(self.names) + 1,
        )
        return np.asarray(sums[: len(self.names)], dtype=float)

    def simulate_maxima(self, rng: np.random.Generator, size: int) -> NDArray[np.float64]:
        """The largest LLR over this tree's cuts in ``size`` draws under the null (the tree's
        total spread over its leaves in proportion to their expectations)."""
        total, n = self.total, len(self.names)
        expected = self.leaf_expected
        cdf = np.cumsum(expected / total)
        leaves = np.minimum(
            np.searchsorted(cdf, rng.random((size, total)), side="right"), len(cdf) - 1
        )
        cuts = self.ancestors[leaves]  # size x total x depth
        rows = np.arange(size).reshape(size, 1, 1)
        counts = np.bincount((rows * (n + 1) + cuts).ravel(), minlength=size * (n + 1))
        counts = counts.reshape(size, n + 1)[:, :n]
        hit_rows, hit_cuts = np.nonzero(counts)
        cut_expected = self.cut_sums(expected)
        llr = conditional_poisson_llr(
            counts[hit_rows, hit_cuts].astype(float), cut_expected[hit_cuts], float(total)
        )
        maxima = np.zeros(size)
        np.maximum.at(maxima, hit_rows, llr)
        return maxima


def conditional_poisson_llr(
    observed: NDArray[np.float64], expected: NDArray[np.float64], total: float
) -> NDArray[np.float64]:
    """The conditional Poisson LLR of cuts (arrays of their observed and expected counts, the
    last axis the cuts) given the tree's total; 0 where ``observed <= expected``."""
    c = np.asarray(observed, dtype=float)
    e = np.asarray(expected, dtype=float)
    rest, rest_e = total - c, total - e
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.where(c > 0, c * np.log(c / e), 0.0)
        outside = np.where(rest > 0, rest * np.log(rest / rest_e), 0.0)
    llr = np.where((c > e) & (e > 0), inside + outside, 0.0)
    return np.asarray(np.nan_to_num(llr, nan=0.0, posinf=0.0), dtype=float)


@dataclass(frozen=True)
class CutResult:
    tree: str
    node: str
    observed: int
    expected: float
    llr: float
    p_value: float
    signal: bool

    @property
    def ratio(self) -> float | None:
        return self.observed / self.expected if self.expected > 0 else None

    def to_dict(self) -> dict[str, object]:
        return {
            "tree": self.tree,
            "node": self.node,
            "observed": self.observed,
            "expected": self.expected,
            "ratio": self.ratio,
            "llr": self.llr,
            "p_value": self.p_value,
            "signal": self.signal,
        }


@dataclass(frozen=True)
class ScanResult:
    """Every cut of every tree (sorted by LLR, highest first), the test statistic and how the
    p-values were obtained."""

    cuts: tuple[CutResult, ...]
    statistic: float
    alpha: float
    replications: int  # run
    planned: int  # R
    complete: bool  # all R run (else stopped once no cut could be rejected)
    seed: int | None

    def to_dict(self) -> dict[str, object]:
        return {
            "statistic": self.statistic,
            "alpha": self.alpha,
            "replications": self.replications,
            "planned_replications": self.planned,
            "complete": self.complete,
            "seed": self.seed,
            "cuts": [c.to_dict() for c in self.cuts],
        }


def tree_scan(
    trees: Sequence[Tree],
    *,
    replications: int = 999,
    alpha: float = 0.05,
    seed: int | None = None,
    batch: int = 200,
    early_stop: bool = True,
    keep: int | None = None,
) -> ScanResult:
    """Scan a family of trees at level ``alpha`` with ``replications`` Monte Carlo draws.

    A cut signals when its p-value ``(r + 1) / (R + 1)`` is at most ``alpha``. With
    ``early_stop`` the draws stop as soon as no cut can reach that (the decision is the same
    as with all ``R``; the p-values are then estimates over the draws run). ``keep`` limits
    the cuts reported to the highest ``keep`` (every cut that signals is among them, since a
    signal needs a p-value no larger than the top cut's).
    """
    if replications < 1:
        raise ValueError("replications must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    rng = np.random.default_rng(seed)
    live = [t for t in trees if t.total > 0]
    observed_llr: list[NDArray[np.float64]] = []
    cut_counts: list[tuple[NDArray[np.float64], NDArray[np.float64]]] = []
    for tree in live:
        counts = tree.cut_sums(tree.leaf_observed)
        expect = tree.cut_sums(tree.leaf_expected)
        cut_counts.append((counts, expect))
        observed_llr.append(conditional_poisson_llr(counts, expect, tree.total))
    statistic = max((float(x.max()) for x in observed_llr if x.size), default=0.0)
    # a cut is rejected when r <= alpha (R + 1) - 1; r counts replications whose maximum
    # reached the cut's LLR
    allowed = math.floor(alpha * (replications + 1) + 1e-9) - 1
    all_llr = np.concatenate(observed_llr) if observed_llr else np.zeros(0)
    order = np.sort(all_llr)
    reached_sorted = np.zeros(all_llr.size)
    done = 0
    if not live:  # nothing observed anywhere: no cut to test
        return ScanResult((), 0.0, alpha, 0, replications, True, seed)
    step = min(10, batch)  # small first: under the null a look usually stops within a few
    while done < replications:
        size = min(step, replications - done)
        step = min(step * 2, batch)
        maxima = np.zeros(size)
        for tree in live:
            maxima = np.maximum(maxima, tree.simulate_maxima(rng, size))
        # per cut: how many maxima reached its LLR (counted on the sorted LLRs)
        positions = np.searchsorted(order, maxima + 1e-9, side="right")
        at_least = np.bincount(positions, minlength=order.size + 1)[::-1].cumsum()[::-1]
        reached_sorted += at_least[1:]
        done += size
        if early_stop and all_llr.size and reached_sorted[-1] > allowed:
            break
    reached = reached_sorted[np.searchsorted(order, all_llr, side="left")]
    complete = done == replications
    cuts: list[CutResult] = []
    offset = 0
    # with ``keep``, only the ``keep`` highest cuts (and every cut that signals) are reported
    floor = -1.0
    if keep is not None and all_llr.size > keep:
        floor = float(np.sort(all_llr)[-keep])
    for tree, llr, (counts, expect) in zip(live, observed_llr, cut_counts, strict=True):
        for i in np.nonzero(llr >= floor)[0] if floor >= 0 else range(len(tree.names)):
            r = reached[offset + i]
            cuts.append(
                CutResult(
                    tree=tree.label,
                    node=tree.names[i],
                    observed=int(counts[i]),
                    expected=float(expect[i]),
                    llr=float(llr[i]),
                    p_value=float((r + 1) / (done + 1)),
                    signal=bool(complete and llr[i] > 0 and r <= allowed),
                )
            )
        offset += len(tree.names)
    cuts.sort(key=lambda c: (-c.llr, c.p_value, c.tree, c.node))
    return ScanResult(
        cuts=tuple(cuts),
        statistic=statistic,
        alpha=alpha,
        replications=done,
        planned=replications,
        complete=complete,
        seed=seed,
    )


@dataclass(frozen=True)
class AlphaSpending:
    """``alpha * min(1, (k / looks) ** rho)`` spent by look ``k``; look ``k`` may reject at the
    increment :meth:`at`. Looks after the planned number spend nothing."""

    alpha: float = 0.05
    looks: int = 104
    rho: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        if self.looks < 1:
            raise ValueError("looks must be >= 1")
        if not self.rho > 0:
            raise ValueError("rho must be > 0")

    def spent(self, look: int) -> float:
        if look <= 0:
            return 0.0
        return self.alpha * min(1.0, (look / self.looks) ** self.rho)

    def at(self, look: int) -> float:
        """The alpha look ``look`` (1-based) may reject at."""
        return max(0.0, self.spent(look) - self.spent(look - 1))

    def to_dict(self) -> dict[str, float | int]:
        return {"alpha": self.alpha, "looks": self.looks, "rho": self.rho}
