"""The ``CONCIERGE_DC_*`` settings: a bad value stops ``concierge api`` and ``concierge demo`` at
start with one line (issue 11, item 6: ``CONCIERGE_DC_THRESHOLD=0`` crashed the API with a
traceback), and every variable is checked the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from concierge.cli import main
from feasibility.disclosure.budget import QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.settings import DisclosureSettings, DisclosureSettingsError
from tests.faults import free_port

ROOT = Path(__file__).resolve().parents[4]

#: (variable, bad value, what the one line says), for every CONCIERGE_DC_* variable.
BAD = [
    ("CONCIERGE_DC_THRESHOLD", "0", "must be at least 1, not '0'"),
    ("CONCIERGE_DC_THRESHOLD", "-5", "must be at least 1, not '-5'"),
    ("CONCIERGE_DC_THRESHOLD", "ten", "must be an integer, not 'ten'"),
    ("CONCIERGE_DC_ROUNDING", "0", "must be at least 1, not '0'"),
    ("CONCIERGE_DC_ROUNDING", "2.5", "must be an integer, not '2.5'"),
    ("CONCIERGE_DC_SUPPRESS_ZERO", "maybe", "must be a boolean"),
    ("CONCIERGE_DC_OVERLAP_CONTROL", "2", "must be a boolean"),
    ("CONCIERGE_DC_QUERY_BUDGET", "0", "must be at least 1, not '0'"),
    ("CONCIERGE_DC_QUERY_BUDGET", "lots", "must be an integer, not 'lots'"),
    ("CONCIERGE_DC_LOCKOUT_AFTER", "-1", "must be at least 0, not '-1'"),
]


def test_defaults_and_values_from_a_mapping_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("CONCIERGE_DC_"):
            monkeypatch.delenv(name)
    assert DisclosureSettings.load().policy() == DisclosurePolicy()
    env = {
        "CONCIERGE_DC_THRESHOLD": "5",
        "CONCIERGE_DC_ROUNDING": "1",
        "CONCIERGE_DC_SUPPRESS_ZERO": "off",
        "CONCIERGE_DC_OVERLAP_CONTROL": "no",
        "CONCIERGE_DC_QUERY_BUDGET": "3",
        "CONCIERGE_DC_LOCKOUT_AFTER": "0",
    }
    given = DisclosureSettings.load(env)
    assert given.policy() == DisclosurePolicy(5, 1, False, False)
    assert (given.query_budget, given.lockout_after) == (3, 0)
    # a mapping is all there is: the process environment is not read for what it lacks
    monkeypatch.setenv("CONCIERGE_DC_THRESHOLD", "7")
    assert DisclosureSettings.load({}).threshold == 10
    assert DisclosureSettings.load({"CONCIERGE_DC_THRESHOLD": " "}).threshold == 10
    assert DisclosureSettings.load().threshold == 7
    monkeypatch.setenv("CONCIERGE_DC_THRESHOLD", "")  # empty: the default
    assert DisclosureSettings.load().threshold == 10


@pytest.mark.parametrize(("name", "value", "says"), BAD)
def test_every_bad_value_is_one_line_naming_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(DisclosureSettingsError) as raised:
        DisclosureSettings.load({name: value})
    message = str(raised.value)
    assert "\n" not in message
    assert f"{name} {says}" in message
    # the policy and the budget read the same section, with the same error
    with pytest.raises(DisclosureSettingsError, match=name):
        DisclosurePolicy.from_env({name: value})
    with pytest.raises(DisclosureSettingsError, match=name):
        QueryBudget.from_env("sqlite://", environ={name: value})


def test_every_bad_variable_is_named_in_the_one_line() -> None:
    with pytest.raises(DisclosureSettingsError) as raised:
        DisclosureSettings.load({"CONCIERGE_DC_THRESHOLD": "0", "CONCIERGE_DC_ROUNDING": "x"})
    assert str(raised.value) == (
        "invalid disclosure-control setting: CONCIERGE_DC_THRESHOLD must be at least 1, not "
        "'0'; CONCIERGE_DC_ROUNDING must be an integer, not 'x'"
    )


def _environment(tmp_path: Path, **dc: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_DC_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "CONCIERGE_HOME": str(tmp_path),
            # nothing may be reached before the settings are checked: no broker here
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "CONCIERGE_API_PORT": str(free_port()),
            **dc,
        }
    )
    return env


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONCIERGE_DC_THRESHOLD", "0"),
        ("CONCIERGE_DC_QUERY_BUDGET", "-1"),
        ("CONCIERGE_DC_SUPPRESS_ZERO", "maybe"),
    ],
)
def test_concierge_api_stops_at_start_with_one_line(tmp_path: Path, name: str, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "concierge", "api"],
        env=_environment(tmp_path, **{name: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("concierge: bad configuration: invalid disclosure-control setting: ")
    assert name in lines[0]


def test_concierge_demo_stops_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concierge.demo

    def must_not_start(*_: Any, **__: Any) -> int:
        raise AssertionError("the demo started processes with a bad setting")

    monkeypatch.setattr(concierge.demo, "supervise", must_not_start)
    for name, value in _environment(tmp_path, CONCIERGE_DC_THRESHOLD="0").items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["demo", "--duration", "1"])
    assert result.exit_code == 2, result.output  # the configuration tree's exit status
    assert result.output.strip().splitlines() == [
        "concierge: bad configuration: invalid disclosure-control setting: "
        "CONCIERGE_DC_THRESHOLD must be at least 1, not '0'"
    ]
