"""Empirical Bayes geometric mean (DuMouchel 1999) under a two-gamma mixture prior.

Model, for one device-event pair with observed count ``n`` and expected count ``E``::

    lambda ~ P * Gamma(alpha1, rate=beta1) + (1 - P) * Gamma(alpha2, rate=beta2)
    N | lambda ~ Poisson(lambda * E)

Marginally N is a mixture of negative binomials, component ``i`` having size
``alpha_i`` and success probability ``beta_i / (beta_i + E)``.  The posterior is again a
two-gamma mixture::

    lambda | N=n ~ Qn * Gamma(alpha1 + n, beta1 + E) + (1 - Qn) * Gamma(alpha2 + n, beta2 + E)

with ``Qn`` the posterior weight of the first component (DuMouchel 1999, eq. 6).

* ``EBGM = exp(E[ln lambda | n])`` (eq. 11), using ``E[ln X] = digamma(a) - ln(rate)``.
* ``EB05``/``EB95`` are the 5th/95th percentiles of the posterior mixture, found with
  ``brentq`` on the mixture CDF (the root is bracketed by the two component quantiles).

Parameters follow openEBGM's order ``(alpha1, beta1, alpha2, beta2, P)``.

The prior fit (:func:`fit_prior`) is the plain, *untruncated* marginal maximum
likelihood over the supplied ``(n, E)`` pairs: every pair contributes
``ln[P f1(n) + (1-P) f2(n)]``.  It does not implement the zero-truncated likelihood
that openEBGM uses when the zero cells are left out of the data (``zeroes = FALSE``);
pass all pairs, zeros included, or accept that the fit describes the supplied pairs
only.  Optional ``weights`` allow data squashing (each row standing for many pairs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq, minimize
from scipy.special import digamma, expit, gammainc, gammaincinv, gammaln, logit

__all__ = [
    "EBGMResult",
    "GammaMixturePrior",
    "PriorFit",
    "ebgm",
    "ebgm_scores",
    "fit_prior",
    "log_marginal_likelihood",
    "posterior_cdf",
    "posterior_quantile",
    "qn",
]


@dataclass(frozen=True)
class GammaMixturePrior:
    """Two-gamma mixture prior, openEBGM order ``(alpha1, beta1, alpha2, beta2, p)``.

    ``beta`` parameters are *rates* (prior mean of component i is alpha_i / beta_i).
    """

    alpha1: float
    beta1: float
    alpha2: float
    beta2: float
    p: float

    def __post_init__(self) -> None:
        for name in ("alpha1", "beta1", "alpha2", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p!r}")

    @classmethod
    def from_sequence(cls, values: Sequence[float]) -> GammaMixturePrior:
        if len(values) != 5:
            raise ValueError(f"a prior needs 5 values (a1, b1, a2, b2, p), got {len(values)}")
        return cls(*(float(v) for v in values))

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        return (self.alpha1, self.beta1, self.alpha2, self.beta2, self.p)


def _check_ne(n: float, e: float) -> None:
    if not (math.isfinite(n) and n >= 0 and float(n).is_integer()):
        raise ValueError(f"n must be a whole number >= 0, got {n!r}")
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"E must be a finite number > 0, got {e!r}")


def _log_nbinom(n: Any, e: Any, alpha: float, beta: float) -> Any:
    """log P(N = n) for the negative binomial marginal of Gamma(alpha, beta) x Poisson(E)."""
    return (
        gammaln(alpha + n)
        - gammaln(alpha)
        - gammaln(n + 1.0)
        + alpha * np.log(beta / (beta + e))
        + n * np.log(e / (beta + e))
    )


def _log_weights(n: Any, e: Any, prior: GammaMixturePrior) -> tuple[Any, Any]:
    """log(P f1(n)) and log((1-P) f2(n)); -inf for an empty component."""
    with np.errstate(divide="ignore"):
        log_p1 = np.log(prior.p) if prior.p > 0 else -np.inf
        log_p2 = np.log1p(-prior.p) if prior.p < 1 else -np.inf
    return (
        log_p1 + _log_nbinom(n, e, prior.alpha1, prior.beta1),
        log_p2 + _log_nbinom(n, e, prior.alpha2, prior.beta2),
    )


def qn(n: float, e: float, prior: GammaMixturePrior) -> float:
    """Posterior probability that lambda came from the first prior component."""
    _check_ne(n, e)
    l1, l2 = _log_weights(float(n), float(e), prior)
    if l1 == -np.inf:
        return 0.0
    if l2 == -np.inf:
        return 1.0
    return float(expit(l1 - l2))


def _posterior(
    n: float, e: float, prior: GammaMixturePrior
) -> tuple[float, list[tuple[float, float]]]:
    q = qn(n, e, prior)
    return q, [(prior.alpha1 + n, prior.beta1 + e), (prior.alpha2 + n, prior.beta2 + e)]


def ebgm(n: float, e: float, prior: GammaMixturePrior) -> float:
    """``exp(E[ln lambda | N=n])`` -- the empirical Bayes geometric mean."""
    q, ((s1, r1), (s2, r2)) = _posterior(n, e, prior)
    mean_log = 0.0
    if q > 0:
        mean_log += q * (float(digamma(s1)) - math.log(r1))
    if q < 1:
        mean_log += (1.0 - q) * (float(digamma(s2)) - math.log(r2))
    return math.exp(mean_log)


def posterior_cdf(x: float, n: float, e: float, prior: GammaMixturePrior) -> float:
    """P(lambda <= x | N=n) under the posterior mixture."""
    q, ((s1, r1), (s2, r2)) = _posterior(n, e, prior)
    if x <= 0:
        return 0.0
    return q * float(gammainc(s1, r1 * x)) + (1.0 - q) * float(gammainc(s2, r2 * x))


def posterior_quantile(prob: float, n: float, e: float, prior: GammaMixturePrior) -> float:
    """The ``prob`` quantile of the posterior of lambda (e.g. 0.05 gives EB05)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    q, ((s1, r1), (s2, r2)) = _posterior(n, e, prior)
    x1 = float(gammaincinv(s1, prob)) / r1
    x2 = float(gammaincinv(s2, prob)) / r2
    if q >= 1.0:
        return x1
    if q <= 0.0:
        return x2
    lo, hi = min(x1, x2), max(x1, x2)
    if hi - lo <= 1e-14 * max(hi, 1e-300):
        return lo

    def f(x: float) -> float:
        return q * float(gammainc(s1, r1 * x)) + (1.0 - q) * float(gammainc(s2, r2 * x)) - prob

    # F_mix(lo) <= prob <= F_mix(hi) because each component CDF is monotone.
    f_lo, f_hi = f(lo), f(hi)
    if f_lo >= 0:
        return lo
    if f_hi <= 0:
        return hi
    return float(brentq(f, lo, hi, xtol=1e-12 * max(hi, 1.0), rtol=1e-12, maxiter=200))


