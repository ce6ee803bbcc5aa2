"""Null and power simulation of device-safety surveillance: the tree-based scan with alpha
spending against the per-pair Poisson MaxSPRT, on the same simulated streams.

The world: a device hierarchy of ``classes`` x ``manufacturers`` x ``models`` x ``lots`` (by
default 2 x 4 x 5 x 5: 250 device nodes), ``outcomes`` outcomes (5), and strata of age band and
sex whose mix differs between models (so expectations need adjusting). Each week every lot gets
Poisson new implants; every exposure stays in follow-up; each (lot, stratum, outcome) cell has
Poisson events at its person-time times the outcome's baseline rate times the stratum's risk
factor (times the relative risk on the faulty model's outcome in power runs). Looks are weekly
for ``weeks`` (104: two years).

At each look, both methods see the same counts:

* **tree scan**: :func:`surveillance_stream.statistics.treescan.tree_scan` over one tree per
  (class, outcome), leaf expectations standardised over the strata inside the class, at the
  look's alpha from :class:`~surveillance_stream.statistics.treescan.AlphaSpending` (alpha 0.05
  over the planned looks) - what the monitor runs (:mod:`surveillance_stream.scan`);
* **per pair**: the Poisson MaxSPRT of every (node, outcome) at the manufacturer, model and lot
  levels (the monitor's live levels) against the rest of its class, expectations standardised
  over the same strata, at its own alpha 0.05 (T = 50, M = 3) - the monitor's default rule,
  with no control for the number of pairs or looks.

Null runs (no excess anywhere) give each method's family-wise false-signal rate: the share of
replications with any signal at any look, with its Wilson 95% interval. Power runs (relative risk
``rr`` on one model and one outcome) give the detection rate (a signal on the faulty model, its
manufacturer or one of its lots, for that outcome) and the median weeks to detection; false
signals elsewhere in those runs are counted too.

Run (full size, about 20 minutes on this 2-core machine)::

    nice -n 10 python -m benchmarks.bench_surveillance_sim

The CI runs a small version (``tests/unit/benchmarks/test_surveillance_sim.py``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from surveillance_stream.statistics import poisson_critical_value
from surveillance_stream.statistics.treescan import AlphaSpending, Tree, tree_scan

from .common import write_result

STRATA_AGE = (0.6, 1.0, 1.8)  # relative risk by age band (young, middle, old)
STRATA_SEX = (1.0, 1.2)


@dataclass(frozen=True)
class World:
    classes: int = 2
    manufacturers: int = 4
    models: int = 5
    lots: int = 5
    outcomes: int = 5
    weeks: int = 104
    implants_per_lot_week: float = 0.5
    #: events per person-year at a risk factor of 1, per outcome
    rates: tuple[float, ...] = (0.010, 0.015, 0.020, 0.030, 0.040)

    @property
    def n_lots(self) -> int:
        return self.classes * self.manufacturers * self.models * self.lots

    @property
    def n_nodes(self) -> int:
        per_class = 1 + self.manufacturers * (1 + self.models * (1 + self.lots))
        return self.classes * per_class

    def tree(self, device_class: int) -> tuple[list[str], list[int], list[int]]:
        """Names, parents and, per leaf (lot of this class, in order), its node index."""
        names, parents, leaves = [f"c{device_class}"], [-1], []
        for m in range(self.manufacturers):
            names.append(f"c{device_class}/m{m}")
            parents.append(0)
            man = len(names) - 1
            for d in range(self.models):
                names.append(f"c{device_class}/m{m}/d{d}")
                parents.append(man)
                model = len(names) - 1
                for lot in range(self.lots):
                    names.append(f"c{device_class}/m{m}/d{d}/l{lot}")
                    parents.append(model)
                    leaves.append(len(names) - 1)
        return names, parents, leaves


def strata_risk() -> np.ndarray:
    return np.array([a * s for a in STRATA_AGE for s in STRATA_SEX])


def case_mix(world: World, rng: np.random.Generator) -> np.ndarray:
    """Per lot, the share of each stratum among its implants: models differ in their patients."""
    mixes = []
    per_model = world.lots
    for _ in range(world.n_lots // per_model):
        weights = rng.dirichlet(np.ones(len(STRATA_AGE) * len(STRATA_SEX)) * 2.0)
        mixes.extend([weights] * per_model)
    return np.array(mixes)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class PerPair:
    """The per-pair Poisson MaxSPRT at the manufacturer, model and lot levels, vectorised over
    nodes; expectations standardised over strata against the rest of the class."""

    def __init__(self, world: World) -> None:
        self.world = world
        design = poisson_critical_value(50.0, 3, 0.05)
        self.cv = design.cv
        lots_per_class = world.n_lots // world.classes
        # groups: each node = a set of lots (within one class)
        groups: list[tuple[int, list[int], str]] = []  # (class, lots, name)
        index = 0
        for c in range(world.classes):
            for m in range(world.manufacturers):
                man_lots = []
                for d in range(world.models):
                    model_lots = list(range(index, index + world.lots))
                    index += world.lots
                    man_lots += model_lots
                    groups.append((c, model_lots, f"c{c}/m{m}/d{d}"))
                    for lot_i, lot in enumerate(model_lots):
                        groups.append((c, [lot], f"c{c}/m{m}/d{d}/l{lot_i}"))
                groups.append((c, man_lots, f"c{c}/m{m}"))
        self.names = [g[2] for g in groups]
        self.member = np.zeros((len(groups), world.n_lots))
        self.class_of = np.array([g[0] for g in groups])
        for i, (_, lots, _) in enumerate(groups):
            self.member[i, lots] = 1.0
        self.class_member = np.zeros((world.classes, world.n_lots))
        for c in range(world.classes):
            self.class_member[c, c * lots_per_class : (c + 1) * lots_per_class] = 1.0

    def statistics(
        self, events: np.ndarray, time: np.ndarray, outcome: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per node: observed, expected (standardised over strata) and the LLR of an outcome.
        ``events``: outcomes x lots x strata; ``time``: lots x strata (person-days)."""
        node_time = np.einsum("gl,ls->gs", self.member, time)
        class_time = np.einsum("cl,ls->cs", self.class_member, time)[self.class_of]
        comp_time = class_time - node_time
        node_events = np.einsum("gl,ls->gs", self.member, events[outcome])
        class_events = np.einsum("cl,ls->cs", self.class_member, events[outcome])[self.class_of]
        comp_events = class_events - node_events
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(comp_time > 0, comp_events / comp_time, 0.0)
            # a stratum the comparator lacks takes its crude rate (as the monitor does)
            crude = comp_events.sum(axis=1) / comp_time.sum(axis=1)
        rate = np.where(comp_time > 0, rate, crude[:, None])
        expected = (rate * node_time).sum(axis=1)
        observed = node_events.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            llr = np.where(
                (observed > expected) & (expected > 0),
                expected - observed + observed * np.log(observed / expected),
                0.0,
            )
        return observed, expected, llr

    def signals(self, events: np.ndarray, time: np.ndarray) -> list[tuple[str, int]]:
        found = []
        for o in range(events.shape[0]):
            observed, _, llr = self.statistics(events, time, o)
            hits = np.nonzero((observed >= 3) & (llr >= self.cv))[0]
            found += [(self.names[i], o) for i in hits]
        return found


