"""``concierge feasibility check`` and ``schema``: local validation and rendering, no service."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from concierge.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "criteria"


def test_every_shipped_example_is_valid_and_renders() -> None:
    runner = CliRunner()
    files = sorted(EXAMPLES.glob("*.json"))
    assert len(files) >= 3
    for path in files:
        result = runner.invoke(main, ["feasibility", "check", str(path)])
        assert result.exit_code == 0, result.output
        title = json.loads(path.read_text())["title"]
        assert result.output.startswith(title)


def test_check_reports_every_problem_with_its_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "inclusion": [
                    {"type": "age"},
                    {"type": "observation", "codes": [{"concept": "nope"}]},
                ]
            }
        )
    )
    result = CliRunner().invoke(main, ["feasibility", "check", str(bad)])
    assert result.exit_code == 1
    assert "inclusion.0.any_of.0.age: an age criterion needs min and/or max" in result.output
    assert "unknown concept 'nope'" in result.output


def test_schema_is_json_schema_of_the_criteria() -> None:
    result = CliRunner().invoke(main, ["feasibility", "schema"])
    schema = json.loads(result.output)
    assert "inclusion" in schema["properties"]
    assert "schema" in schema["properties"]
