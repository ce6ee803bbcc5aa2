"""Disproportionality statistics on a 2x2 report table.

Table layout (every function here takes the four cells in this order)::

                              event of interest   all other events
    device of interest               a                   b
    other devices (same class)       c                   d

* ``a`` -- reports for the device *with* the event
* ``b`` -- reports for the device *without* the event
* ``c`` -- reports for other devices of the same class *with* the event
* ``d`` -- reports for other devices of the same class *without* the event

Zero-cell conventions (see ``docs/explanation/statistics.md``):

* A ratio whose numerator and denominator are both zero (e.g. PRR when ``a + b == 0``)
  is undefined and returned as ``None``.
* A positive number divided by zero is ``math.inf`` (e.g. PRR when ``c == 0 < a``).
* A confidence interval whose standard error involves ``1/0`` (any of the cells in the
  SE formula is zero) is ``(None, None)``.
* ``haldane=True`` adds 0.5 to *every* cell before computing PRR and ROR (and their
  intervals), but only when at least one cell is zero.  It never touches the
  chi-squared statistics or the information component, which use the raw counts.
* ``to_dict()`` maps ``nan``/``inf`` to ``None`` so the result is always JSON-safe.

All functions are pure and scalar (``math`` plus two ``scipy.special`` calls), so they
are cheap enough to run per event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scipy.special import gammaincinv, ndtri

__all__ = [
    "DisproportionalityResult",
    "chi_squared",
    "disproportionality",
    "evans_signal",
    "expected_count",
    "information_component",
    "information_component_of",
    "prr",
    "ror",
]

Interval = tuple[float | None, float | None]


def _check_cells(a: float, b: float, c: float, d: float) -> None:
    for name, value in (("a", a), ("b", b), ("c", c), ("d", d)):
        if isinstance(value, bool):
            raise TypeError(f"cell {name} must be a number, not bool")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"cell {name} must be a finite number >= 0, got {value!r}")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(ndtri(0.5 + confidence / 2.0))


def _ratio(num: float, den: float) -> float | None:
    """num / den with 0/0 -> None and x/0 -> inf (num, den >= 0)."""
    if den == 0:
        return None if num == 0 else math.inf
    return num / den


def _log_interval(point: float | None, se: float | None, z: float) -> Interval:
    if point is None or se is None or not math.isfinite(point) or point <= 0:
        return (None, None)
    log_point = math.log(point)
    return (math.exp(log_point - z * se), math.exp(log_point + z * se))


def _haldane(a: float, b: float, c: float, d: float) -> tuple[float, float, float, float]:
    if min(a, b, c, d) == 0:
        return a + 0.5, b + 0.5, c + 0.5, d + 0.5
    return a, b, c, d


def prr(
    a: float, b: float, c: float, d: float, *, confidence: float = 0.95, haldane: bool = False
) -> tuple[float | None, Interval]:
    """Proportional reporting ratio ``[a/(a+b)] / [c/(c+d)]`` and its log-normal CI.

    SE(ln PRR) = sqrt(1/a - 1/(a+b) + 1/c - 1/(c+d)) (Evans et al. 2001).
    """
    _check_cells(a, b, c, d)
    z = _z(confidence)
    if haldane:
        a, b, c, d = _haldane(a, b, c, d)
    if a + b == 0 or c + d == 0:
        return None, (None, None)
    point = _ratio(a / (a + b), c / (c + d))
    if a == 0 or c == 0:
        return point, (None, None)
    se = math.sqrt(max(1.0 / a - 1.0 / (a + b) + 1.0 / c - 1.0 / (c + d), 0.0))
    return point, _log_interval(point, se, z)


def ror(
    a: float, b: float, c: float, d: float, *, confidence: float = 0.95, haldane: bool = False
) -> tuple[float | None, Interval]:
    """Reporting odds ratio ``(a d) / (b c)`` and its log-normal (Woolf) CI.

    SE(ln ROR) = sqrt(1/a + 1/b + 1/c + 1/d).
    """
    _check_cells(a, b, c, d)
    z = _z(confidence)
    if haldane:
        a, b, c, d = _haldane(a, b, c, d)
    point = _ratio(a * d, b * c)
    if min(a, b, c, d) == 0:
        return point, (None, None)
    se = math.sqrt(1.0 / a + 1.0 / b + 1.0 / c + 1.0 / d)
    return point, _log_interval(point, se, z)


def chi_squared(a: float, b: float, c: float, d: float, *, yates: bool = False) -> float | None:
    """Pearson chi-squared statistic (1 df) of the 2x2 table.

    ``N (ad - bc)^2 / [(a+b)(c+d)(a+c)(b+d)]``; with Yates' correction
    ``N max(0, |ad - bc| - N/2)^2 / [...]`` (the correction never pushes an observed
    count past its expected count, as in ``scipy.stats.chi2_contingency``).
    ``None`` when a margin is zero (the statistic is undefined).
    """
    _check_cells(a, b, c, d)
    n = a + b + c + d
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    if denominator == 0:
        return None
    diff = abs(a * d - b * c)
    if yates:
        diff = max(0.0, diff - n / 2.0)
    return n * diff * diff / denominator


def evans_signal(prr_value: float | None, chi2_yates: float | None, a: float) -> bool:
    """Evans et al. (2001) screening rule: PRR >= 2, Yates chi-squared >= 4 and a >= 3."""
    if prr_value is None or chi2_yates is None:
        return False
    return prr_value >= 2.0 and chi2_yates >= 4.0 and a >= 3


def expected_count(a: float, b: float, c: float, d: float) -> float | None:
    """Expected count of cell ``a`` under independence, ``E = (a+b)(a+c)/N``."""
    _check_cells(a, b, c, d)
    n = a + b + c + d
    if n == 0:
        return None
    return (a + b) * (a + c) / n


def information_component(
    a: float, b: float, c: float, d: float, *, credibility: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """Shrinkage information component and its credibility interval.

    ``IC = log2((a + 0.5) / (E + 0.5))`` with ``E = (a+b)(a+c)/N``; the interval uses
    the gamma quantiles of Noren et al. (2013):
    ``IC_q = log2(Gamma^-1(q; shape=a+0.5, rate=E+0.5))``.
    Returns ``(ic, ic_low, ic_high)`` -- IC025/IC975 for the default 95 %.
    """
    return information_component_of(a, expected_count(a, b, c, d), credibility=credibility)


def information_component_of(
    a: float, expected: float | None, *, credibility: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """:func:`information_component` for an observed count and any expected count (e.g. one
    standardised over strata)."""
    if not 0.0 < credibility < 1.0:
        raise ValueError(f"credibility must be in (0, 1), got {credibility!r}")
    if expected is None:
        return None, None, None
    shape, rate = a + 0.5, expected + 0.5
    tail = (1.0 - credibility) / 2.0
    ic = math.log2(shape / rate)
    low = float(gammaincinv(shape, tail)) / rate
    high = float(gammaincinv(shape, 1.0 - tail)) / rate
    ic_low = math.log2(low) if low > 0 else -math.inf
    return ic, ic_low, math.log2(high)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class DisproportionalityResult:
    """All disproportionality statistics for one 2x2 table (see module docstring)."""

    a: float
    b: float
    c: float
    d: float
    prr: float | None
    prr_ci: Interval
    ror: float | None
    ror_ci: Interval
    chi2: float | None
    chi2_yates: float | None
    expected: float | None
    ic: float | None
    ic025: float | None
    ic975: float | None
    evans_signal: bool
    haldane: bool = False
    confidence: float = field(default=0.95)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with JSON-safe values (``None`` instead of ``nan``/``inf``)."""
        return {
            "a": self.a,
            "b": self.b,
            "c": self.c,
            "d": self.d,
            "prr": _json_safe(self.prr),
            "prr_ci": _json_safe(self.prr_ci),
            "ror": _json_safe(self.ror),
            "ror_ci": _json_safe(self.ror_ci),
            "chi2": _json_safe(self.chi2),
            "chi2_yates": _json_safe(self.chi2_yates),
            "expected": _json_safe(self.expected),
            "ic": _json_safe(self.ic),
            "ic025": _json_safe(self.ic025),
            "ic975": _json_safe(self.ic975),
            "evans_signal": self.evans_signal,
            "haldane": self.haldane,
            "confidence": self.confidence,
        }


