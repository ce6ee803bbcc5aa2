"""``concierge feasibility check`` and ``schema``: local validation and rendering, no service."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from concierge.cli import main

EXAMPLES = Path(__file__).resolve().parents[4] / "docs" / "examples" / "criteria"


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


def _check(tmp_path: Path, question: dict[str, object]) -> tuple[int, str]:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(question))
    result = CliRunner().invoke(main, ["feasibility", "check", str(path)])
    return result.exit_code, result.output


def test_check_says_min_count_in_words(tmp_path: Path) -> None:
    bmi = {"type": "observation", "codes": [{"concept": "bmi"}]}
    code, text = _check(
        tmp_path,
        {
            "inclusion": [
                {**bmi, "value": {"gt": 30, "unit": "kg/m2"}, "select": "any", "min_count": 2},
                {**bmi, "min_count": 3, "window": {"days_before": 365}},
                {
                    "type": "condition",
                    "codes": [{"system": "icd10", "code": "J45"}],
                    "min_count": 2,
                },
            ]
        },
    )
    assert code == 0, text
    lines = text.splitlines()
    assert "  1. include: at least 2 Body mass index results > 30 kg/m2, ever" in lines
    assert (
        "  2. include: at least 3 Body mass index results, in the 365 days before the index date"
        in lines
    )
    assert "  3. include: at least 2 records of diagnosis of icd10 J45, ever" in lines


def test_check_renders_exclusion_steps_as_exclusions_labelled_or_not(tmp_path: Path) -> None:
    egfr = {
        "type": "observation",
        "codes": [{"concept": "egfr"}],
        "value": {"lt": 30, "unit": "mL/min/{1.73_m2}"},
    }
    code, text = _check(
        tmp_path,
        {
            "title": "T",
            "inclusion": [{"label": "Adults", "any_of": [{"type": "age", "min": 18}]}],
            "exclusion": [
                {"label": "eGFR under 30", "all_of": [egfr, {"type": "sex", "values": ["male"]}]},
                {"type": "age", "min": 80},
            ],
        },
    )
    assert code == 0, text
    assert text.splitlines()[2:] == [
        "Included when every step holds:",
        "  1. include (Adults): aged 18 or over",
        "Excluded when any step holds:",
        "  2. exclude (eGFR under 30): latest Estimated glomerular filtration rate < 30 "
        "mL/min/{1.73_m2}, ever AND sex male",
        "  3. exclude: aged 80 or over",
        "Patients whose exclusion criteria cannot be decided are kept.",
    ]


def test_check_rejects_a_bad_unit_at_its_place(tmp_path: Path) -> None:
    hba1c = {"type": "observation", "codes": [{"concept": "hba1c"}]}
    code, text = _check(
        tmp_path,
        {
            "inclusion": [
                {"type": "age", "min": 18},
                {**hba1c, "value": {"ge": 58, "unit": "mmol/mool"}},
                {"any_of": [{**hba1c, "value": {"ge": 58, "unit": "kg"}}]},
            ]
        },
    )
    assert code == 1
    assert "/inclusion/1/value/unit" in text
    assert "unknown unit atom 'mool'" in text
    assert "/inclusion/2/any_of/0/value/unit" in text
    assert "'kg'" in text


def test_an_answer_in_words_says_which_steps_skipped_results_for_their_unit() -> None:
    from concierge.commands.feasibility import render_answer

    def cell(value: int | None) -> dict[str, object]:
        shown = value is not None
        return {
            "value": value,
            "display": str(value) if shown else "withheld",
            "suppressed": not shown,
        }

    row = {"entered": cell(100), "passed": cell(50), "failed": cell(30), "unknown": cell(20)}
    answer = {
        "total": cell(40),
        "funnel": [
            {"label": "population", **row},
            {"label": "eGFR under 30", **row, "unconvertible_results": cell(15)},
            {"label": "HbA1c", **row, "unconvertible_results": cell(None)},
            {"label": "Adults", **row},
        ],
        "rules": [],
    }
    text = render_answer(answer)
    assert (
        "Results not tested because their unit does not convert to the criterion's:\n"
        "  eGFR under 30: 15\n"
        "  HbA1c: withheld\n"
    ) in text
    assert "Adults:" not in text
