"""The null/power simulation benchmark, small: it runs end to end, and its vectorised per-pair
MaxSPRT computes what the monitor's :func:`surveillance_stream.signals.assess` computes on the
same counts (counters built from one contribution per lot and stratum)."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import bench_surveillance_sim as sim
from core.contracts.devices import Contribution, PersonTime
from surveillance_stream.devices import EXPOSED, Counters
from surveillance_stream.signals import SignalConfig, assess

SMALL = sim.World(classes=1, manufacturers=2, models=2, lots=2, outcomes=2, weeks=6)
#: the benchmark's strata as the contribution writes them (age band | sex | region)
STRATA = [f"{age}|{sex}|London" for age in ("0-44", "55-64", "85+") for sex in ("female", "male")]
AT = date(2025, 1, 1)


def counters_of(world: sim.World, events: np.ndarray, time: np.ndarray) -> Counters:
    """One contribution per (lot, stratum): its exposures' keys, outcome keys and closed
    person-days, at every level of the lot's path."""
    people = []
    pp = sim.PerPair(world)
    lot_names = [n for n in pp.names if n.count("/") == 3]
    for lot_index, lot in enumerate(sorted(lot_names, key=_lot_order)):
        parts = lot.split("/")
        paths = [("/".join(parts[: i + 1]), level) for i, level in
                 enumerate(("class", "manufacturer", "model", "lot"))]  # fmt: skip
        for s, stratum in enumerate(STRATA):
            keys = []
            for path, level in paths:
                keys.append((level, path, EXPOSED, "2024Q1", "RA1", stratum))
                for o in range(events.shape[0]):
                    keys += [(level, path, f"o{o}", "2024Q1", "RA1", stratum)] * int(
                        events[o, lot_index, s]
                    )
            times = tuple(
                ((level, path, "2024Q1", "RA1", stratum),
                 PersonTime(closed_days=int(time[lot_index, s])))
                for path, level in paths
            )  # fmt: skip
            people.append(Contribution(f"{lot}-{s}", tuple(sorted(keys)), tuple(sorted(times))))
    return Counters.rebuild(people)


def _lot_order(name: str) -> tuple[int, ...]:
    return tuple(int(part[1:]) for part in name.split("/"))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 10_000))
def test_the_benchmarks_per_pair_maxsprt_is_the_monitors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    time = rng.integers(200, 2000, size=(SMALL.n_lots, len(STRATA))).astype(float)
    events = rng.poisson(3.0, size=(SMALL.outcomes, SMALL.n_lots, len(STRATA))).astype(float)
    # each cell is one exposure here, and an exposure has an outcome or not (the 2x2 table
    # needs b >= 0): at most one event per cell
    events = np.minimum(events, 1.0)
    counters = counters_of(SMALL, events, time)
    pp = sim.PerPair(SMALL)
    config = SignalConfig(strata=("age", "sex"))
    for o in range(SMALL.outcomes):
        observed, expected, llr = pp.statistics(events, time, o)
        for i, name in enumerate(pp.names):
            result = assess(counters, name, f"o{o}", at=AT, config=config)
            assert result.a == observed[i]
            assert result.maxsprt.expected == pytest.approx(expected[i], rel=1e-9)
            assert (result.maxsprt.llr or 0.0) == pytest.approx(llr[i], rel=1e-9, abs=1e-12)


def test_the_simulation_runs_small(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.World().n_nodes >= 200  # the full-size world the benchmark runs
    code = sim.main(
        ["--null-replications", "2", "--power-replications", "2", "--weeks", "4",
         "--least-replications", "99", "--implants", "2", "--no-write"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for method in ("tree", "pair"):
        found = report[method]
        assert found["null_replications"] == 2 and found["power_replications"] == 2
        low, high = found["fwer_interval_95"]
        assert 0.0 <= low <= found["family_wise_false_signal_rate"] <= high <= 1.0
    assert report["world"]["device_nodes"] == sim.World().n_nodes


def test_wilson_interval() -> None:
    low, high = sim.wilson(10, 200)
    assert low == pytest.approx(0.0274, abs=1e-3) and high == pytest.approx(0.0896, abs=1e-3)