def disproportionality(
    a: float, b: float, c: float, d: float, *, confidence: float = 0.95, haldane: bool = False
) -> DisproportionalityResult:
    """Compute PRR, ROR, chi-squared (plain and Yates), IC and the Evans rule.

    ``confidence`` sets both the PRR/ROR confidence level and the IC credibility level.
    The Evans rule always uses the *uncorrected* PRR and the raw ``a``.
    """
    prr_value, prr_ci = prr(a, b, c, d, confidence=confidence, haldane=haldane)
    ror_value, ror_ci = ror(a, b, c, d, confidence=confidence, haldane=haldane)
    raw_prr = prr_value if not haldane else prr(a, b, c, d, confidence=confidence)[0]
    chi2 = chi_squared(a, b, c, d)
    chi2_yates = chi_squared(a, b, c, d, yates=True)
    ic, ic_low, ic_high = information_component(a, b, c, d, credibility=confidence)
    return DisproportionalityResult(
        a=a,
        b=b,
        c=c,
        d=d,
        prr=prr_value,
        prr_ci=prr_ci,
        ror=ror_value,
        ror_ci=ror_ci,
        chi2=chi2,
        chi2_yates=chi2_yates,
        expected=expected_count(a, b, c, d),
        ic=ic,
        ic025=ic_low,
        ic975=ic_high,
        evans_signal=evans_signal(raw_prr, chi2_yates, a),
        haldane=haldane,
        confidence=confidence,
    )
