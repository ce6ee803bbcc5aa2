"""``concierge stats``: one JSON object per command, click errors (exit 2) for bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from concierge.cli import main
from concierge.commands.stats import stats


def run(args: list[str]) -> tuple[int, Any, str]:
    result = CliRunner().invoke(stats, args)
    payload = json.loads(result.stdout) if result.exit_code == 0 else None
    return result.exit_code, payload, result.output


def test_disproportionality() -> None:
    code, payload, _ = run(
        ["disproportionality", "--a", "10", "--b", "90", "--c", "20", "--d", "980"]
    )
    assert code == 0
    for key in ("prr", "prr_ci", "ror", "ror_ci", "chi2", "chi2_yates", "ic", "ic025"):
        assert key in payload
    assert payload["prr"] == pytest.approx(5.0)
    assert payload["evans_signal"] is True


def test_disproportionality_zero_cell_is_json_null() -> None:
    code, payload, output = run(
        ["disproportionality", "--a", "3", "--b", "5", "--c", "0", "--d", "9"]
    )
    assert code == 0
    assert payload["prr"] is None
    assert "Infinity" not in output and "NaN" not in output


def test_maxsprt_cv_poisson_matches_kulldorff_table() -> None:
    code, payload, _ = run(
        ["maxsprt-cv", "--model", "poisson", "--T", "10", "--M", "1", "--alpha", "0.05"]
    )
    assert code == 0
    assert payload["cv"] == pytest.approx(3.467952, abs=6e-7)  # Kulldorff et al. 2011, Table 1
    assert payload["alpha_attained"] <= 0.05


def test_maxsprt_cv_binomial() -> None:
    code, payload, _ = run(
        ["maxsprt-cv", "--model", "binomial", "--N", "40", "--z", "1", "--M", "1"]
    )
    assert code == 0
    assert payload["cv"] > 0 and 0 < payload["alpha_attained"] <= 0.05


def test_maxsprt_poisson_signal() -> None:
    code, payload, _ = run(
        ["maxsprt", "--model", "poisson", "--observed", "8", "--expected", "2", "--T", "10"]
    )
    assert code == 0
    assert set(payload) >= {"llr", "cv", "signal"}
    assert payload["signal"] is True
    code, payload, _ = run(["maxsprt", "--model", "poisson", "--observed", "2", "--expected", "2"])
    assert code == 0 and payload["llr"] == 0.0 and payload["signal"] is None


def test_maxsprt_binomial() -> None:
    args = ["maxsprt", "--model", "binomial", "--cases", "12", "--controls", "1", "--z", "1"]
    code, payload, _ = run([*args, "--N", "40"])
    assert code == 0
    assert payload["signal"] is True
    code, _, output = run([*args, "--N", "10"])
    assert code == 2 and "exceeds" in output


def test_ebgm() -> None:
    code, payload, _ = run(
        ["ebgm", "--n", "5", "--e", "1.5", "--prior", "0.2041,0.05816,1.415,1.838,0.0969"]
    )
    assert code == 0
    assert payload["eb05"] < payload["ebgm"] < payload["eb95"]


def test_cusum() -> None:
    code, payload, _ = run(["cusum", "--outcomes", "1,1,1", "--risks", "0.1,0.1,0.1", "--h", "1"])
    assert code == 0
    assert payload["signals"] == [1]


@pytest.mark.parametrize(
    "args",
    [
        ["disproportionality", "--a", "-1", "--b", "1", "--c", "1", "--d", "1"],
        ["disproportionality", "--a", "x", "--b", "1", "--c", "1", "--d", "1"],
        ["maxsprt-cv", "--model", "poisson", "--M", "1"],
        ["maxsprt-cv", "--model", "poisson", "--T", "1", "--M", "4"],
        ["maxsprt-cv", "--model", "poisson", "--T", "1", "--alpha", "0.9"],
        ["maxsprt-cv", "--model", "binomial", "--N", "3", "--z", "1"],
        ["maxsprt", "--model", "poisson", "--observed", "2"],
        ["ebgm", "--n", "1", "--e", "1", "--prior", "1,2,3"],
        ["ebgm", "--n", "1", "--e", "0", "--prior", "1,1,1,1,0.5"],
        ["ebgm", "--n", "1", "--e", "1", "--prior", "1,1,1,1,2"],
        ["cusum", "--outcomes", "1,2", "--risks", "0.1,0.1"],
        ["cusum", "--outcomes", "1,a", "--risks", "0.1,0.1"],
    ],
)
def test_bad_input_is_a_click_error(args: list[str]) -> None:
    result = CliRunner().invoke(stats, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Error" in result.output


def test_every_option_has_help() -> None:
    for name, command in stats.commands.items():
        for param in command.params:
            if param.name != "help" and hasattr(param, "help"):
                assert getattr(param, "help", None), f"{name} --{param.name} has no help"
        assert CliRunner().invoke(stats, [name, "--help"]).exit_code == 0


def test_wired_into_concierge() -> None:
    result = CliRunner().invoke(
        main, ["stats", "disproportionality", "--a", "1", "--b", "1", "--c", "1", "--d", "1"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prr"] == pytest.approx(1.0)
