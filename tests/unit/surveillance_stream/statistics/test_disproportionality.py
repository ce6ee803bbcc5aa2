"""Disproportionality statistics against independently computed references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from surveillance_stream.statistics import (
    chi_squared,
    disproportionality,
    evans_signal,
    information_component,
    prr,
    ror,
)

Z95 = 1.959963984540054

TABLES = [
    (10, 90, 20, 980),
    (3, 997, 5, 99995),
    (1, 1, 1, 1),
    (25, 40, 13, 77),
    (7, 0, 3, 12),  # b = 0: PRR is fine, ROR is infinite
    (500, 123456, 800, 9876543),
]


@pytest.mark.parametrize("table", TABLES)
def test_chi_squared_matches_scipy(table: tuple[int, int, int, int]) -> None:
    observed = np.array([[table[0], table[1]], [table[2], table[3]]])
    plain = stats.chi2_contingency(observed, correction=False).statistic
    yates = stats.chi2_contingency(observed, correction=True).statistic
    assert chi_squared(*table) == pytest.approx(plain, rel=1e-10)
    assert chi_squared(*table, yates=True) == pytest.approx(yates, rel=1e-10)


def test_prr_and_ror_hand_computed() -> None:
    a, b, c, d = 10, 90, 20, 980
    value, (lo, hi) = prr(a, b, c, d)
    assert value == pytest.approx(5.0)
    se = math.sqrt(1 / 10 - 1 / 100 + 1 / 20 - 1 / 1000)  # = sqrt(0.139)
    assert lo == pytest.approx(5.0 * math.exp(-Z95 * se))
    assert hi == pytest.approx(5.0 * math.exp(Z95 * se))
    assert (lo, hi) == pytest.approx((2.40779, 10.38295), rel=1e-5)

    value, (lo, hi) = ror(a, b, c, d)
    assert value == pytest.approx(10 * 980 / (90 * 20))
    se = math.sqrt(1 / 10 + 1 / 90 + 1 / 20 + 1 / 980)
    assert lo == pytest.approx(value * math.exp(-Z95 * se))
    assert hi == pytest.approx(value * math.exp(Z95 * se))


def test_confidence_level_is_respected() -> None:
    _, (lo90, hi90) = prr(10, 90, 20, 980, confidence=0.90)
    _, (lo95, hi95) = prr(10, 90, 20, 980)
    assert lo95 is not None and lo90 is not None and hi90 is not None and hi95 is not None
    assert lo95 < lo90 < 5.0 < hi90 < hi95
    se = math.sqrt(0.139)
    assert lo90 == pytest.approx(5.0 * math.exp(-stats.norm.ppf(0.95) * se))


@pytest.mark.parametrize(
    "table", [(10, 90, 20, 980), (0, 50, 3, 800), (4, 6, 0, 1000), (1, 0, 0, 5)]
)
def test_information_component_matches_gamma_quantiles(table: tuple[int, int, int, int]) -> None:
    a, b, c, d = table
    n = a + b + c + d
    e = (a + b) * (a + c) / n
    ic, ic025, ic975 = information_component(a, b, c, d)
    assert ic == pytest.approx(math.log2((a + 0.5) / (e + 0.5)))
    # Noren et al. (2013): quantiles of Gamma(shape = a + 0.5, rate = E + 0.5)
    assert ic025 == pytest.approx(math.log2(stats.gamma.ppf(0.025, a + 0.5, scale=1 / (e + 0.5))))
    assert ic975 == pytest.approx(math.log2(stats.gamma.ppf(0.975, a + 0.5, scale=1 / (e + 0.5))))


def test_information_component_no_disproportionality_is_zero() -> None:
    # a equals its expected count under independence: IC = 0 exactly.
    ic, ic025, ic975 = information_component(10, 90, 90, 810)
    assert ic == pytest.approx(0.0, abs=1e-12)
    assert ic025 is not None and ic975 is not None and ic025 < 0 < ic975


def test_full_result_and_json() -> None:
    result = disproportionality(10, 90, 20, 980)
    assert result.evans_signal is True
    payload = result.to_dict()
    for key in ("prr", "prr_ci", "ror", "ror_ci", "chi2", "chi2_yates", "ic", "ic025", "ic975"):
        assert key in payload
    json.dumps(payload, allow_nan=False)
    with pytest.raises(AttributeError):
        result.prr = 1.0  # type: ignore[misc]


class TestZeroCells:
    def test_a_zero(self) -> None:
        result = disproportionality(0, 100, 20, 980)
        assert result.prr == 0.0
        assert result.prr_ci == (None, None)
        assert result.ror == 0.0
        assert result.ror_ci == (None, None)
        assert result.ic is not None and result.ic < 0
        assert result.ic025 is not None and math.isfinite(result.ic025)
        assert result.evans_signal is False

    def test_c_zero_gives_infinite_prr_and_null_json(self) -> None:
        result = disproportionality(5, 95, 0, 1000)
        assert result.prr == math.inf
        assert result.ror == math.inf
        payload = result.to_dict()
        assert payload["prr"] is None and payload["ror"] is None
        assert payload["prr_ci"] == [None, None]
        json.dumps(payload, allow_nan=False)
        # chi-squared is still defined (no zero margin)
        assert result.chi2 == pytest.approx(
            stats.chi2_contingency(np.array([[5, 95], [0, 1000]]), correction=False).statistic
        )

    def test_empty_device_row_is_undefined(self) -> None:
        result = disproportionality(0, 0, 20, 980)
        assert result.prr is None and result.ror is None
        assert result.chi2 is None and result.chi2_yates is None
        json.dumps(result.to_dict(), allow_nan=False)

    def test_all_zero(self) -> None:
        result = disproportionality(0, 0, 0, 0)
        assert result.to_dict()["ic"] is None
        assert result.evans_signal is False

    def test_haldane_only_when_flagged_and_only_with_a_zero_cell(self) -> None:
        value, (lo, hi) = prr(5, 95, 0, 1000, haldane=True)
        assert value == pytest.approx((5.5 / 101) / (0.5 / 1001))
        assert lo is not None and hi is not None and lo < value < hi
        rvalue, _ = ror(5, 95, 0, 1000, haldane=True)
        assert rvalue == pytest.approx(5.5 * 1000.5 / (95.5 * 0.5))
        # no zero cell: the flag changes nothing
        assert prr(10, 90, 20, 980, haldane=True) == prr(10, 90, 20, 980)
        # the chi-squared and IC ignore the flag
        flagged = disproportionality(5, 95, 0, 1000, haldane=True)
        plain = disproportionality(5, 95, 0, 1000)
        assert flagged.chi2 == plain.chi2 and flagged.ic == plain.ic

    def test_invalid_cells(self) -> None:
        with pytest.raises(ValueError):
            prr(-1, 1, 1, 1)
        with pytest.raises(ValueError):
            chi_squared(1, float("nan"), 1, 1)


def test_evans_rule_boundaries() -> None:
    assert evans_signal(2.0, 4.0, 3) is True
    assert evans_signal(1.999, 10.0, 10) is False
    assert evans_signal(5.0, 3.99, 10) is False
    assert evans_signal(5.0, 10.0, 2) is False
    assert evans_signal(None, 10.0, 10) is False


def test_huge_counts_are_finite() -> None:
    result = disproportionality(2_000_000, 3_000_000_000, 1_000_000, 9_000_000_000)
    payload = result.to_dict()
    for key in ("prr", "ror", "chi2", "chi2_yates", "ic", "ic025", "ic975"):
        assert payload[key] is not None and math.isfinite(payload[key])
    assert payload["prr_ci"][0] < payload["prr"] < payload["prr_ci"][1]


def test_tiny_expected_count() -> None:
    ic, ic025, ic975 = information_component(1, 0, 0, 10_000_000)
    assert ic is not None and ic025 is not None and ic975 is not None
    assert ic025 < ic < ic975
    assert ic == pytest.approx(math.log2(1.5 / (1e-7 + 0.5)), rel=1e-6)


counts = st.integers(min_value=0, max_value=10_000)


@settings(max_examples=200, deadline=None)
@given(counts, counts, counts, counts)
def test_intervals_contain_point_estimates(a: int, b: int, c: int, d: int) -> None:
    result = disproportionality(a, b, c, d)
    for point, (lo, hi) in ((result.prr, result.prr_ci), (result.ror, result.ror_ci)):
        if lo is not None and hi is not None and point is not None:
            assert lo <= point * (1 + 1e-12) and point <= hi * (1 + 1e-12)
    if result.ic is not None:
        assert result.ic025 is not None and result.ic975 is not None
        assert result.ic025 <= result.ic <= result.ic975
    if result.chi2 is not None:
        assert result.chi2_yates is not None
        assert 0.0 <= result.chi2_yates <= result.chi2 * (1 + 1e-12)
    json.dumps(result.to_dict(), allow_nan=False)
