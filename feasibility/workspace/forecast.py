"""The accrual forecast: when a trial (or one site on its own) reaches its target.

**Model** (``docs/explanation/sponsor-workspace.md``): new eligible patients arrive at a site as
a Poisson process of rate λ per day; each converts (is enrolled) with probability p, so
enrolments are a Poisson process of rate λ·p, and the wait for the R enrolments still needed is
Gamma(R, λ·p). λ and p are not known: λ has the Jeffreys-prior posterior Gamma(n + ½, W) from n
entries seen over W days, so entries over a future period are negative binomial; p has the
posterior Beta(k + ½, m - k + ½) from k enrolments among m candidates. The projected date is the
median of the predictive distribution of the wait, with an equal-tailed interval at the
stated level, by Monte Carlo (4,000 draws, seeded from the inputs, so the same inputs always
give the same answer).

Only protected counts go in (rates are computed from protected counts only): a shown count is
rounded to a multiple of the policy's rounding, so each draw takes the true count uniformly
within half a rounding step of the shown one; a withheld count gives no forecast (entries), or
no knowledge of p (conversion: the prior alone, and the answer says so).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

#: The interval's level.
LEVEL = 0.9
#: Monte Carlo draws per forecast.
DRAWS = 4000
#: Waits longer than this are reported as beyond it.
HORIZON_DAYS = 3650.0

MODEL = (
    "enrolments: Poisson arrivals of eligible patients (Jeffreys gamma posterior of the rate "
    "from entries seen, negative binomial over future periods) times the observed conversion "
    "(Jeffreys beta posterior from enrolments among candidates); the wait for the remaining "
    "target is gamma given both; median and equal-tailed 90% interval over 4,000 seeded draws"
)


@dataclass(frozen=True)
class ForecastInputs:
    """Protected counts (None: withheld) behind one forecast."""

    #: New eligible patients seen over ``window_days`` (None: withheld).
    entries: int | None
    window_days: float
    #: Enrolled among ``candidates`` (either None: conversion not known; the prior alone).
    enrolled: int | None
    candidates: int | None
    #: Enrolments still needed to reach the target.
    remaining: int
    #: The policy's rounding of shown counts (1: exact).
    rounding: int = 1


@dataclass(frozen=True)
class Forecast:
    """Days from now until the target is reached: median and interval (None: not forecast,
    ``reason`` says why; ``inf`` beyond the horizon)."""

    median_days: float | None
    low_days: float | None
    high_days: float | None
    level: float
    reason: str | None = None
    conversion_known: bool = True

    def to_dict(self, now: datetime) -> dict[str, Any]:
        def date(days: float | None) -> str | None:
            if days is None or math.isinf(days):
                return None
            return (now + timedelta(days=days)).date().isoformat()

        def shown(days: float | None) -> float | None:
            return None if days is None or math.isinf(days) else round(days, 1)

        return {
            "forecast": self.median_days is not None,
            "reason": self.reason,
            "level": self.level,
            "median_days": shown(self.median_days),
            "interval_days": [shown(self.low_days), shown(self.high_days)],
            "projected_date": date(self.median_days),
            "interval": [date(self.low_days), date(self.high_days)],
            "beyond_horizon": self.high_days is not None and math.isinf(self.high_days),
            "horizon_days": HORIZON_DAYS,
            "conversion_known": self.conversion_known,
        }


def _seed(inputs: ForecastInputs, level: float) -> int:
    digest = hashlib.sha256(repr((inputs, level)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _around(shown: int, rounding: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """True counts consistent with a shown (rounded) one: uniform within half a step."""
    if rounding <= 1:
        return np.full(draws, float(shown))
    half = rounding / 2
    return np.clip(rng.uniform(shown - half, shown + half, draws), 0.0, None)


def forecast(inputs: ForecastInputs, level: float = LEVEL, draws: int = DRAWS) -> Forecast:
    """The wait until ``inputs.remaining`` more enrolments (see the module docstring)."""
    if inputs.remaining <= 0:
        return Forecast(0.0, 0.0, 0.0, level, "the target is reached")
    if inputs.entries is None:
        return Forecast(None, None, None, level, "entries are withheld to protect small counts")
    if inputs.window_days <= 0:
        return Forecast(None, None, None, level, "no arrivals observed yet")
    part = Part(
        inputs.entries, inputs.window_days, inputs.enrolled, inputs.candidates, inputs.rounding
    )
    return forecast_pooled([part], inputs.remaining, level, draws, _seed(inputs, level))


@dataclass(frozen=True)
class Part:
    """One source's protected counts behind a pooled forecast (a node of a federation, or a
    site named by several): its arrivals, its conversion (either None: not known) and the
    rounding its counts were shown at."""

    entries: int
    window_days: float
    enrolled: int | None
    candidates: int | None
    rounding: int = 1


def forecast_pooled(
    parts: Sequence[Part],
    remaining: int,
    level: float = LEVEL,
    draws: int = DRAWS,
    seed: int | None = None,
    conversion: Sequence[Part] | None = None,
) -> Forecast:
    """The wait until ``remaining`` more enrolments when patients arrive at several independent
    sources at once: the rate is the sum of each source's rate (each with its own posterior
    from its own entries and window), the conversion is pooled over the sources that observed
    one (enrolled and candidates summed, each drawn within its own rounding). One part is
    exactly :func:`forecast` (same draws in the same order). ``seed`` None: from the inputs.
    ``conversion``: the parts whose enrolled and candidates give the conversion, when not the
    arrivals' own (a site's forecast with the conversion of every recruiting site)."""
    if remaining <= 0:
        return Forecast(0.0, 0.0, 0.0, level, "the target is reached")
    if not parts:
        return Forecast(None, None, None, level, "no source with arrivals to forecast from")
    if any(p.window_days <= 0 for p in parts):
        return Forecast(None, None, None, level, "no arrivals observed yet")
    if seed is None:
        inputs = (tuple(parts), remaining, level, None if conversion is None else tuple(conversion))
        digest = hashlib.sha256(repr(inputs).encode()).digest()
        seed = int.from_bytes(digest[:8], "big")
    rng = np.random.default_rng(seed)
    rate = np.zeros(draws)
    for part in parts:
        n = _around(part.entries, part.rounding, draws, rng)
        rate = rate + rng.gamma(n + 0.5, 1.0 / part.window_days)
    converting = parts if conversion is None else conversion
    observed = [p for p in converting if p.enrolled is not None and p.candidates is not None]
    known = bool(observed)
    if known:
        m = np.zeros(draws)
        k = np.zeros(draws)
        for part in observed:
            assert part.enrolled is not None and part.candidates is not None
            m_i = _around(part.candidates, part.rounding, draws, rng)
            k = k + np.minimum(_around(part.enrolled, part.rounding, draws, rng), m_i)
            m = m + m_i
        p = rng.beta(k + 0.5, m - k + 0.5)
    else:
        p = rng.beta(0.5, 0.5, draws)
    speed = rate * p
    with np.errstate(divide="ignore"):
        wait = np.where(speed > 0, rng.gamma(float(remaining), 1.0, draws) / speed, np.inf)
    wait = np.where(wait > HORIZON_DAYS, np.inf, wait)
    tail = (1 - level) / 2
    ordered = np.sort(wait)  # quantiles by rank: waits beyond the horizon are infinite

    def quantile(q: float) -> float:
        return float(ordered[min(round(q * (draws - 1)), draws - 1)])

    low, median, high = quantile(tail), quantile(0.5), quantile(1 - tail)
    reason = None if known else "conversion not observed yet (withheld or none): the prior alone"
    return Forecast(median, low, high, level, reason, known)


__all__ = [
    "DRAWS",
    "LEVEL",
    "MODEL",
    "Forecast",
    "ForecastInputs",
    "Part",
    "forecast",
    "forecast_pooled",
]
