"""The accrual forecast's interval covers the truth at its nominal rate.

A simulated stream with known arrival rates per site and a known conversion: over W days each
site sees Poisson(λ·W) new eligible patients, each enrolled with probability p; the forecast
from what was seen (exact counts, and counts rounded as disclosure control shows them) is
compared with the true wait for the remaining target, drawn from the same process. Over many
seeds the 90% interval must cover the truth about 90% of the time (binomial tolerance).
``FORECAST_SEEDS`` raises the number of seeds (CI: 300, a few seconds).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from feasibility.workspace.forecast import LEVEL, ForecastInputs, forecast

SEEDS = int(os.environ.get("FORECAST_SEEDS", "300"))
#: Per site: new eligible patients per day, and the conversion from candidate to enrolled.
SITES = {"A": (0.8, 0.3), "B": (0.3, 0.5), "C": (1.5, 0.15)}
WINDOW = 60.0
TARGET = 25


def coverage(rounding: int, trial_level: bool, draws: int = 1000) -> float:
    covered = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        sites = SITES if trial_level else {"A": SITES["A"]}
        entries = {s: int(rng.poisson(lam * WINDOW)) for s, (lam, _) in sites.items()}
        enrolled = {s: int(rng.binomial(entries[s], p)) for s, (_, p) in sites.items()}
        # the truth: the wait for TARGET more enrolments of the merged processes
        speed = sum(lam * p for lam, p in sites.values())
        truth = float(rng.gamma(TARGET, 1.0 / speed))

        def shown(n: int) -> int:
            return n if rounding == 1 else int((2 * n + rounding) // (2 * rounding) * rounding)

        result = forecast(
            ForecastInputs(
                entries=shown(sum(entries.values())),
                window_days=WINDOW,
                enrolled=shown(sum(enrolled.values())),
                candidates=shown(sum(entries.values())),
                remaining=TARGET,
                rounding=rounding,
            ),
            draws=draws,
        )
        assert result.low_days is not None and result.high_days is not None
        covered += result.low_days <= truth <= result.high_days
    return covered / SEEDS


def tolerance() -> float:
    """Four binomial standard errors at the nominal level."""
    return 4 * math.sqrt(LEVEL * (1 - LEVEL) / SEEDS)


@pytest.mark.parametrize("rounding", [1, 5])
def test_one_site_interval_covers_at_the_nominal_rate(rounding: int) -> None:
    rate = coverage(rounding, trial_level=False)
    assert abs(rate - LEVEL) <= tolerance(), f"coverage {rate:.3f} (rounding {rounding})"


def test_trial_interval_over_sites_covers_at_the_nominal_rate() -> None:
    """Sites with different rates and conversions pooled, as the trial's forecast pools its
    recruiting sites: the merged enrolments are Poisson with the summed rate, and pooled
    conversion weighted by arrivals is what the merged process converts at."""
    rate = coverage(5, trial_level=True)
    assert abs(rate - LEVEL) <= tolerance(), f"coverage {rate:.3f}"


def test_same_inputs_same_answer_and_edges() -> None:
    inputs = ForecastInputs(entries=40, window_days=30, enrolled=10, candidates=40, remaining=20)
    assert forecast(inputs) == forecast(inputs)
    assert forecast(ForecastInputs(None, 30, 1, 2, 5)).median_days is None
    reached = forecast(ForecastInputs(10, 30, 1, 2, 0))
    assert reached.median_days == 0 and reached.reason == "the target is reached"
    unknown = forecast(ForecastInputs(40, 30, None, None, 20))
    assert not unknown.conversion_known and unknown.median_days is not None
    # the prior alone is far less sure than an observed conversion
    assert (unknown.high_days or math.inf) > (forecast(inputs).high_days or 0)
