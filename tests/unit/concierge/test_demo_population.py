"""The example questions on the demo's default population (5,000 patients, seed 42), through
the adapters' extraction, the columnar snapshot, the polars engine and disclosure control, as
the demo's API would answer them (no broker: the snapshot is folded in-process)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

import benchmarks.build_snapshot as build
from concierge.demo import demo_population
from feasibility.criteria import parse_question
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.service import answer_sets
from feasibility.snapshot import ColumnarSnapshot
from fhir_adapters.synthetic.generator import iter_patients

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples" / "criteria"
AS_OF = date(2026, 1, 1)


@pytest.fixture(scope="module")
def frames() -> Any:
    config = demo_population(5000, 42, AS_OF)  # the demo's defaults
    build._init(config)
    snapshot = ColumnarSnapshot()
    now = datetime.now(UTC).isoformat()
    for envelope in build._envelopes(iter_patients(config, 0, config.patients), now):
        snapshot.apply(envelope)
    snapshot.flush()
    return snapshot.frames()


def shown_total(frames: Any, name: str) -> str:
    question = parse_question(json.loads((EXAMPLES / name).read_text()))
    at = datetime(AS_OF.year, AS_OF.month, AS_OF.day, tzinfo=UTC)
    sets = answer_sets(question, PolarsEngine().evaluate_frames(question, frames, at))
    answer, _ = protect(sets, DisclosurePolicy(), PublicationRegistry("sqlite://"), "x", "q")
    return answer.total.display


@pytest.mark.parametrize("name", ["t2dm-sglt2.json", "heart-failure.json"])
def test_the_examples_answer_above_the_threshold(frames: Any, name: str) -> None:
    """Each example's last step drops ten patients or more: a step that drops fewer is a small
    group, and withholding it withholds the total (rule 3), so the rare exclusions come first."""
    total = shown_total(frames, name)
    assert total != "withheld" and int(total) >= 10


def test_the_lung_cancer_example_is_too_rare_for_five_thousand_patients(frames: Any) -> None:
    """About 4 of 5,000 patients have NSCLC, and few of them are EGFR-mutant and untreated: the
    honest answer on the demo's population is withheld (docs/tutorial.md says so)."""
    assert shown_total(frames, "nsclc-egfr.json") == "withheld"
