"""Adjusted expectations, the per-outcome sequential tests and the tree scan on counters built
from patients' facts.

* Confounding: a generated population where one model goes to older patients, whose outcome risk
  is higher with no device effect, signals without adjustment and does not with it (per pair and
  in the tree scan).
* The binomial MaxSPRT of a self-controlled risk interval, with R Sequential's critical value.
* The grouped risk-adjusted CUSUM agrees with the per-patient chart's weights (hypothesis).
* A version-1 contribution (no stratum) still reads.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.contracts.devices import CONTRIBUTION_SCHEMA, UNKNOWN_STRATUM, Contribution
from surveillance_stream.devices import (
    ICD10,
    Counters,
    OutcomeDefinition,
    code,
    contribution,
)
from surveillance_stream.scan import build_trees
from surveillance_stream.signals import SignalConfig, assess
from surveillance_stream.statistics import (
    RiskAdjustedCusum,
    binomial_critical_value,
    grouped_cusum,
)
from surveillance_stream.statistics.treescan import tree_scan

from .test_devices import (
    IMPLANT_HIP,
    condition_fact,
    device_fact,
    entry,
    procedure_fact,
)

IMPLANT = datetime(2023, 3, 1, 9, tzinfo=UTC)
OLD_MODEL, YOUNG_MODEL = "Acetabulon X2", "TriFit CF"
X = f"hip/Orthomedica/{OLD_MODEL}"
Y = f"hip/Orthomedica/{YOUNG_MODEL}"
OUTCOME = "joint mechanical complication"
AT = datetime(2024, 3, 1, tzinfo=UTC)


def hip_patient(
    name: str, model: str, born: str, outcome_day: int | None, *, lot: str = "L1"
) -> dict[str, dict[str, Any]]:
    """A hip implanted on IMPLANT, with a mechanical complication ``outcome_day`` days later."""
    parts = [
        entry(
            "Patient",
            name,
            {
                "kind": "patient",
                "site": "RA1",
                "region": "London",
                "sex": "female",
                "birth_date": born,
            },
        ),
        entry("Device", f"d-{name}", device_fact(f"d-{name}", model=model, lot=lot)),
        entry("Procedure", f"imp-{name}", procedure_fact(IMPLANT_HIP, IMPLANT, (f"d-{name}",))),
    ]
    if outcome_day is not None:
        when = IMPLANT + timedelta(days=outcome_day)
        parts.append(entry("Condition", f"c-{name}", condition_fact("T84.0", when)))
    return dict(parts)


def confounded_population() -> Counters:
    """Old patients (80 at implant) have a complication 3 times in 10, young ones (55) 1 in 20,
    on either model. X goes mostly to the old (240 old, 60 young), Y mostly to the young (100
    old, 500 young): X's crude rate is high for its case mix alone."""
    people = []
    groups = [
        (OLD_MODEL, "1943-01-01", 240, 10, 3),
        (OLD_MODEL, "1968-01-01", 60, 20, 1),
        (YOUNG_MODEL, "1943-01-01", 100, 10, 3),
        (YOUNG_MODEL, "1968-01-01", 500, 20, 1),
    ]
    for model, born, count, every, cases in groups:
        for i in range(count):
            name = f"{model[:3]}-{born[:4]}-{i}"
            outcome = 30 + i % 200 if i % every < cases else None
            people.append(contribution(name, hip_patient(name, model, born, outcome)))
    return Counters.rebuild(people)


def test_confounding_by_age_signals_crude_and_not_adjusted() -> None:
    counters = confounded_population()
    crude = assess(counters, X, OUTCOME, at=AT, config=SignalConfig(strata=()))
    adjusted = assess(counters, X, OUTCOME, at=AT, config=SignalConfig(strata=("age", "sex")))
    assert crude.a == adjusted.a == 75  # 72 old + 3 young
    assert crude.signal and crude.maxsprt.signal
    assert not adjusted.signal and not adjusted.maxsprt.signal
    # the crude figure is kept alongside the adjusted one
    assert adjusted.maxsprt.expected_crude == pytest.approx(crude.maxsprt.expected)
    assert adjusted.maxsprt.expected == pytest.approx(75.0, rel=1e-9)  # 0.3*240 + 0.05*60
    assert adjusted.maxsprt.llr == 0.0
    assert adjusted.adjustment is not None
    bands = {s["stratum"]["age"]: s for s in adjusted.adjustment.strata}
    assert set(bands) == {"75-84", "55-64"}
    assert bands["75-84"]["comparator_events"] == 30 and bands["75-84"]["exposed"] == 240
    assert adjusted.adjustment.unmatched_person_days == 0
    # the table expectation (for EBGM and IC) is stratified the same way
    assert adjusted.adjustment.table_expected == pytest.approx(
        240 * (72 + 30) / 340 + 60 * (3 + 25) / 560
    )
    assert adjusted.adjustment.table_expected == pytest.approx(75.0)
    assert adjusted.rules["ic025"] is False
    assert crude.disproportionality.prr is not None and crude.disproportionality.prr > 2


def test_confounding_in_the_tree_scan() -> None:
    counters = confounded_population()
    day = AT.date()
    crude = tree_scan(build_trees(counters, at=day, by=()), replications=999, alpha=0.05, seed=4)
    adjusted = tree_scan(
        build_trees(counters, at=day, by=("age", "sex")), replications=999, alpha=0.05, seed=4
    )
    crude_signals = {c.node for c in crude.cuts if c.signal}
    assert X in crude_signals
    assert not any(c.signal for c in adjusted.cuts)


