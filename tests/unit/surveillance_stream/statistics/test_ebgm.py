"""EBGM against an independent oracle: numerical integration of the posterior.

The oracle never uses the conjugate algebra of the module: it integrates
prior(lambda) x Poisson(n; lambda E) directly with ``scipy.integrate.quad`` on the
log-lambda scale, and finds quantiles by root-finding on that integral.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, stats

from surveillance_stream.statistics import (
    GammaMixturePrior,
    ebgm,
    ebgm_scores,
    fit_prior,
    log_marginal_likelihood,
    posterior_cdf,
    posterior_quantile,
    qn,
)

# DuMouchel (1999) published hyperparameter estimates for the FDA SRS data.
DUMOUCHEL = GammaMixturePrior(0.2041, 0.05816, 1.415, 1.838, 0.0969)
# openEBGM's default starting point.
OPEN_START = GammaMixturePrior(0.2, 0.1, 2.0, 4.0, 1 / 3)


def _log_gamma_pdf(x: float, shape: float, rate: float) -> float:
    return shape * math.log(rate) - math.lgamma(shape) + (shape - 1) * math.log(x) - rate * x


class Oracle:
    def __init__(self, n: int, e: float, prior: GammaMixturePrior) -> None:
        self.n, self.e, self.prior = n, e, prior
        # centre the integrand near the posterior mode for numerical stability
        grid = np.linspace(-25, 12, 600)
        self.shift = max(self._log_kernel(u) for u in grid)
        self.mode = float(grid[np.argmax([self._log_kernel(u) for u in grid])])
        self.norm = self._integral(-np.inf, np.inf)

    def _log_kernel(self, u: float) -> float:
        if not -300.0 < u < 60.0:  # the integrand is negligible out there
            return -math.inf
        lam = math.exp(u)
        pr = self.prior
        log_prior = np.logaddexp(
            math.log(pr.p) + _log_gamma_pdf(lam, pr.alpha1, pr.beta1) if pr.p > 0 else -np.inf,
            math.log1p(-pr.p) + _log_gamma_pdf(lam, pr.alpha2, pr.beta2) if pr.p < 1 else -np.inf,
        )
        mean = lam * self.e
        log_lik = self.n * math.log(mean) - mean - math.lgamma(self.n + 1)
        return float(log_prior) + log_lik + u  # + u: Jacobian of lambda = exp(u)

    def _kernel(self, u: float) -> float:
        value = self._log_kernel(u) - getattr(self, "shift", 0.0)
        return math.exp(value) if value > -700 else 0.0

    def _integral(self, lo: float, hi: float, weight: bool = False) -> float:
        def f(u: float) -> float:
            return self._kernel(u) * (u if weight else 1.0)

        pts = [self.mode - 2, self.mode, self.mode + 2]
        total = 0.0
        edges = [lo, *[p for p in pts if lo < p < hi], hi]
        for left, right in itertools.pairwise(edges):
            total += integrate.quad(f, left, right, limit=400, epsabs=0, epsrel=1e-11)[0]
        return total

    def ebgm(self) -> float:
        return math.exp(self._integral(-np.inf, np.inf, weight=True) / self.norm)

    def cdf(self, x: float) -> float:
        return self._integral(-np.inf, math.log(x)) / self.norm

    def quantile(self, prob: float) -> float:
        return float(optimize.brentq(lambda x: self.cdf(x) - prob, 1e-9, 1e4, xtol=1e-12))


@cache
def oracle(n: int, e: float, prior: GammaMixturePrior) -> Oracle:
    return Oracle(n, e, prior)


CASES = [
    (0, 0.5, DUMOUCHEL),
    (1, 0.1, DUMOUCHEL),
    (5, 1.5, DUMOUCHEL),
    (20, 3.0, DUMOUCHEL),
    (3, 0.01, OPEN_START),
    (50, 60.0, OPEN_START),
]


@pytest.mark.parametrize(("n", "e", "prior"), CASES)
def test_ebgm_and_quantiles_match_numerical_integration(
    n: int, e: float, prior: GammaMixturePrior
) -> None:
    ref = oracle(n, e, prior)
    result = ebgm_scores(n, e, prior)
    assert result.ebgm == pytest.approx(ref.ebgm(), rel=1e-6)
    assert result.eb05 == pytest.approx(ref.quantile(0.05), rel=1e-6)
    assert result.eb95 == pytest.approx(ref.quantile(0.95), rel=1e-6)
    assert posterior_cdf(result.eb95, n, e, prior) == pytest.approx(0.95, abs=1e-9)


def test_qn_matches_negative_binomial_marginals() -> None:
    n, e, pr = 5, 1.5, DUMOUCHEL
    f1 = stats.nbinom.pmf(n, pr.alpha1, pr.beta1 / (pr.beta1 + e))
    f2 = stats.nbinom.pmf(n, pr.alpha2, pr.beta2 / (pr.beta2 + e))
    expected = pr.p * f1 / (pr.p * f1 + (1 - pr.p) * f2)
    assert qn(n, e, pr) == pytest.approx(expected, rel=1e-12)


def test_degenerate_mixture_weights() -> None:
    pure_first = GammaMixturePrior(2.0, 1.0, 5.0, 1.0, 1.0)
    assert qn(3, 2.0, pure_first) == 1.0
    # single gamma: EBGM = exp(digamma(a+n) - ln(b+E)), quantiles are gamma quantiles
    assert ebgm(3, 2.0, pure_first) == pytest.approx(math.exp(stats.loggamma.mean(5.0) - 0) / 3.0)
    assert posterior_quantile(0.05, 3, 2.0, pure_first) == pytest.approx(
        stats.gamma.ppf(0.05, 5.0, scale=1 / 3.0)
    )


def test_large_counts_are_stable() -> None:
    result = ebgm_scores(100_000, 20_000.0, DUMOUCHEL)
    assert result.eb05 < result.ebgm < result.eb95
    assert result.ebgm == pytest.approx(5.0, rel=1e-3)


def test_tiny_expected_count_shrinks_towards_prior() -> None:
    result = ebgm_scores(1, 1e-6, DUMOUCHEL)
    assert math.isfinite(result.ebgm) and result.eb05 < result.ebgm < result.eb95
    assert result.ebgm < 1e3  # raw RR is 1e6; shrinkage keeps it near the prior


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        GammaMixturePrior(0.0, 1.0, 1.0, 1.0, 0.5)
    with pytest.raises(ValueError):
        GammaMixturePrior(1.0, 1.0, 1.0, 1.0, 1.5)
    with pytest.raises(ValueError):
        GammaMixturePrior.from_sequence([1.0, 2.0])
    with pytest.raises(ValueError):
        ebgm(1.5, 1.0, DUMOUCHEL)
    with pytest.raises(ValueError):
        ebgm(1, 0.0, DUMOUCHEL)


def test_fit_prior_recovers_simulated_hyperparameters() -> None:
    truth = GammaMixturePrior(2.0, 10.0, 10.0, 2.0, 0.7)  # means 0.2 and 5
    rng = np.random.default_rng(20240611)
    size = 4000
    first = rng.random(size) < truth.p
    lam = np.where(
        first,
        rng.gamma(truth.alpha1, 1 / truth.beta1, size),
        rng.gamma(truth.alpha2, 1 / truth.beta2, size),
    )
    e = rng.uniform(0.5, 5.0, size)
    n = rng.poisson(lam * e)
    fit = fit_prior(n, e)
    # maximum likelihood: at least as likely as the truth
    assert fit.log_likelihood >= log_marginal_likelihood(truth, n, e) - 1e-6
    got = fit.prior
    if got.alpha1 / got.beta1 > got.alpha2 / got.beta2:  # label switching
        got = GammaMixturePrior(got.alpha2, got.beta2, got.alpha1, got.beta1, 1 - got.p)
    assert got.alpha1 / got.beta1 == pytest.approx(0.2, rel=0.2)  # component means
    assert got.alpha2 / got.beta2 == pytest.approx(5.0, rel=0.2)
    assert got.p == pytest.approx(0.7, abs=0.1)


def test_fit_prior_weights_equal_repetition() -> None:
    n = np.array([0, 1, 2, 5, 9, 0, 3])
    e = np.array([0.5, 0.7, 1.0, 1.2, 2.0, 0.1, 0.9])
    w = np.array([3, 1, 2, 1, 1, 4, 2])
    direct = log_marginal_likelihood(DUMOUCHEL, np.repeat(n, w), np.repeat(e, w))
    assert log_marginal_likelihood(DUMOUCHEL, n, e, w) == pytest.approx(direct)
    with pytest.raises(ValueError):
        fit_prior([1, 2], [1.0])


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=5000),
    e=st.floats(min_value=1e-4, max_value=5000),
    a1=st.floats(min_value=0.05, max_value=20),
    b1=st.floats(min_value=0.05, max_value=20),
    a2=st.floats(min_value=0.05, max_value=20),
    b2=st.floats(min_value=0.05, max_value=20),
    p=st.floats(min_value=0.0, max_value=1.0),
)
def test_eb05_le_ebgm_le_eb95(
    n: int, e: float, a1: float, b1: float, a2: float, b2: float, p: float
) -> None:
    prior = GammaMixturePrior(a1, b1, a2, b2, p)
    result = ebgm_scores(n, e, prior)
    assert 0 < result.eb05 <= result.ebgm * (1 + 1e-9)
    assert result.ebgm <= result.eb95 * (1 + 1e-9)
    assert 0.0 <= result.qn <= 1.0