@dataclass(frozen=True)
class EBGMResult:
    n: float
    e: float
    qn: float
    ebgm: float
    eb05: float
    eb95: float

    def to_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "e": self.e,
            "qn": self.qn,
            "ebgm": self.ebgm,
            "eb05": self.eb05,
            "eb95": self.eb95,
        }


def ebgm_scores(
    n: float, e: float, prior: GammaMixturePrior, *, lower: float = 0.05, upper: float = 0.95
) -> EBGMResult:
    """EBGM with the ``lower``/``upper`` posterior quantiles (EB05/EB95 by default)."""
    return EBGMResult(
        n=n,
        e=e,
        qn=qn(n, e, prior),
        ebgm=ebgm(n, e, prior),
        eb05=posterior_quantile(lower, n, e, prior),
        eb95=posterior_quantile(upper, n, e, prior),
    )


def log_marginal_likelihood(
    prior: GammaMixturePrior,
    n: ArrayLike,
    e: ArrayLike,
    weights: ArrayLike | None = None,
) -> float:
    """Untruncated marginal log-likelihood ``sum w_i ln[P f1(n_i) + (1-P) f2(n_i)]``."""
    n_arr, e_arr, w_arr = _as_arrays(n, e, weights)
    l1, l2 = _log_weights(n_arr, e_arr, prior)
    return float(np.sum(w_arr * np.logaddexp(l1, l2)))


