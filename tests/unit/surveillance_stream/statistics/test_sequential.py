"""MaxSPRT and CUSUM against published values, brute force and seeded Monte Carlo."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surveillance_stream.statistics import (
    RiskAdjustedCusum,
    binomial_alpha,
    binomial_critical_value,
    binomial_llr,
    poisson_alpha,
    poisson_critical_value,
    poisson_llr,
    poisson_signal_times,
    risk_adjusted_cusum,
)

# Kulldorff, Davis, Kolczak, Lewis, Lieu, Platt (2011), "A maximized sequential
# probability ratio test for drug and vaccine safety surveillance", Sequential
# Analysis 30:58-78, Table 1: exact critical values of the continuous Poisson MaxSPRT
# with M = 1, printed to 6 decimals.
KULLDORFF_2011_TABLE_1 = {
    # T: (alpha=0.05, alpha=0.01, alpha=0.001)
    0.1: (2.044069, 4.119293, 6.579669),
    0.5: (2.637928, 4.483740, 7.034472),
    1: (2.853937, 4.670428, 7.172614),
    2: (3.046977, 4.862223, 7.341453),
    5: (3.297183, 5.091907, 7.569312),
    10: (3.467952, 5.260513, 7.724863),
    20: (3.628123, 5.414770, 7.877573),
    50: (3.819903, 5.605972, 8.067072),
    100: (3.952321, 5.738974, 8.199403),
}

# Pre-computed critical values shipped in the R package `Sequential` (function
# CV.Poisson, table `TableCV.PoissonM`, alpha = 0.05, D = 0), for M > 1.
SEQUENTIAL_CV_POISSON_M = {
    # (T, M): cv
    (5, 2): 3.01290868171239,
    (10, 4): 2.92156132978567,
    (20, 4): 3.17637032177521,
    (50, 6): 3.31795545593698,
    (100, 10): 3.35579446678864,
}

TABLE_ATOL = 6e-7  # the table is rounded to 6 decimals


@pytest.mark.parametrize("T", sorted(KULLDORFF_2011_TABLE_1))
@pytest.mark.parametrize("column", [0, 1, 2])
def test_poisson_cv_reproduces_kulldorff_2011_table_1(T: float, column: int) -> None:
    alpha = (0.05, 0.01, 0.001)[column]
    result = poisson_critical_value(T, 1, alpha)
    assert result.cv == pytest.approx(KULLDORFF_2011_TABLE_1[T][column], abs=TABLE_ATOL)
    assert result.alpha_attained <= alpha
    assert result.alpha_attained == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize(("T", "M"), sorted(SEQUENTIAL_CV_POISSON_M))
def test_poisson_cv_reproduces_sequential_package_table(T: float, M: int) -> None:
    result = poisson_critical_value(T, M, 0.05)
    assert result.cv == pytest.approx(SEQUENTIAL_CV_POISSON_M[(T, M)], abs=1e-8)


@pytest.mark.slow
def test_poisson_cv_long_surveillance() -> None:
    # Kulldorff et al. (2011), Table 1, T = 1000, alpha = 0.05
    assert poisson_critical_value(1000, 1, 0.05).cv == pytest.approx(4.324917, abs=TABLE_ATOL)


def test_poisson_alpha_at_published_cv() -> None:
    # the published (rounded) cv reproduces the nominal alpha closely
    assert poisson_alpha(2.853937, 1) == pytest.approx(0.05, abs=1e-6)
    assert poisson_alpha(3.467952, 10) == pytest.approx(0.05, abs=1e-6)


def test_poisson_alpha_single_boundary_closed_form() -> None:
    # When mu_M >= T only "N(T) >= M" can signal: alpha = P(Poisson(T) >= M).
    cv, T, M = 0.5, 1.0, 3
    assert poisson_signal_times(cv, np.array([3.0]))[0] >= T
    expected = 1 - sum(math.exp(-T) * T**k / math.factorial(k) for k in range(M))
    assert poisson_alpha(cv, T, M) == pytest.approx(expected, rel=1e-12)


def _simulate_poisson_maxsprt(cv: float, T: float, M: int, sims: int, seed: int) -> float:
    """Monte Carlo: unit-rate Poisson process on [0, T], test at each arrival."""
    rng = np.random.default_rng(seed)
    max_events = int(T + 10 * math.sqrt(T) + 30)
    arrivals = np.cumsum(rng.exponential(1.0, size=(sims, max_events)), axis=1)
    c = np.arange(1, max_events + 1, dtype=float)
    with np.errstate(divide="ignore"):
        llr = np.where(c > arrivals, arrivals - c + c * np.log(c / arrivals), 0.0)
    hit = (llr >= cv) & (arrivals <= T) & (c >= M)
    return float(hit.any(axis=1).mean())


@pytest.mark.parametrize(("T", "M"), [(3.0, 2), (30.0, 5)])
def test_poisson_alpha_matches_monte_carlo(T: float, M: int) -> None:
    cv = 2.5
    sims = 40_000
    exact = poisson_alpha(cv, T, M)
    simulated = _simulate_poisson_maxsprt(cv, T, M, sims, seed=11)
    se = math.sqrt(exact * (1 - exact) / sims)
    assert abs(simulated - exact) < 4 * se


def test_poisson_cv_impossible_design_is_an_error() -> None:
    # P(N(1) >= 4) = 0.019 < 0.05: no critical value can spend alpha = 0.05
    with pytest.raises(ValueError, match="no critical value"):
        poisson_critical_value(1.0, 4, 0.05)


def test_poisson_llr_values() -> None:
    assert poisson_llr(0, 1.0) == 0.0
    assert poisson_llr(1, 1.0) == 0.0
    assert poisson_llr(2, 1.0) == pytest.approx(1 - 2 + 2 * math.log(2))
    assert poisson_llr(5, 1.0) == pytest.approx(-4 + 5 * math.log(5))
    with pytest.raises(ValueError):
        poisson_llr(1, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    c=st.integers(min_value=0, max_value=100_000),
    mu=st.floats(min_value=1e-6, max_value=1e5),
)
def test_llrs_are_non_negative(c: int, mu: float) -> None:
    assert poisson_llr(c, mu) >= 0.0
    assert binomial_llr(c, int(mu), 1.5) >= 0.0


def test_poisson_cv_monotone_in_T() -> None:
    cvs = [poisson_critical_value(T, 1, 0.05).cv for T in (0.5, 1, 2, 5, 10, 20, 50)]
    assert all(x < y for x, y in itertools.pairwise(cvs))


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=0.5, max_value=40), st.floats(min_value=1.01, max_value=2.0))
def test_poisson_cv_monotone_in_T_property(T: float, factor: float) -> None:
    assert poisson_critical_value(T, 1, 0.05).cv < poisson_critical_value(T * factor, 1, 0.05).cv


# ------------------------------------------------------------------ binomial


def test_binomial_llr_matches_definition() -> None:
    # z = 1 -> p0 = 1/2; 8 cases of 10
    c, n, p0 = 8, 10, 0.5
    expected = c * math.log(c / (n * p0)) + (n - c) * math.log((n - c) / (n * (1 - p0)))
    assert binomial_llr(8, 2, 1.0) == pytest.approx(expected)
    assert binomial_llr(3, 6, 2.0) == 0.0  # c/n = 1/3 = p0
    assert binomial_llr(4, 0, 3.0) == pytest.approx(4 * math.log(4.0))


def _brute_force_binomial_alpha(cv: float, N: int, z: float, M: int) -> float:
    """Enumerate all 2^N case/control sequences (independent of the recursion)."""
    p0 = 1 / (1 + z)
    total = 0.0
    for seq in itertools.product((0, 1), repeat=N):
        cases = 0
        for n, is_case in enumerate(seq, start=1):
            cases += is_case
            if cases >= M and binomial_llr(cases, n - cases, z) >= cv:
                k = sum(seq)
                total += p0**k * (1 - p0) ** (N - k)
                break
    return total


@pytest.mark.parametrize(("N", "z", "M", "cv"), [(10, 1.0, 1, 2.0), (12, 2.0, 2, 1.5)])
def test_binomial_alpha_matches_brute_force(N: int, z: float, M: int, cv: float) -> None:
    assert binomial_alpha(cv, N, z, M) == pytest.approx(
        _brute_force_binomial_alpha(cv, N, z, M), abs=1e-12
    )


def _simulate_binomial_maxsprt(cv: float, N: int, z: float, M: int, sims: int) -> float:
    rng = np.random.default_rng(7)
    cases = np.cumsum(rng.random((sims, N)) < 1 / (1 + z), axis=1)
    n = np.arange(1, N + 1)
    controls = n - cases
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(cases > 0, cases * np.log(cases * (1 + z) / n), 0.0)
        t2 = np.where(controls > 0, controls * np.log(controls * (1 + z) / (z * n)), 0.0)
    llr = np.where(cases * (1 + z) > n, t1 + t2, 0.0)
    return float(((llr >= cv) & (cases >= M)).any(axis=1).mean())


@pytest.mark.parametrize(("N", "z", "M"), [(50, 1.0, 1), (120, 3.0, 3)])
def test_binomial_cv_alpha_matches_monte_carlo(N: int, z: float, M: int) -> None:
    result = binomial_critical_value(N, z, M, 0.05)
    assert result.alpha_attained <= 0.05
    sims = 40_000
    simulated = _simulate_binomial_maxsprt(result.cv, N, z, M, sims)
    se = math.sqrt(result.alpha_attained * (1 - result.alpha_attained) / sims)
    assert abs(simulated - result.alpha_attained) < 4 * se


def test_binomial_cv_is_least_conservative() -> None:
    result = binomial_critical_value(60, 1.0, 1, 0.05)
    assert result.cv_lower is not None and result.cv_upper is not None
    assert result.cv_lower < result.cv <= result.cv_upper
    # anything in (cv_lower, cv_upper] is the same test
    assert binomial_alpha(result.cv, 60, 1.0) == result.alpha_attained
    # the next more liberal region spends more than alpha
    assert binomial_alpha(result.cv_lower, 60, 1.0) > 0.05


def test_binomial_impossible_design_is_an_error() -> None:
    # with N = 3 and z = 1 the most extreme outcome (3 cases) has probability 1/8
    with pytest.raises(ValueError, match="no critical value"):
        binomial_critical_value(3, 1.0, 1, 0.05)


# ------------------------------------------------------------------ CUSUM


def test_cusum_weights_by_hand() -> None:
    chart = RiskAdjustedCusum(odds_ratio=2.0, threshold=4.5)
    # p = 0.5, RA = 2: W(1) = ln(2 / 1.5), W(0) = -ln(1.5)
    assert chart.weight(1, 0.5) == pytest.approx(math.log(2 / 1.5))
    assert chart.weight(0, 0.5) == pytest.approx(-math.log(1.5))
    # p = 0.1: W(1) = ln(2 / 1.1)
    assert chart.weight(1, 0.1) == pytest.approx(math.log(2 / 1.1))


def test_cusum_resets_at_zero_and_after_signal() -> None:
    steps = risk_adjusted_cusum([0, 0, 1], [0.5, 0.5, 0.5], odds_ratio=2.0, threshold=4.5)
    assert [s.score for s in steps][:2] == [0.0, 0.0]
    assert steps[2].score == pytest.approx(math.log(2 / 1.5))

    w = math.log(2 / 1.1)
    k = math.ceil(1.0 / w)  # deaths of low-risk patients needed to reach h = 1
    steps = risk_adjusted_cusum([1] * (k + 1), [0.1] * (k + 1), threshold=1.0)
    assert [s.signal for s in steps] == [False] * (k - 1) + [True, False]
    assert steps[k].score == pytest.approx(w)  # restarted from zero


def test_cusum_rejects_bad_input() -> None:
    chart = RiskAdjustedCusum()
    with pytest.raises(ValueError):
        chart.update(2, 0.5)
    with pytest.raises(ValueError):
        chart.update(1, 1.0)
    with pytest.raises(ValueError):
        RiskAdjustedCusum(odds_ratio=1.0)
    with pytest.raises(ValueError):
        risk_adjusted_cusum([0, 1], [0.5])