_TEMPLATES: dict[tuple[World, int], Tree] = {}


def _template(world: World, device_class: int) -> Tree:
    found = _TEMPLATES.get((world, device_class))
    if found is None:
        names, parents, _ = world.tree(device_class)
        zero = (0,) * len(names)
        found = Tree(str(device_class), tuple(names), tuple(parents), zero, (0.0,) * len(names))
        _TEMPLATES[(world, device_class)] = found
    return found


def tree_signals(
    world: World,
    events: np.ndarray,
    time: np.ndarray,
    alpha: float,
    seed: int,
    least: int,
) -> list[tuple[str, int]]:
    from surveillance_stream.scan import replications_for

    trees = []
    lots_per_class = world.n_lots // world.classes
    for c in range(world.classes):
        names, _parents, leaves = world.tree(c)
        template = _template(world, c)
        span = slice(c * lots_per_class, (c + 1) * lots_per_class)
        leaf_time = time[span]
        class_time = leaf_time.sum(axis=0)
        for o in range(events.shape[0]):
            leaf_events = events[o, span]  # lots x strata
            stratum_rate = np.divide(
                leaf_events.sum(axis=0), class_time, out=np.zeros(class_time.size),
                where=class_time > 0,
            )  # fmt: skip
            observed = np.zeros(len(names), dtype=int)
            expected = np.zeros(len(names))
            observed[leaves] = leaf_events.sum(axis=1)
            expected[leaves] = leaf_time @ stratum_rate
            trees.append(template.recount(observed.tolist(), expected.tolist()))
            object.__setattr__(trees[-1], "label", f"{c}|{o}")
    result = tree_scan(
        trees, replications=replications_for(alpha, least), alpha=alpha, seed=seed, keep=50
    )
    return [(cut.node, int(cut.tree.split("|")[1])) for cut in result.cuts if cut.signal]