def _as_arrays(
    n: ArrayLike, e: ArrayLike, weights: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    n_arr = np.asarray(n, dtype=float).ravel()
    e_arr = np.asarray(e, dtype=float).ravel()
    w_arr = np.ones_like(n_arr) if weights is None else np.asarray(weights, float).ravel()
    if not (n_arr.shape == e_arr.shape == w_arr.shape) or n_arr.size == 0:
        raise ValueError("n, E (and weights) must be non-empty arrays of equal length")
    if np.any(n_arr < 0) or np.any(n_arr != np.round(n_arr)) or not np.all(np.isfinite(n_arr)):
        raise ValueError("n must hold whole numbers >= 0")
    if np.any(~np.isfinite(e_arr)) or np.any(e_arr <= 0):
        raise ValueError("E must hold finite numbers > 0")
    if np.any(~np.isfinite(w_arr)) or np.any(w_arr < 0):
        raise ValueError("weights must be finite and >= 0")
    return n_arr, e_arr, w_arr


@dataclass(frozen=True)
class PriorFit:
    prior: GammaMixturePrior
    log_likelihood: float
    converged: bool
    message: str


#: openEBGM's documented default starting point.
DEFAULT_START = GammaMixturePrior(0.2, 0.1, 2.0, 4.0, 1.0 / 3.0)

_LOG_BOUND = 12.0  # keep exp(transformed) within ~[6e-6, 1.6e5]
_LOGIT_BOUND = 12.0


def _pack(prior: GammaMixturePrior) -> NDArray[np.float64]:
    p = min(max(prior.p, 1e-5), 1 - 1e-5)
    return np.array(
        [
            math.log(prior.alpha1),
            math.log(prior.beta1),
            math.log(prior.alpha2),
            math.log(prior.beta2),
            float(logit(p)),
        ]
    )


def _unpack(x: NDArray[np.float64]) -> GammaMixturePrior:
    y = np.clip(x, -_LOG_BOUND, _LOG_BOUND)
    return GammaMixturePrior(
        float(np.exp(y[0])),
        float(np.exp(y[1])),
        float(np.exp(y[2])),
        float(np.exp(y[3])),
        float(expit(np.clip(x[4], -_LOGIT_BOUND, _LOGIT_BOUND))),
    )


def fit_prior(
    n: ArrayLike,
    e: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    starts: Sequence[GammaMixturePrior] | None = None,
) -> PriorFit:
    """Fit the two-gamma prior by (untruncated) marginal maximum likelihood.

    Optimises over ``(ln a1, ln b1, ln a2, ln b2, logit P)`` with Nelder-Mead followed
    by an L-BFGS-B polish, from each start in ``starts`` (default: openEBGM's default
    start), and keeps the best.  The two components are not identifiable by label: a
    fit may return them in either order.
    """
    n_arr, e_arr, w_arr = _as_arrays(n, e, weights)
    total_weight = float(np.sum(w_arr)) or 1.0

    def objective(x: NDArray[np.float64]) -> float:
        prior = _unpack(x)
        l1, l2 = _log_weights(n_arr, e_arr, prior)
        value = -float(np.sum(w_arr * np.logaddexp(l1, l2))) / total_weight
        return value if math.isfinite(value) else 1e300

    best: Any = None
    for start in starts or [DEFAULT_START]:
        first = minimize(
            objective,
            _pack(start),
            method="Nelder-Mead",
            options={"maxiter": 4000, "xatol": 1e-8, "fatol": 1e-12},
        )
        bounds = [(-_LOG_BOUND, _LOG_BOUND)] * 4 + [(-_LOGIT_BOUND, _LOGIT_BOUND)]
        x0 = np.clip(first.x, -_LOG_BOUND, _LOG_BOUND)
        second = minimize(objective, x0, method="L-BFGS-B", bounds=bounds)
        result = second if second.fun <= first.fun else first
        if best is None or result.fun < best.fun:
            best = result
    prior = _unpack(best.x)
    return PriorFit(
        prior=prior,
        log_likelihood=log_marginal_likelihood(prior, n_arr, e_arr, w_arr),
        converged=bool(best.success),
        message=str(best.message),
    )
