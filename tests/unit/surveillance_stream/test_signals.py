"""Signal statistics per node against hand-computed tables, and the signal lifecycle."""

from __future__ import annotations

import itertools
import json
import math
import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError
from scipy.stats import gamma

from core.settings import describe
from surveillance_stream.devices import (
    EXPOSED,
    Contribution,
    CounterKey,
    Counters,
    PersonTime,
    TimeKey,
)
from surveillance_stream.settings import SurveillanceSettings
from surveillance_stream.signals import (
    ACTIONS,
    DUMOUCHEL_1999,
    REGULATOR_ACTIONS,
    Assessment,
    IllegalTransition,
    Signal,
    SignalConfig,
    State,
    act,
    assess,
    assess_all,
    observe,
    signal_id,
    transition,
)
from surveillance_stream.statistics import ebgm_scores, poisson_critical_value

AE = "adverse event"
X, Y, Z = "hip/M1/X", "hip/M1/Y", "hip/M2/Z"
KNEE = "knee/M3/K"
AT = datetime(2025, 1, 1, tzinfo=UTC)
CONFIG = SignalConfig()


#: one stratum for every hand-made patient (age band, sex, region)
S = "65-74|female|London"


def patient(
    name: str,
    node: str,
    outcome: bool,
    period: str = "2023Q1",
    days: int = 100,
    stratum: str = S,
) -> Contribution:
    """One exposure of ``node`` (a model path) with ``days`` of closed exposure time."""
    parts = node.split("/")
    keys: list[CounterKey] = []
    times: list[tuple[TimeKey, PersonTime]] = []
    for level, depth in (("class", 1), ("manufacturer", 2), ("model", 3)):
        path = "/".join(parts[:depth])
        keys.append((level, path, EXPOSED, period, "RA1", stratum))
        if outcome:
            keys.append((level, path, AE, period, "RA1", stratum))
        times.append(((level, path, period, "RA1", stratum), PersonTime(closed_days=days)))
    return Contribution(name, tuple(sorted(keys)), tuple(sorted(times)), (), None)


def population() -> Counters:
    """X: 10 exposed, 4 with the outcome; Y: 30/2; Z: 20/1 (hip); K: 20/1 (knee)."""
    people = []
    for node, exposed, events in ((X, 10, 4), (Y, 30, 2), (Z, 20, 1), (KNEE, 20, 1)):
        for i in range(exposed):
            people.append(patient(f"{node}-{i}", node, i < events))
    return Counters.rebuild(people)


def test_the_two_by_two_table_of_a_model_against_its_class() -> None:
    result = assess(population(), X, AE, at=AT, config=CONFIG)
    assert (result.level, result.device_class, result.comparator) == ("model", "hip", "class hip")
    assert (result.a, result.b, result.c, result.d) == (4, 6, 3, 47)
    table = result.disproportionality
    assert table.prr == pytest.approx((4 / 10) / (3 / 50))  # 6.667
    assert table.ror == pytest.approx(4 * 47 / (6 * 3))  # 10.44
    assert table.chi2 == pytest.approx(60 * (4 * 47 - 6 * 3) ** 2 / (10 * 50 * 7 * 53))
    yates = 60 * (abs(4 * 47 - 6 * 3) - 30) ** 2 / (10 * 50 * 7 * 53)
    assert table.chi2_yates == pytest.approx(yates)  # 6.34
    assert table.expected == pytest.approx(10 * 7 / 60)
    se = math.sqrt(1 / 4 - 1 / 10 + 1 / 3 - 1 / 50)
    assert table.prr_ci[0] == pytest.approx(math.exp(math.log(20 / 3) - 1.959964 * se), rel=1e-6)
    assert result.ebgm == ebgm_scores(4, 10 * 7 / 60, DUMOUCHEL_1999)
    # Poisson: comparator 3 events in 50 x 100 days; the node has 10 x 100 days.
    sprt = result.maxsprt
    assert (sprt.person_days, sprt.comparator_person_days) == (1000, 5000)
    assert sprt.expected == pytest.approx(0.6)
    assert sprt.llr == pytest.approx(0.6 - 4 + 4 * math.log(4 / 0.6))  # 4.188
    assert sprt.cv == pytest.approx(poisson_critical_value(50.0, 3, 0.05).cv)  # 3.54
    assert sprt.signal and not sprt.beyond_horizon
    # IC025 = log2(Gamma^-1(0.025; shape a + 0.5, rate E + 0.5)) = -0.304: below 0
    assert table.ic025 == pytest.approx(math.log2(gamma.ppf(0.025, 4.5, scale=1 / (70 / 60 + 0.5))))
    assert result.rules == {"maxsprt": True, "evans": True, "prr_ci": True, "ror_ci": True,
                            "ic025": False, "eb05": False, "tree_scan": False}  # fmt: skip
    assert result.fired == ("maxsprt", "evans", "prr_ci", "ror_ci")
    assert result.signal
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["table"] == {"a": 4, "b": 6, "c": 3, "d": 47}


