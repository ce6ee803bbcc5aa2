"""The tree-based scan over the device hierarchy, and its looks under an alpha-spending plan.

:func:`build_trees` turns the counters into one tree per (device class, outcome): class >
manufacturer > model > lot, each lot a leaf. A leaf's expected count is its person-time in each
stratum (``SignalConfig.strata``: age band at implant and sex by default) times the tree's own
outcome rate in that stratum (indirect standardisation inside the class), so under the null the
outcome's rate depends on the stratum only, not on the device. :func:`run_look` scans every tree
of every outcome as one family with :func:`~.statistics.treescan.tree_scan` (conditional Poisson,
Monte Carlo p-values) at the alpha the plan gives the look; a cut whose p-value is within it is a
signal that passed family-wise control over every node, outcome and look.

See ``docs/explanation/device-surveillance.md`` (the tree scan and alpha spending).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from core.contracts.signals import SCAN_LOOK_SCHEMA as CONTRACT_SCAN_LOOK_SCHEMA
from surveillance_stream.devices import LEVELS, Counters, parse_node
from surveillance_stream.statistics.treescan import AlphaSpending, ScanResult, Tree, tree_scan

__all__ = [
    "SCAN_LOOK_SCHEMA",
    "ScanPlan",
    "build_trees",
    "replications_for",
    "run_look",
]

#: A look published on the signals topic (keyed ``scan-look-<n>``), read back on start so the
#: spending continues where it was (the schema lives with the topic's other contract).
SCAN_LOOK_SCHEMA = CONTRACT_SCAN_LOOK_SCHEMA
#: Replications are at least this many over the look's alpha, so a cut can reach it with room.
_MC_MARGIN = 5


@dataclass(frozen=True)
class ScanPlan:
    """When looks happen and what each may spend.

    * ``spending``: :class:`AlphaSpending` (alpha, planned looks, rho).
    * ``every_days``: a scheduled look is due when the data's latest day has moved this many days
      past the last look's (weekly by default).
    * ``replications``: the least number of Monte Carlo replications per look (more when the
      look's alpha needs them: ``R + 1 >= 5 / alpha_k``).
    * ``min_seconds``: the least wall-clock time between scheduled looks.
    """

    spending: AlphaSpending = field(default_factory=AlphaSpending)
    every_days: int = 7
    replications: int = 999
    #: the least wall-clock time between scheduled looks: while a backlog is replayed the data's
    #: day moves fast, and a look per week of data would queue Monte Carlo runs back to back
    min_seconds: float = 60.0

    def due(self, last: date | None, latest: date | None) -> bool:
        if latest is None:
            return False
        return last is None or (latest - last).days >= self.every_days

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.spending.to_dict(),
            "every_days": self.every_days,
            "replications": self.replications,
            "min_seconds": self.min_seconds,
        }


def replications_for(alpha: float, least: int) -> int:
    """Replications for a look at ``alpha``: at least ``least``, and enough that a p-value of
    ``alpha`` is reachable with room (``(R + 1) alpha >= 5``)."""
    if alpha <= 0:
        return least
    return max(least, math.ceil(_MC_MARGIN / alpha) - 1)


def _rates(
    counters: Counters, device_class: str, outcome: str, day: date, by: tuple[str, ...]
) -> tuple[dict[tuple[str, ...], float], float | None]:
    events = counters.stratified("class", device_class, outcome, by=by)
    times = counters.stratified_time("class", device_class, by=by)
    rates = {}
    for key, spent in times.items():
        days = spent.days(day)
        if days > 0:
            rates[key] = events.get(key, 0) / days
    total_days = sum(t.days(day) for t in times.values())
    crude = sum(events.values()) / total_days if total_days > 0 else None
    return rates, crude


def build_trees(
    counters: Counters,
    *,
    at: date | None = None,
    outcomes: Collection[str] | None = None,
    by: tuple[str, ...] = ("age", "sex"),
) -> list[Tree]:
    """One tree per (class, outcome) with any outcome in the class, labelled
    ``class · outcome``; node names are the device nodes' paths."""
    day = at or counters.latest_day or date(1970, 1, 1)
    trees = []
    members: dict[str, list[str]] = {}
    for level in LEVELS:  # parents before children
        for _, node in counters.nodes(level):
            members.setdefault(parse_node(node)[1][0], []).append(node)
    for _, device_class in counters.nodes("class"):
        names_for_class = counters.outcome_names("class", device_class)
        for outcome in sorted(names_for_class):
            if outcomes is not None and outcome not in outcomes:
                continue
            rates, crude = _rates(counters, device_class, outcome, day, by)
            if crude is None:
                continue
            nodes = members[device_class]
            index = {node: i for i, node in enumerate(nodes)}
            parents, observed, expected = [], [], []
            for node in nodes:
                _, parts = parse_node(node)
                parent = "/".join(node.split("/")[: len(parts) - 1]) if len(parts) > 1 else None
                parents.append(index[parent] if parent is not None else -1)
                level = LEVELS[len(parts) - 1]
                observed.append(counters.count(level, node, outcome))
                mean = 0.0
                for key, spent in counters.stratified_time(level, node, by=by).items():
                    mean += spent.days(day) * rates.get(key, crude)
                expected.append(mean)
            trees.append(
                Tree(
                    label=f"{device_class} · {outcome}",
                    names=tuple(nodes),
                    parents=tuple(parents),
                    observed=tuple(observed),
                    expected=tuple(expected),
                )
            )
    return trees


def run_look(
    trees: Iterable[Tree],
    plan: ScanPlan,
    look: int,
    *,
    seed: int | None = None,
    spend: bool = True,
) -> tuple[ScanResult, float]:
    """Scan the family at look ``look`` of the plan; returns the result and the alpha used.

    With ``spend=False`` (an exploratory scan on demand) the look's alpha is still what the
    p-values are compared with, but no cut may signal (nothing is spent)."""
    alpha = plan.spending.at(look) if spend else plan.spending.at(max(look, 1))
    if alpha <= 0:  # past the planned looks: nothing left to spend
        alpha = plan.spending.alpha / plan.spending.looks
        spend = False
    result = tree_scan(
        list(trees),
        replications=replications_for(alpha, plan.replications),
        alpha=alpha,
        seed=seed,
    )
    if not spend:
        cuts = tuple(
            type(c)(c.tree, c.node, c.observed, c.expected, c.llr, c.p_value, False)
            for c in result.cuts
        )
        result = ScanResult(
            cuts, result.statistic, result.alpha, result.replications, result.planned,
            result.complete, result.seed,
        )  # fmt: skip
    return result, alpha