def windowed_definition() -> OutcomeDefinition:
    return OutcomeDefinition(
        OUTCOME,
        codes={code(ICD10, "T84.0")},
        kinds={"condition"},
        device_class="hip",
        window_days=365,
        method="binomial",
        risk_window=(1, 30),
        control_window=(31, 90),
    )


def test_the_binomial_maxsprt_of_a_self_controlled_risk_interval() -> None:
    definition = windowed_definition()
    assert definition.z == 2.0
    # 12 events in days 1-30 and 3 in days 31-90 on X; Y: none
    people = []
    for i in range(40):
        day = 5 + i if i < 12 else (40 + i if i < 15 else None)
        name = f"x{i}"
        people.append(
            contribution(name, hip_patient(name, OLD_MODEL, "1960-01-01", day), [definition])
        )
    counters = Counters.rebuild(people)
    config = SignalConfig().with_definitions([definition])
    assert config.method(OUTCOME) == "binomial"
    result = assess(counters, X, OUTCOME, at=AT, config=config)
    assert result.method == "binomial" and result.binomial is not None
    found = result.binomial
    assert (found.cases, found.controls, found.periods) == (12, 3, ("2023Q1",))
    design = binomial_critical_value(200, 2.0, 3, 0.05)
    # the critical value as R Sequential's CV.Binomial reports it: the attainable value
    assert found.cv == design.cv == design.cv_upper
    assert design.cv_lower is not None and design.cv_lower < found.cv_midpoint < found.cv
    # LLR by hand: c ln(c (1+z) / n) + x ln(x (1+z) / (z n)), c = 12, x = 3, n = 15, z = 2
    by_hand = 12 * math.log(12 * 3 / 15) + 3 * math.log(3 * 3 / (2 * 15))
    assert found.llr == pytest.approx(by_hand)
    assert found.signal == (by_hand >= design.cv) and found.signal
    assert result.rules["maxsprt"] and result.signal
    assert result.strength == pytest.approx(by_hand / design.cv)
    # a look before both windows have passed for the quarter's implants counts nothing yet
    early = assess(counters, X, OUTCOME, at=datetime(2023, 6, 1, tzinfo=UTC), config=config)
    assert early.binomial is not None and (early.binomial.cases, early.binomial.periods) == (0, ())


def test_windows_are_validated() -> None:
    with pytest.raises(ValueError, match="overlap"):
        OutcomeDefinition(OUTCOME, codes={code(ICD10, "T84.0")}, method="binomial",
                          risk_window=(1, 30), control_window=(20, 60))  # fmt: skip
    with pytest.raises(ValueError, match="both windows"):
        OutcomeDefinition(OUTCOME, codes={code(ICD10, "T84.0")}, method="binomial")
    with pytest.raises(ValueError, match="method"):
        OutcomeDefinition(OUTCOME, codes={code(ICD10, "T84.0")}, method="sprt")


def test_the_cusum_runs_live_when_the_definition_chooses_it() -> None:
    counters = confounded_population()
    cusum_definition = OutcomeDefinition(
        OUTCOME, codes={code(ICD10, "T84.0")}, device_class="hip", method="cusum"
    )
    crude = SignalConfig(strata=()).with_definitions([cusum_definition])
    adjusted = SignalConfig(strata=("age", "sex")).with_definitions([cusum_definition])
    unadjusted = assess(counters, X, OUTCOME, at=AT, config=crude)
    assert unadjusted.method == "cusum" and unadjusted.cusum is not None
    assert unadjusted.cusum.signal and unadjusted.signal
    fair = assess(counters, X, OUTCOME, at=AT, config=adjusted)
    assert fair.cusum is not None and not fair.cusum.signal and not fair.signal
    step = fair.cusum.steps[0]
    assert step["period"] == "2023Q1" and step["observed"] == 75
    assert step["expected"] == pytest.approx(75.0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.lists(st.tuples(st.integers(0, 30), st.floats(0.01, 0.9)), max_size=4),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_grouped_cusum_weights_are_the_sum_of_the_patients_weights(
    groups: list[tuple[int, list[tuple[int, float]]]],
) -> None:
    chart = RiskAdjustedCusum(2.0, 4.5)
    steps = grouped_cusum(groups, odds_ratio=2.0, threshold=4.5)
    score = 0.0
    for (events, risks), step in zip(groups, steps, strict=True):
        weight = events * math.log(2.0)
        for patients, risk in risks:
            weight += sum(chart.weight(0, risk) for _ in range(patients))
        assert step.weight == pytest.approx(weight, abs=1e-9)
        score = max(0.0, score + weight)
        assert step.score == pytest.approx(score, abs=1e-9)
        assert step.signal == (step.score >= 4.5)


def test_a_version_one_contribution_reads_with_an_unknown_stratum() -> None:
    old = {
        "patient": "p",
        "keys": [["model", X, "exposed", "2023Q1", "RA1"]],
        "person_time": [[["model", X, "2023Q1", "RA1"], [10, 0, 0]]],
        "sources": [],
        "latest": None,
    }
    read = Contribution.from_dict(old)
    assert read.keys == (("model", X, "exposed", "2023Q1", "RA1", UNKNOWN_STRATUM),)
    assert read.to_dict()["schema"] == CONTRIBUTION_SCHEMA
    with pytest.raises(ValueError, match="schema"):
        Contribution.from_dict({**old, "schema": "concierge.device-contribution/9"})