def test_manufacturer_and_class_nodes() -> None:
    counters = population()
    manufacturer = assess(counters, "hip/M1", AE, at=AT, config=CONFIG)
    assert (manufacturer.a, manufacturer.b, manufacturer.c, manufacturer.d) == (6, 34, 1, 19)
    hip = assess(counters, "hip", AE, at=AT, config=CONFIG)
    assert hip.comparator == "other classes"
    assert (hip.a, hip.b, hip.c, hip.d) == (7, 53, 1, 19)
    assert (hip.maxsprt.person_days, hip.maxsprt.comparator_person_days) == (6000, 2000)


def test_a_period_restricts_both_rows_to_implants_of_that_period() -> None:
    counters = Counters.rebuild(
        [
            patient("x-old", X, True, period="2021Q1"),
            patient("x-new-1", X, True, period="2023Q2"),
            patient("x-new-2", X, False, period="2023Q3"),
            patient("y-old", Y, True, period="2021Q4"),
            patient("y-new", Y, False, period="2024Q1"),
        ]
    )
    every = assess(counters, X, AE, at=AT, config=CONFIG)
    assert (every.a, every.b, every.c, every.d) == (2, 1, 1, 1)
    recent = assess(counters, X, AE, "2023Q1..", at=AT, config=CONFIG)
    assert (recent.a, recent.b, recent.c, recent.d) == (1, 1, 0, 1)
    assert recent.period == "2023Q1.."


def test_open_exposure_time_is_measured_at_the_evaluation_day() -> None:
    start = date(2024, 1, 1).toordinal()
    open_one = Contribution(
        "p",
        (("model", X, EXPOSED, "2024Q1", "RA1", S), ("class", "hip", EXPOSED, "2024Q1", "RA1", S)),
        (
            (("class", "hip", "2024Q1", "RA1", S), PersonTime(0, 1, start)),
            (("model", X, "2024Q1", "RA1", S), PersonTime(0, 1, start)),
        ),
        (),
        start,
    )
    counters = Counters.rebuild([open_one])
    assert assess(counters, X, AE, config=CONFIG).maxsprt.person_days == 0  # default: latest day
    assert assess(counters, X, AE, at=date(2024, 1, 31), config=CONFIG).maxsprt.person_days == 30


