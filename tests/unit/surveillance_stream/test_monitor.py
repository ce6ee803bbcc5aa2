"""The signal monitor's logic, fed contribution records in memory (the integration test
``tests/integration/test_device_signals.py`` runs it on the real broker behind a real worker).

* Counters kept by diffs per patient key equal the counters rebuilt from the latest records, and
  replaying records changes nothing.
* The faulty model signals; retracting its outcomes lapses unreviewed signals; regulator actions
  follow the lifecycle; a monitor restored from the events has the same states.
* Every ``reproduce`` command, run through ``concierge stats``, gives the numbers shown.
* Breakdown counts follow the small-number rules.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from concierge.commands.stats import stats
from surveillance_stream.devices import Contribution, Counters, contribution
from surveillance_stream.monitor import SignalMonitor, UnknownSignal
from surveillance_stream.scan import ScanPlan
from surveillance_stream.signals import IllegalTransition, SignalConfig, State
from surveillance_stream.statistics.treescan import AlphaSpending
from tests.generative.test_device_counters import (
    FAULTY_NODE,
    faulty_outcome_records,
    simulate,
)

AT = datetime(2026, 1, 2, tzinfo=UTC)


class Message:
    """The part of a confluent-kafka message the monitor reads."""

    def __init__(self, key: str, value: bytes | None, offset: int, partition: int = 0) -> None:
        self._key = orjson.dumps(key)  # the worker's table writes keys as JSON strings
        self._value = value
        self._offset = offset
        self._partition = partition

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return self._partition


def records(contributions: Iterable[Contribution | tuple[str, None]], start: int = 0) -> list:
    out = []
    for i, item in enumerate(contributions):
        if isinstance(item, tuple):
            out.append(Message(item[0], None, start + i))
        else:
            value = item.to_dict() | {"partition": 0}
            out.append(Message(item.patient, orjson.dumps(value), start + i))
    return out


@cache
def world() -> Any:
    return simulate(3)


def monitor() -> SignalMonitor:
    made = SignalMonitor(
        "unused:9092", "devices", "signals", config=SignalConfig(), clock=lambda: AT
    )
    made.ready = True
    return made


def test_counters_by_diffs_equal_rebuilt_and_replays_change_nothing() -> None:
    sim, _ = world()
    watcher = monitor()
    batch = records(sim.last.values())
    watcher.absorb(batch)
    assert watcher.counters == sim.counters
    applied = watcher.applied
    watcher.absorb(batch)  # a re-read of the topic: the same records again
    assert watcher.counters == sim.counters
    assert watcher.applied == applied
    gone = next(iter(sim.last))
    watcher.absorb(records([(gone, None)], start=len(batch)))  # tombstone: devices retracted
    rest = [c for p, c in sim.last.items() if p != gone]
    assert watcher.counters == Counters.rebuild(rest)


def test_faulty_model_signals_then_lapses_after_retraction_and_actions_follow_rules() -> None:
    sim, patients = simulate(3)  # its own world: this test retracts records
    watcher = monitor()
    watcher.absorb(records(sim.last.values()))
    assert watcher.reassess() > 0
    rows = watcher.rows(level="model")
    faulty = [r for r in rows if r["node"] == FAULTY_NODE and r["state"] == "signalled"]
    assert faulty, [(r["node"], r["outcome"], r["signal"]) for r in rows[:5]]
    assert rows[0]["signal"] and rows[0]["strength"] >= 1.0
    strengths = [r["strength"] for r in rows if r["signal"]]
    assert strengths == sorted(strengths, reverse=True)
    assert all(r["observed"] > r["expected"] for r in faulty)

    reviewed, others = faulty[0], faulty[1:]
    assert watcher.act(reviewed["id"], "review", actor="reg:1").state is State.UNDER_REVIEW
    with pytest.raises(IllegalTransition, match="allowed actions: confirm, dismiss"):
        watcher.act(reviewed["id"], "close", actor="reg:1")
    with pytest.raises(UnknownSignal):
        watcher.act("sig-nope", "review", actor="reg:1")

    # retract the faulty model's outcome records and recompute those patients' contributions
    for rtype, rid in faulty_outcome_records(patients):
        sim.ingestor.delete(rtype, rid, "test")
    sim.ingestor.commit()
    sim.consume()
    watcher.absorb(records(sim.last.values(), start=10**6))
    assert watcher.counters == sim.rebuilt()
    watcher.reassess()
    after = {r["id"]: r for r in watcher.rows()}
    assert after[reviewed["id"]]["state"] == "under_review"  # people move reviewed signals
    assert not after[reviewed["id"]]["signal"]
    for other in others:
        assert after[other["id"]]["state"] == "none"
        actions = [e["action"] for e in watcher.events[other["id"]]]
        assert actions == ["detect", "lapse"]

    # a monitor restored from the events has the same states
    restored = monitor()
    for identifier in watcher.events:
        for event in watcher.events[identifier]:
            restored._remember(event)
    assert {k: (s.state, s.version) for k, s in restored.signals.items()} == {
        k: (s.state, s.version) for k, s in watcher.signals.items()
    }


def _stats(command: str) -> dict[str, Any]:
    args = shlex.split(command)
    assert args[:2] == ["concierge", "stats"]
    result = CliRunner().invoke(stats, args[2:])
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.output)
    return parsed


def test_every_number_shown_is_reproduced_by_concierge_stats() -> None:
    sim, _ = world()
    watcher = monitor()
    watcher.absorb(records(sim.last.values()))
    watcher.reassess()
    checked = 0
    for row in watcher.rows(level="model")[:6]:
        detail = watcher.detail(row["id"])
        shown = detail["assessment"]
        commands = detail["reproduce"]
        table = _stats(commands["disproportionality"])
        for key in ("prr", "ror", "chi2", "chi2_yates", "ic", "ic025"):
            assert table[key] == pytest.approx(shown["disproportionality"][key], rel=1e-9), key
        cv = _stats(commands["maxsprt_cv"])["cv"]
        assert cv == pytest.approx(shown["maxsprt"]["cv"], rel=1e-9)
        if "maxsprt" in commands:
            sprt = _stats(commands["maxsprt"])
            assert sprt["llr"] == pytest.approx(shown["maxsprt"]["llr"], rel=1e-9, abs=1e-12)
            assert sprt["signal"] == shown["maxsprt"]["signal"]
        if "ebgm" in commands:
            scores = _stats(commands["ebgm"])
            for key in ("ebgm", "eb05", "eb95"):
                assert scores[key] == pytest.approx(shown["ebgm"][key], rel=1e-6), key
        checked += 1
    assert checked == 6


def test_history_is_cumulative_and_breakdowns_follow_small_number_rules() -> None:
    sim, _ = world()
    watcher = monitor()
    watcher.absorb(records(sim.last.values()))
    watcher.reassess()
    row = next(r for r in watcher.rows(level="model") if r["node"] == FAULTY_NODE)
    points = watcher.history(row["id"])["points"]
    assert points and points[-1]["observed"] <= row["observed"]
    assert [p["observed"] for p in points] == sorted(p["observed"] for p in points)
    # the cumulative expected line never dips (each quarter's cohort adds its own expectation)
    assert [p["expected"] for p in points] == sorted(p["expected"] for p in points)
    assert all(p["cv"] == row["cv"] for p in points)

    def protect(n: int) -> int | str:
        return "<10" if 0 < n < 10 else n

    lots = watcher.breakdown(row["id"], "lot", protect)["rows"]
    assert lots and all(r["node"].startswith(FAULTY_NODE + "/") for r in lots)
    assert all(r["with_outcome"] == "<10" or r["with_outcome"] == 0 or r["with_outcome"] >= 10
               for r in lots)  # fmt: skip
    for r in lots:  # no ratio over a withheld count
        if r["withheld"]:
            assert r["prr"] is None and r["prr_ci"] == [None, None]
    models = watcher.breakdown(row["id"], "model", protect)["rows"]
    assert {r["node"] for r in models} >= {FAULTY_NODE} and len(models) > 1  # the class's models
    sites = watcher.breakdown(row["id"], "site", protect)["rows"]
    assert sites
    with pytest.raises(ValueError, match="breakdown by one of"):
        watcher.breakdown(row["id"], "colour", protect)


def test_provenance_names_the_records_behind_the_count() -> None:
    sim, _ = world()
    watcher = monitor()
    watcher.absorb(records(sim.last.values()))
    watcher.reassess()
    row = next(r for r in watcher.rows(level="model") if r["node"] == FAULTY_NODE)
    found = watcher.provenance(row["id"], limit=100_000)
    assert found["patients"] == row["observed"]
    assert {s["patient"] for s in found["sources"]} == set(
        sim.counters.patients_of("model", FAULTY_NODE, row["outcome"])
    )
    for source in found["sources"]:
        entries = sim.store.patient(0, source["patient"])
        assert str(entries[source["resource"]]["seq"]) == str(source["seq"])
    assert watcher.provenance(row["id"], limit=3)["truncated"]


def test_a_monitor_not_caught_up_says_so() -> None:
    watcher = SignalMonitor("unused:9092", "devices", "signals", config=SignalConfig())
    from surveillance_stream.monitor import MonitorError

    with pytest.raises(MonitorError, match="not ready: not started"):
        watcher.rows()


def test_contribution_records_round_trip() -> None:
    sim, _ = world()
    for patient, item in list(sim.last.items())[:50]:
        assert Contribution.from_dict(orjson.loads(orjson.dumps(item.to_dict()))) == item
        assert contribution(patient, sim.store.patient(0, patient)) == item


def test_between_sweeps_only_the_nodes_whose_counts_changed_are_assessed() -> None:
    sim, _ = world()
    watcher = monitor()
    watcher.absorb(records(sim.last.values()))
    everything = watcher.reassess()
    patient, mine = next((p, c) for p, c in sim.last.items() if c.keys)
    nodes = {k[1] for k in mine.keys if k[0] in watcher.levels}
    watcher.absorb(records([(patient, None)], start=10**6))  # this patient's devices retracted
    touched = watcher.reassess(sweep=False)
    pairs = {
        (node, outcome)
        for node in nodes
        for level in watcher.levels
        for outcome in watcher.counters.outcome_names(level, node)
    }
    assert 0 < touched <= len(pairs) + len(nodes) * 8 < everything
    assert watcher.reassess(sweep=True) > touched  # the sweep covers the class's other nodes
    rebuilt = [c for p, c in sim.last.items() if p != patient]
    assert watcher.counters == Counters.rebuild(rebuilt)


def test_a_look_of_the_tree_scan_spends_alpha_and_moves_signals_it_passes() -> None:
    """With ``tree_scan`` as the signal rule, only the cuts a look of the alpha-spending plan
    rejects signal; each records the control it passed, and a restored monitor has the looks."""
    sim, _ = world()
    plan = ScanPlan(spending=AlphaSpending(alpha=0.2, looks=2), replications=199)
    config = SignalConfig(rules=("tree_scan",))
    watcher = SignalMonitor(
        "unused:9092", "devices", "signals", config=config, clock=lambda: AT, plan=plan,
        scan=True, levels=("manufacturer", "model", "lot"),
    )  # fmt: skip
    watcher.ready = True
    watcher.absorb(records(sim.last.values()))
    watcher.reassess()
    assert not any(a.signal for a in watcher.assessments.values())  # no look yet
    exploratory = watcher.scan(spend=False, seed=1)
    assert exploratory["look"] is None and exploratory["signals"] == []
    assert watcher.looks == [] and not watcher.tree_flags
    look = watcher.scan(spend=True, seed=1)
    assert look["look"] == 1 and look["alpha"] == pytest.approx(0.1)
    assert look["alpha_spent"] == pytest.approx(0.1)
    assert look["signals"], "the faulty model's cluster should pass at alpha 0.1"
    assert all(c["p_value"] <= 0.1 for c in look["signals"])
    watcher.reassess()
    flagged = {(c["node"], c["outcome"]) for c in look["signals"] if c["level"] != "class"}
    signalling = {(a.node, a.outcome) for a in watcher.assessments.values() if a.signal}
    assert signalling == flagged
    identifier = next(iter(i for i, a in watcher.assessments.items() if a.signal))
    events = watcher.events[identifier]
    control = events[-1]["statistics"]["controls"][0]
    assert control["control"] == "tree_scan" and control["look"] == 1
    assert control["p_value"] <= control["alpha_at_look"]
    view = watcher.scan_view()
    assert [x["look"] for x in view["looks"]] == [1] and view["plan"]["looks"] == 2
    # the look is an event on the signals topic: a monitor restored from it continues the plan
    restored = SignalMonitor(
        "unused:9092", "devices", "signals", config=config, clock=lambda: AT, plan=plan,
        scan=True, levels=("manufacturer", "model", "lot"),
    )  # fmt: skip
    restored._restore([Message("scan-look-1", orjson.dumps(look), 0)])
    assert len(restored.looks) == 1 and restored.tree_flags == watcher.tree_flags
    restored.ready = True
    assert restored.scan(spend=True, seed=2)["look"] == 2


def test_the_report_shows_the_numbers_the_api_gives(tmp_path: Any) -> None:
    from surveillance_stream.report import fmt, render_html, render_pdf
    from tests.integration.test_device_signals import pdf_text, render_pdf_pages

    sim, _ = world()
    watcher = monitor()
    watcher.absorb(records(sim.last.values()))
    watcher.reassess()
    row = next(r for r in watcher.rows(level="model") if r["node"] == FAULTY_NODE and r["signal"])
    watcher.scan(spend=False, seed=3)
    data = watcher.report_data(row["id"])
    detail = watcher.detail(row["id"])
    maxsprt = detail["assessment"]["maxsprt"]
    prr = detail["assessment"]["disproportionality"]["prr"]
    numbers = [fmt(maxsprt[k]) for k in ("llr", "expected", "expected_crude", "cv")] + [fmt(prr)]
    page = render_html(data)
    assert row["node"] in page and "<svg" in page and 'data-series="expected"' in page
    for number in numbers:
        assert number in page, number
    assert not any(p in page for p in data.provenance_patients())  # no pseudonym in a report
    content = render_pdf(data)
    text = pdf_text(content)
    for number in numbers:
        assert number in text, number
    assert "tree scan" in text.lower() and "Reproduce" in text
    pages = render_pdf_pages(content, tmp_path)
    assert pages and pages[0].stat().st_size > 10_000


def test_report_numbers_are_plain_notation() -> None:
    from surveillance_stream.report import fmt

    assert fmt(6.6e-05) == "0.00006600"
    assert fmt(1234.5678) == "1235"
    assert fmt(12.3456) == "12.35"
    assert (fmt(None), fmt(float("nan")), fmt(3)) == ("—", "—", "3")
