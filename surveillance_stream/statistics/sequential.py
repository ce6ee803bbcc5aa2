"""Sequential monitoring: MaxSPRT (Kulldorff et al. 2011) and a risk-adjusted CUSUM.

Poisson MaxSPRT
    With ``c`` observed events and ``mu`` expected events under H0 (RR = 1),
    ``LLR = (mu - c) + c ln(c / mu)`` when ``c > mu`` and 0 otherwise.  Surveillance is
    continuous in time, measured in expected events under H0, up to an upper limit
    ``T``; a signal needs ``LLR >= cv`` and at least ``M`` events.

Exact Poisson critical values
    For fixed ``c`` the LLR decreases as ``mu`` grows, so it can only cross the boundary
    at the arrival of an event.  The ``c``-th event signals iff it arrives by
    ``mu_c``, the root in ``(0, c)`` of ``mu - c + c ln(c/mu) = cv``, which in closed form
    is ``mu_c = -c W0(-exp(-1 - cv/c))`` (``W0`` = principal Lambert W branch); ``mu_c``
    increases with ``c``.  Under H0 the events form a unit-rate Poisson process ``N(t)``,
    so "no signal by T" is the event ``N(t_c) <= c - 1`` for every ``c >= M`` with
    ``t_c = min(mu_c, T)`` (checking up to the first ``c`` with ``mu_c >= T``).  We carry
    the sub-probability vector ``P(N(t) = k, no signal yet)`` forward from one
    ``t_c`` to the next by convolving with Poisson increments and truncating at
    ``k <= c - 1``; the mass removed is the probability of signalling at ``t_c``.
    This is the exact iterative calculation of Kulldorff et al. (2011), section 4,
    also used by ``CV.Poisson`` in the R package ``Sequential``.  The alpha is a
    continuous, decreasing function of ``cv``, so the critical value solves
    ``alpha(cv) = alpha`` (``brentq``) and ``alpha_attained`` equals the target up to
    the solver tolerance (never above it).

Binomial MaxSPRT
    Each event is a case (exposed) with probability ``p0 = 1/(1+z)`` under H0, where
    ``z`` is the matching ratio (controls per case, or control/risk window ratio).
    After ``n`` events of which ``c`` are cases,
    ``LLR = c ln(c (1+z)/n) + (n-c) ln((n-c)(1+z)/(z n))`` when ``c/n > p0``, else 0.
    The exact alpha comes from the Markov chain of ``(n, c)`` with absorption at the
    boundary, for ``n = 1..N``.  Here ``M`` is the minimum number of *cases* before a
    signal may occur (the wording of ``CV.G.Binomial`` in ``Sequential``).  Because
    the LLR takes finitely many values, alpha is a step function of ``cv``: we return
    the least conservative critical value whose alpha does not exceed the target.
    Every ``cv`` in ``(cv_lower, cv_upper]`` defines the same test. ``cv`` is reported as
    R Sequential's ``CV.Binomial`` reports it, the attainable LLR value at the boundary
    (``cv_upper``), so a reviewer checking against Sequential sees the same number;
    decisions compare with ``cv_midpoint`` (:attr:`CriticalValue.threshold`), halfway to
    the next attainable value below, so floating-point noise in an LLR can never flip one.

Risk-adjusted CUSUM (Steiner et al. 2000)
    Bernoulli outcome ``y`` with predicted risk ``p``; testing odds ratio ``R0`` (usually
    1) against ``RA``, the log-likelihood-ratio weight is
    ``W = y ln(RA/R0) - ln[(1 - p + RA p) / (1 - p + R0 p)]`` and
    ``S_t = max(0, S_{t-1} + W_t)``; signal when ``S_t >= h`` (then reset to 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import brentq
from scipy.special import lambertw
from scipy.stats import poisson

__all__ = [
    "CriticalValue",
    "CusumStep",
    "RiskAdjustedCusum",
    "binomial_alpha",
    "binomial_critical_value",
    "binomial_llr",
    "grouped_cusum",
    "poisson_alpha",
    "poisson_critical_value",
    "poisson_llr",
    "poisson_signal_times",
    "risk_adjusted_cusum",
]


# --------------------------------------------------------------------------- LLRs


def poisson_llr(observed: float, expected: float) -> float:
    """Poisson MaxSPRT log-likelihood ratio (one-sided, RR > 1)."""
    if not (math.isfinite(observed) and observed >= 0):
        raise ValueError(f"observed must be a finite number >= 0, got {observed!r}")
    if not (math.isfinite(expected) and expected > 0):
        raise ValueError(f"expected must be a finite number > 0, got {expected!r}")
    c, mu = float(observed), float(expected)
    if c <= mu:
        return 0.0
    return (mu - c) + c * math.log(c / mu)


def binomial_llr(cases: float, controls: float, z: float) -> float:
    """Binomial MaxSPRT log-likelihood ratio with matching ratio ``z`` (p0 = 1/(1+z))."""
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a finite number > 0, got {z!r}")
    for name, value in (("cases", cases), ("controls", controls)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    c, x = float(cases), float(controls)
    n = c + x
    if n == 0 or c * (1.0 + z) <= n:  # c/n <= p0
        return 0.0
    llr = c * math.log(c * (1.0 + z) / n)
    if x > 0:
        llr += x * math.log(x * (1.0 + z) / (z * n))
    return llr


# ------------------------------------------------------------- Poisson exact alpha


@dataclass(frozen=True)
class CriticalValue:
    """A MaxSPRT critical value and the exact type I error it attains."""

    cv: float
    alpha_attained: float
    alpha: float
    model: str
    T: float | None = None
    N: int | None = None
    z: float | None = None
    M: int = 1
    cv_lower: float | None = None
    cv_upper: float | None = None
    #: binomial only: halfway between the attainable values around the boundary (our own
    #: field, what decisions compare with; ``cv`` is what R Sequential reports)
    cv_midpoint: float | None = None

    @property
    def threshold(self) -> float:
        """What an LLR is compared with: ``cv_midpoint`` where there is one, else ``cv``."""
        return self.cv_midpoint if self.cv_midpoint is not None else self.cv

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "cv": self.cv,
            "alpha_attained": self.alpha_attained,
            "alpha": self.alpha,
            "model": self.model,
            "T": self.T,
            "N": self.N,
            "z": self.z,
            "M": self.M,
            "cv_lower": self.cv_lower,
            "cv_upper": self.cv_upper,
            "cv_midpoint": self.cv_midpoint,
        }


def _check_poisson_design(T: float, M: int) -> None:
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"T must be a finite number > 0, got {T!r}")
    if isinstance(M, bool) or int(M) != M or M < 1:
        raise ValueError(f"M must be a whole number >= 1, got {M!r}")


def poisson_signal_times(cv: float, counts: NDArray[np.float64]) -> NDArray[np.float64]:
    """``mu_c``: the largest expected count at which ``c`` events give ``LLR >= cv``."""
    c = np.asarray(counts, dtype=float)
    arg = -np.exp(-1.0 - cv / c)
    return np.asarray(-c * np.real(lambertw(arg, 0)), dtype=float)


def _poisson_increment(dt: float, size: int) -> NDArray[np.float64]:
    """Poisson(dt) pmf for 0..min(size-1, far tail); the rest is below 1e-20."""
    if dt <= 0:
        out = np.zeros(1)
        out[0] = 1.0
        return out
    upper = int(dt + 14.0 * math.sqrt(dt) + 40.0)
    k = np.arange(min(size, upper + 1))
    return np.asarray(poisson.pmf(k, dt), dtype=float)


def poisson_alpha(cv: float, T: float, M: int = 1) -> float:
    """Exact type I error of the continuous Poisson MaxSPRT with critical value ``cv``."""
    _check_poisson_design(T, M)
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
    M = int(M)
    # Boundary times for c = M, M+1, ... up to the first c with mu_c >= T.
    times: list[float] = []
    c = M
    chunk = max(64, int(2 * T) + 16)
    while True:
        counts = np.arange(c, c + chunk, dtype=float)
        mus = poisson_signal_times(cv, counts)
        hit = np.nonzero(mus >= T)[0]
        if hit.size:
            times.extend(mus[: hit[0]].tolist())
            times.append(T)
            break
        times.extend(mus.tolist())
        c += chunk
    # p[k] = P(N(t) = k, no signal so far); starts at t = 0 with N = 0.
    p = np.zeros(1)
    p[0] = 1.0
    t = 0.0
    for i, t_c in enumerate(times):
        c = M + i
        inc = _poisson_increment(t_c - t, c)
        p = np.convolve(p, inc)[:c]  # states k <= c - 1 survive, k >= c signal
        t = t_c
    return float(max(0.0, 1.0 - p.sum()))


def _max_poisson_alpha(T: float, M: int) -> float:
    """sup over cv > 0 of the alpha (the limit cv -> 0)."""
    return poisson_alpha(1e-9, T, M)


@lru_cache(maxsize=512)
def poisson_critical_value(T: float, M: int = 1, alpha: float = 0.05) -> CriticalValue:
    """Exact critical value of the continuous Poisson MaxSPRT (cf. ``CV.Poisson``).

    ``T`` is the upper limit on surveillance in expected events under H0; ``M`` the
    minimum number of events before a signal is allowed.  Raises ``ValueError`` when
    no positive ``cv`` reaches ``alpha`` (e.g. ``P(N(T) >= M) < alpha``).
    """
    _check_poisson_design(T, M)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    reachable = _max_poisson_alpha(T, M)
    if reachable < alpha:
        raise ValueError(
            f"no critical value attains alpha={alpha}: with T={T} and M={M} the largest "
            f"attainable alpha is {reachable:.6g}; increase T or decrease M"
        )
    lo, hi = 1e-9, 4.0
    while poisson_alpha(hi, T, M) > alpha:
        lo, hi = hi, hi * 2.0
    cv = float(brentq(lambda x: poisson_alpha(x, T, M) - alpha, lo, hi, xtol=1e-11, rtol=1e-13))
    attained = poisson_alpha(cv, T, M)
    while attained > alpha:  # make sure the reported value is never liberal
        cv = math.nextafter(cv, math.inf) + 1e-12
        attained = poisson_alpha(cv, T, M)
    return CriticalValue(cv=cv, alpha_attained=attained, alpha=alpha, model="poisson", T=T, M=M)


# ------------------------------------------------------------ binomial exact alpha


def _check_binomial_design(N: int, z: float, M: int) -> None:
    if isinstance(N, bool) or int(N) != N or N < 1:
        raise ValueError(f"N must be a whole number >= 1, got {N!r}")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a finite number > 0, got {z!r}")
    if isinstance(M, bool) or int(M) != M or M < 1:
        raise ValueError(f"M must be a whole number >= 1, got {M!r}")


@lru_cache(maxsize=64)
def _binomial_llr_rows(N: int, z: float) -> tuple[NDArray[np.float64], ...]:
    """Row ``n`` (n = 0..N) holds the LLR for c = 0..n cases; computed once, reused."""
    rows: list[NDArray[np.float64]] = [np.zeros(1)]
    k = 1.0 + z
    for n in range(1, N + 1):
        c = np.arange(n + 1, dtype=float)
        x = n - c
        with np.errstate(divide="ignore", invalid="ignore"):
            term_c = np.where(c > 0, c * np.log(c * k / n), 0.0)
            term_x = np.where(x > 0, x * np.log(x * k / (z * n)), 0.0)
        llr = np.where(c * k > n, term_c + term_x, 0.0)
        llr.setflags(write=False)
        rows.append(llr)
    return tuple(rows)


def binomial_alpha(cv: float, N: int, z: float, M: int = 1) -> float:
    """Exact type I error of the continuous binomial MaxSPRT (signal iff LLR >= cv, c >= M)."""
    _check_binomial_design(N, z, M)
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
    return _binomial_alpha(cv, int(N), float(z), int(M))


def _binomial_alpha(cv: float, N: int, z: float, M: int) -> float:
    rows = _binomial_llr_rows(N, z)
    p0 = 1.0 / (1.0 + z)
    p = np.zeros(N + 1)  # p[c] = P(c cases so far, no signal yet)
    p[0] = 1.0
    signalled = 0.0
    for n in range(1, N + 1):
        # one more event: a case with prob p0
        p[1 : n + 1] = p[1 : n + 1] * (1.0 - p0) + p[0:n] * p0
        p[0] *= 1.0 - p0
        llr = rows[n]
        absorb = llr >= cv
        absorb[: min(M, n + 1)] = False
        if absorb.any():
            mask = np.zeros(N + 1, dtype=bool)
            mask[: n + 1] = absorb
            signalled += float(p[mask].sum())
            p[mask] = 0.0
    return signalled


@lru_cache(maxsize=256)
def binomial_critical_value(N: int, z: float, M: int = 1, alpha: float = 0.05) -> CriticalValue:
    """Exact critical value of the continuous binomial MaxSPRT (cf. ``CV.Binomial``).

    ``N`` is the upper limit on the total number of events (cases + controls).
    Returns the largest rejection region (in LLR) whose exact alpha is <= ``alpha``; ``cv``
    is its lowest attainable LLR (``cv_upper``, as ``CV.Binomial`` reports it) and
    ``cv_midpoint`` the middle of ``(cv_lower, cv_upper]``, all of which define that region.
    """
    _check_binomial_design(N, z, M)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    N, M, z = int(N), int(M), float(z)
    rows = _binomial_llr_rows(N, z)
    values = np.unique(np.concatenate([row[M:] for row in rows[M:]] or [np.zeros(0)]))
    values = values[values > 0]
    if values.size == 0:
        raise ValueError(f"no signal is possible with N={N}, z={z}, M={M}")
    # alpha(v) is non-increasing in v; find the first lattice value with alpha <= target.
    lo, hi = 0, values.size - 1
    if _binomial_alpha(float(values[hi]), N, z, M) > alpha:
        raise ValueError(
            f"no critical value attains alpha={alpha} with N={N}, z={z}, M={M}: even the "
            f"most extreme outcome has probability above alpha; increase N or decrease M"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if _binomial_alpha(float(values[mid]), N, z, M) <= alpha:
            hi = mid
        else:
            lo = mid + 1
    upper = float(values[lo])
    lower = float(values[lo - 1]) if lo > 0 else 0.0
    return CriticalValue(
        cv=upper,
        alpha_attained=_binomial_alpha(upper, N, z, M),
        alpha=alpha,
        model="binomial",
        N=N,
        z=z,
        M=M,
        cv_lower=lower,
        cv_upper=upper,
        cv_midpoint=(lower + upper) / 2.0,
    )


# ------------------------------------------------------------ risk-adjusted CUSUM


@dataclass(frozen=True)
class CusumStep:
    weight: float
    score: float
    signal: bool


class RiskAdjustedCusum:
    """Steiner et al. (2000) risk-adjusted Bernoulli CUSUM.

    ``update(outcome, risk)`` adds one patient (outcome 0/1, predicted risk in (0, 1))
    and returns the new :class:`CusumStep`.  After a signal the score restarts at 0
    when ``reset_on_signal`` is true.
    """

    def __init__(
        self,
        odds_ratio: float = 2.0,
        threshold: float = 4.5,
        *,
        null_odds_ratio: float = 1.0,
        reset_on_signal: bool = True,
    ) -> None:
        for name, value in (("odds_ratio", odds_ratio), ("null_odds_ratio", null_odds_ratio)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if odds_ratio == null_odds_ratio:
            raise ValueError("odds_ratio must differ from null_odds_ratio")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
        self.odds_ratio = float(odds_ratio)
        self.null_odds_ratio = float(null_odds_ratio)
        self.threshold = float(threshold)
        self.reset_on_signal = reset_on_signal
        self.score = 0.0

    def weight(self, outcome: int, risk: float) -> float:
        """Log-likelihood-ratio weight of one outcome."""
        if isinstance(outcome, bool) or outcome not in (0, 1):
            raise ValueError(f"outcome must be 0 or 1, got {outcome!r}")
        if not 0.0 < risk < 1.0:
            raise ValueError(f"risk must be in (0, 1), got {risk!r}")
        ra, r0 = self.odds_ratio, self.null_odds_ratio
        w = -math.log((1.0 - risk + ra * risk) / (1.0 - risk + r0 * risk))
        if outcome == 1:
            w += math.log(ra / r0)
        return w

    def update(self, outcome: int, risk: float) -> CusumStep:
        w = self.weight(outcome, risk)
        score = max(0.0, self.score + w)
        signal = score >= self.threshold
        self.score = 0.0 if signal and self.reset_on_signal else score
        return CusumStep(weight=w, score=score, signal=signal)

    def reset(self) -> None:
        self.score = 0.0


def risk_adjusted_cusum(
    outcomes: Iterable[int],
    risks: Sequence[float] | Iterable[float],
    *,
    odds_ratio: float = 2.0,
    threshold: float = 4.5,
    null_odds_ratio: float = 1.0,
    reset_on_signal: bool = True,
) -> list[CusumStep]:
    """Run :class:`RiskAdjustedCusum` over paired outcome/risk sequences."""
    chart = RiskAdjustedCusum(
        odds_ratio, threshold, null_odds_ratio=null_odds_ratio, reset_on_signal=reset_on_signal
    )
    outcomes_list, risks_list = list(outcomes), list(risks)
    if len(outcomes_list) != len(risks_list):
        raise ValueError("outcomes and risks must have the same length")
    return [chart.update(y, p) for y, p in zip(outcomes_list, risks_list, strict=True)]


def grouped_cusum(
    groups: Iterable[tuple[int, Sequence[tuple[int, float]]]],
    *,
    odds_ratio: float = 2.0,
    threshold: float = 4.5,
) -> list[CusumStep]:
    """The risk-adjusted Bernoulli CUSUM of Steiner et al. (2000) taken one group at a time.

    Each group is ``(events, [(patients, risk), ...])``: the number of patients with the outcome
    and, per risk level, how many patients had that predicted risk. The group's weight is the
    sum of its patients' :meth:`RiskAdjustedCusum.weight` (``events * ln(RA)`` plus, per
    patient, ``-ln(1 - p + RA p)``), which needs only those counts, so the chart can be kept
    from aggregate counters; the score is clipped at zero between groups, not within one. The
    score is not reset after a signal (a live chart reports whether it is over ``h``).
    """
    chart = RiskAdjustedCusum(odds_ratio, threshold, reset_on_signal=False)
    steps = []
    for events, risks in groups:
        if events < 0:
            raise ValueError(f"events must be >= 0, got {events!r}")
        weight = 0.0
        for patients, risk in risks:
            if patients and 0.0 < risk < 1.0:
                weight += patients * chart.weight(0, risk)
        if events:
            weight += events * math.log(chart.odds_ratio / chart.null_odds_ratio)
        score = max(0.0, chart.score + weight)
        chart.score = score
        steps.append(CusumStep(weight=weight, score=score, signal=score >= chart.threshold))
    return steps