def test_rules_configuration_and_degenerate_tables() -> None:
    counters = population()
    both = SignalConfig(rules=("maxsprt", "eb05"), require="all")
    assert not assess(counters, X, AE, at=AT, config=both).signal
    either = SignalConfig(rules=("maxsprt", "eb05"), require="any")
    assert assess(counters, X, AE, at=AT, config=either).signal
    strict = SignalConfig(min_events=5)
    assert not assess(counters, X, AE, at=AT, config=strict).maxsprt.signal
    short = SignalConfig(horizon=0.1, min_events=3)  # P(N(0.1) >= 3) < alpha: no design
    assert assess(counters, X, AE, at=AT, config=short).maxsprt.cv is None
    lonely = Counters.rebuild([patient("only", X, True)])  # no comparator at all
    result = assess(lonely, X, AE, at=AT, config=CONFIG)
    assert (result.a, result.b, result.c, result.d) == (1, 0, 0, 0)
    assert result.maxsprt.expected is None and result.ebgm is not None
    assert not result.signal
    json.dumps(result.to_dict(), allow_nan=False)
    assert [(r.node, r.outcome) for r in assess_all(counters, config=CONFIG)] == [
        ("hip/M1/X", AE), ("hip/M1/Y", AE), ("hip/M2/Z", AE), ("knee/M3/K", AE)
    ]  # fmt: skip


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "CONCIERGE_SIGNAL_ALPHA": "0.01",
        "CONCIERGE_SIGNAL_MIN_EVENTS": "4",
        "CONCIERGE_SIGNAL_HORIZON": "20",
        "CONCIERGE_SIGNAL_EB05_THRESHOLD": "1.5",
        "CONCIERGE_SIGNAL_EBGM_PRIOR": "0.2,0.1,2,4,0.3",
        "CONCIERGE_SIGNAL_RULES": "evans, maxsprt",
        "CONCIERGE_SIGNAL_REQUIRE": "all",
        "CONCIERGE_SIGNAL_LEVELS": "model, lot",
    }.items():
        monkeypatch.setenv(name, value)
    section = SurveillanceSettings()
    config = SignalConfig.from_environment()
    assert config == section.signal_config()
    assert (config.alpha, config.min_events, config.horizon) == (0.01, 4, 20.0)
    assert config.eb05_threshold == 1.5
    assert config.prior.as_tuple() == (0.2, 0.1, 2.0, 4.0, 0.3)
    assert (config.rules, config.require) == (("evans", "maxsprt"), "all")
    assert section.levels == ("model", "lot")
    for name in list(os.environ):
        if name.startswith("CONCIERGE_SIGNAL_"):
            monkeypatch.delenv(name)
    assert SignalConfig.from_environment() == SignalConfig()
    assert SurveillanceSettings().levels == ("manufacturer", "model", "lot")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ALPHA", "lots", "CONCIERGE_SIGNAL_ALPHA='lots': Input should be a valid number"),
        ("ALPHA", "2", "CONCIERGE_SIGNAL_ALPHA='2': Input should be less than 1"),
        ("MIN_EVENTS", "2.5", "CONCIERGE_SIGNAL_MIN_EVENTS='2.5': Input should be a valid integer"),
        ("MIN_EVENTS", "0", "CONCIERGE_SIGNAL_MIN_EVENTS='0': Input should be greater than"),
        ("HORIZON", "inf", "CONCIERGE_SIGNAL_HORIZON='inf': Input should be a finite number"),
        ("RULES", "evans,magic", "CONCIERGE_SIGNAL_RULES='evans,magic': must be a non-empty"),
        ("RULES", ",", "CONCIERGE_SIGNAL_RULES=',': must be a non-empty subset"),
        ("REQUIRE", "most", "CONCIERGE_SIGNAL_REQUIRE='most': Input should be 'any' or 'all'"),
        ("EBGM_PRIOR", "1,2,3", "CONCIERGE_SIGNAL_EBGM_PRIOR='1,2,3': a prior needs 5 values"),
        ("EBGM_PRIOR", "1,2,3,4,9", "CONCIERGE_SIGNAL_EBGM_PRIOR='1,2,3,4,9': p must be in"),
        ("LEVELS", "model,site", "CONCIERGE_SIGNAL_LEVELS='model,site': unknown levels ['site']"),
    ],
)
def test_a_bad_signal_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"CONCIERGE_SIGNAL_{name}", value)
    with pytest.raises(ValidationError) as caught:
        SurveillanceSettings()
    line = describe(caught.value, [SurveillanceSettings])
    assert line.startswith(f"bad configuration: {message}") and "\n" not in line, line


def test_device_definition_files_must_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONCIERGE_DEVICE_OUTCOMES", str(tmp_path / "missing.json"))
    with pytest.raises(ValidationError) as caught:
        SurveillanceSettings()
    assert describe(caught.value, [SurveillanceSettings]).startswith(
        f"bad configuration: CONCIERGE_DEVICE_OUTCOMES='{tmp_path / 'missing.json'}': "
    )
    monkeypatch.setenv("CONCIERGE_DEVICE_OUTCOMES", "")
    assert SurveillanceSettings().device_outcomes is None


# --------------------------------------------------------------------------- lifecycle

LEGAL = {
    (State.NONE, "detect"): State.SIGNALLED,
    (State.SIGNALLED, "lapse"): State.NONE,
    (State.SIGNALLED, "review"): State.UNDER_REVIEW,
    (State.UNDER_REVIEW, "confirm"): State.CONFIRMED,
    (State.UNDER_REVIEW, "dismiss"): State.DISMISSED,
    (State.CONFIRMED, "close"): State.CLOSED,
    (State.DISMISSED, "close"): State.CLOSED,
    (State.DISMISSED, "reopen"): State.UNDER_REVIEW,
    (State.CLOSED, "reopen"): State.UNDER_REVIEW,
}