def replicate(
    world: World,
    seed: int,
    rr: float,
    faulty: tuple[str, int] | None,
    spending: AlphaSpending,
    least: int,
    per_pair: PerPair,
    look_every: int = 1,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    mix = case_mix(world, rng)
    risk = strata_risk()
    rates = np.array(world.rates[: world.outcomes]) / 365.25
    n_strata = risk.size
    exposed = np.zeros((world.n_lots, n_strata))
    time = np.zeros((world.n_lots, n_strata))  # person-days
    events = np.zeros((world.outcomes, world.n_lots, n_strata))
    multiplier = np.ones((world.outcomes, world.n_lots))
    faulty_lots: list[int] = []
    if faulty is not None:
        model, outcome = faulty
        c, m, d = (int(part[1:]) for part in model.split("/"))
        first = ((c * world.manufacturers + m) * world.models + d) * world.lots
        faulty_lots = list(range(first, first + world.lots))
        multiplier[outcome, faulty_lots] = rr
    out: dict[str, Any] = {"tree": None, "pair": None, "tree_false": 0, "pair_false": 0}

    def on_path(name: str) -> bool:
        if faulty is None:
            return False
        model = faulty[0]
        return model.startswith(name + "/") or name == model or name.startswith(model + "/")

    for week in range(1, world.weeks + 1):
        new = rng.poisson(world.implants_per_lot_week, size=world.n_lots)
        for lot in np.nonzero(new)[0]:
            exposed[lot] += rng.multinomial(new[lot], mix[lot])
        # the week's follow-up: existing exposures 7 days, this week's on average 3.5
        week_time = exposed * 7.0 - np.einsum("l,ls->ls", new * 3.5, mix)
        week_time = np.maximum(week_time, 0.0)
        time += week_time
        means = rates[:, None, None] * multiplier[:, :, None] * risk[None, None, :] * week_time
        events += rng.poisson(means)
        for method, found in (
            ("tree", None),
            ("pair", None),
        ):
            if out[method] is not None and out[method] != "false-only":
                continue
            if method == "tree":
                if week % look_every:
                    continue  # the tree scan looks every ``look_every`` weeks
                alpha = spending.at(week // look_every)
                found = tree_signals(world, events, time, alpha, seed * 1000 + week, least)
            else:
                found = per_pair.signals(events, time)
            true = [f for f in found if faulty is not None and f[1] == faulty[1] and on_path(f[0])]
            false = [f for f in found if f not in true]
            if false and not out[f"{method}_false"]:
                out[f"{method}_false"] = week
            if true:
                out[method] = week
        if faulty is None and out["tree_false"] and out["pair_false"]:
            break
        if faulty is not None and out["tree"] is not None and out["pair"] is not None:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--null-replications", type=int, default=200)
    parser.add_argument("--power-replications", type=int, default=100)
    parser.add_argument("--weeks", type=int, default=104)
    parser.add_argument("--rr", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument(
        "--look-every", type=int, default=1, help="weeks between the tree scan's looks"
    )
    parser.add_argument("--least-replications", type=int, default=999)
    parser.add_argument("--implants", type=float, default=0.5, help="per lot per week")
    parser.add_argument("--name", default="surveillance_simulation")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    world = World(weeks=args.weeks, implants_per_lot_week=args.implants)
    spending = AlphaSpending(args.alpha, max(1, args.weeks // args.look_every), args.rho)
    per_pair = PerPair(world)
    started = time.perf_counter()
    null = []
    for i in range(args.null_replications):
        null.append(
            replicate(
                world,
                10_000 + i,
                1.0,
                None,
                spending,
                args.least_replications,
                per_pair,
                args.look_every,
            )
        )
        _progress("null", i + 1, args.null_replications, null[-1], started)
    faulty = ("c0/m1/d2", 3)
    power = []
    for i in range(args.power_replications):
        power.append(
            replicate(
                world,
                20_000 + i,
                args.rr,
                faulty,
                spending,
                args.least_replications,
                per_pair,
                args.look_every,
            )
        )
        _progress("power", i + 1, args.power_replications, power[-1], started)
    seconds = time.perf_counter() - started
    n_null, n_power = len(null), len(power)
    report: dict[str, Any] = {"world": {**world.__dict__, "device_nodes": world.n_nodes,
                                        "lots": world.n_lots}}  # fmt: skip
    for method in ("tree", "pair"):
        false = sum(1 for r in null if r[f"{method}_false"])
        detected = [r[method] for r in power if r[method] is not None]
        report[method] = {
            "family_wise_false_signal_rate": false / n_null if n_null else None,
            "fwer_interval_95": wilson(false, n_null),
            "null_replications": n_null,
            "detection_rate": len(detected) / n_power if n_power else None,
            "detection_interval_95": wilson(len(detected), n_power),
            "median_weeks_to_detection": statistics.median(detected) if detected else None,
            "power_runs_with_false_signals": sum(1 for r in power if r[f"{method}_false"]),
            "power_replications": n_power,
        }
    report["seconds"] = round(seconds, 1)
    print(json_dump(report))
    if not args.no_write:
        tree, pair = report["tree"], report["pair"]
        write_result(
            args.name,
            float(tree["family_wise_false_signal_rate"] or 0.0),
            "family-wise false-signal rate (tree scan with alpha spending)",
            float(pair["family_wise_false_signal_rate"] or 0.0),
            parameters={**vars(args), "faulty": faulty, "device_nodes": world.n_nodes},
            command="nice -n 10 python -m benchmarks.bench_surveillance_sim "
            + " ".join(sys.argv[1:]),
            extra={"report": report},
            higher_is_better=False,
        )
    return 0


def _progress(kind: str, done: int, total: int, result: dict[str, Any], started: float) -> None:
    """One line per replication on stderr (a long run can be followed, and read if cut short)."""
    seconds = time.perf_counter() - started
    sys.stderr.write(f"{kind} {done}/{total} {json_dump(result, indent=None)} {seconds:.0f}s\n")
    sys.stderr.flush()


def json_dump(value: Any, indent: int | None = 2) -> str:
    import json

    return json.dumps(value, indent=indent, default=float)


if __name__ == "__main__":
    raise SystemExit(main())
