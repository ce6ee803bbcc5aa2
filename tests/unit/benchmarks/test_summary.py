"""The benchmark summary: targets checked from each figure's own fields, never assumed met."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import summary
from benchmarks.bench_scaling import power_law


def _write(folder: Path, **result: object) -> None:
    (folder / f"{result['name']}.json").write_text(json.dumps(result))


def test_a_target_is_met_not_met_or_not_measured_from_the_figure_itself(tmp_path: Path) -> None:
    _write(tmp_path, name="terminology_search_p99", value=41.0, unit="ms", baseline=20, ratio=2.05)
    _write(tmp_path, name="ingest_throughput_per_core", value=9.0, unit="r/s", baseline=3, ratio=3)
    # the clinician target needs the request rate too: without it, "not measured", not "met"
    _write(tmp_path, name="clinician_api_p99", value=12.0, unit="ms", baseline=5, ratio=2.4)
    _write(tmp_path, name="something_new", value=1.0, unit="x", baseline=1, ratio=1)
    results = summary.load_results(tmp_path)
    status = {r[0]: r[6] for r in summary.rows(results)}
    assert status == {
        "terminology_search_p99": "met",
        "ingest_throughput_per_core": "NOT met",  # 3x, the issue asks 4x
        "clinician_api_p99": "not measured",
        "something_new": "-",
    }


def test_one_failing_part_of_a_compound_target_fails_it(tmp_path: Path) -> None:
    _write(
        tmp_path,
        name="clinician_api_p99",
        value=12.0,
        unit="ms",
        baseline=5,
        ratio=2.4,
        requests_per_second=900,
    )
    (row,) = summary.rows(summary.load_results(tmp_path))
    assert row[6] == "NOT met"


def test_the_markdown_holds_every_figure_and_the_population_plot(tmp_path: Path) -> None:
    series = [{"patients": n, "p50_ms": n / 1000, "p99_ms": n / 800} for n in (1e5, 3e5, 1e6)]
    _write(
        tmp_path,
        name="adhoc_scaling",
        value=1.0,
        unit="exponent",
        baseline=1.0,
        ratio=1.0,
        exponent=1.0,
        bytes_per_fact=150,
        series=series,
    )
    _write(tmp_path, name="soak", ok=False)
    path = summary.write_markdown(summary.load_results(tmp_path), tmp_path)
    text = path.read_text()
    assert "| adhoc_scaling | 1 |" in text and "| met |" in text
    assert "| soak | failed |" in text and "NOT met" in text
    png = tmp_path / "population.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert "population.png" in text


def test_without_a_series_the_markdown_says_so_and_draws_nothing(tmp_path: Path) -> None:
    _write(tmp_path, name="terminology_search_p99", value=41.0, unit="ms", baseline=20, ratio=2)
    text = summary.write_markdown(summary.load_results(tmp_path), tmp_path).read_text()
    assert "No scaling series has been measured yet" in text
    assert not (tmp_path / "population.png").exists()


def test_the_power_law_fit_recovers_known_exponents() -> None:
    xs = [1e5, 3e5, 1e6, 3e6]
    assert math.isclose(power_law(xs, [2 * x for x in xs]), 1.0, abs_tol=1e-9)
    assert math.isclose(power_law(xs, [5 * x**0.5 for x in xs]), 0.5, abs_tol=1e-9)
    assert math.isclose(power_law(xs, [x**1.3 / 1e4 for x in xs]), 1.3, abs_tol=1e-9)