def at_state(state: State) -> Signal:
    return Signal(signal_id(X, AE), X, AE, state=state, version=3)


@pytest.mark.parametrize(("state", "action"), list(itertools.product(State, ACTIONS)))
def test_every_transition_is_legal_or_raises_naming_the_allowed_ones(
    state: State, action: str
) -> None:
    signal = at_state(state)
    if (state, action) in LEGAL:
        new, event = transition(signal, action, actor="mhra:alice", at=AT, reason="why")
        assert new.state is LEGAL[(state, action)]
        assert new.version == 4 and new.id == signal.id
        assert event == {
            "schema": "concierge.signal-event/1",
            "signal": signal.id,
            "node": X,
            "outcome": AE,
            "version": 4,
            "action": action,
            "from": state.value,
            "to": LEGAL[(state, action)].value,
            "actor": "mhra:alice",
            "reason": "why",
            "statistics": None,
            "at": "2025-01-01T00:00:00+00:00",
        }
    else:
        allowed = [a for (s, a) in LEGAL if s is state]
        with pytest.raises(IllegalTransition) as caught:
            transition(signal, action, actor="mhra:alice", at=AT)
        assert caught.value.allowed == allowed
        assert f"in state {state.value!r}" in str(caught.value)
        assert f"allowed actions: {', '.join(allowed) or 'none'}" in str(caught.value)


def test_regulators_cannot_make_statistic_moves_and_see_their_own_options() -> None:
    with pytest.raises(ValueError, match="not a regulator action"):
        act(at_state(State.NONE), "detect", actor="mhra:alice", at=AT)
    with pytest.raises(IllegalTransition, match=r"allowed actions: review$"):
        act(at_state(State.SIGNALLED), "confirm", actor="mhra:alice", at=AT)
    with pytest.raises(ValueError, match="unknown action"):
        transition(at_state(State.NONE), "escalate", actor="x", at=AT)
    assert at_state(State.SIGNALLED).allowed_actions() == ["review"]
    assert at_state(State.DISMISSED).allowed_actions() == ["close", "reopen"]
    assert set(REGULATOR_ACTIONS) == {"review", "confirm", "dismiss", "close", "reopen"}


def assessment(signal: bool) -> Assessment:
    counters = population() if signal else Counters.rebuild([patient("only", X, False)])
    result = assess(counters, X, AE, at=AT, config=CONFIG)
    assert result.signal is signal
    return result


def test_statistics_move_a_signal_only_before_review() -> None:
    fresh = Signal.new(X, AE)
    assert fresh.id == signal_id(X, AE) and fresh.state is State.NONE
    assert observe(fresh, assessment(False), at=AT) == (fresh, None)
    signalled, event = observe(fresh, assessment(True), at=AT)
    assert signalled.state is State.SIGNALLED and event is not None
    assert event["action"] == "detect" and event["actor"] == "system"
    assert event["reason"] == "signal rule fired (maxsprt)"
    assert event["statistics"]["table"] == {"a": 4, "b": 6, "c": 3, "d": 47}
    assert observe(signalled, assessment(True), at=AT) == (signalled, None)  # idempotent
    lapsed, event = observe(signalled, assessment(False), at=AT)
    assert lapsed.state is State.NONE and event is not None and event["action"] == "lapse"
    reviewing, _ = act(signalled, "review", actor="mhra:alice", at=AT, reason="triage")
    assert observe(reviewing, assessment(False), at=AT) == (reviewing, None)
    with pytest.raises(ValueError, match="does not belong"):
        observe(Signal.new(Y, AE), assessment(True), at=AT)


def test_a_whole_life_and_its_record() -> None:
    signal = Signal.new(X, AE)
    events = []
    signal, event = observe(signal, assessment(True), at=AT)
    events.append(event)
    for action in ("review", "dismiss", "reopen", "confirm", "close"):
        signal, event = act(signal, action, actor="mhra:bob", at=AT, assessment=assessment(True))
        events.append(event)
    assert signal.state is State.CLOSED and signal.version == 6
    assert [e["to"] for e in events if e] == [
        "signalled", "under_review", "dismissed", "under_review", "confirmed", "closed"
    ]  # fmt: skip
    assert Signal.from_dict(json.loads(json.dumps(signal.to_dict()))) == signal
    assert signal_id(X, AE) != signal_id(Y, AE) != signal_id(X, "device infection")
