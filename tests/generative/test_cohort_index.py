"""The indexed cohort keeper equals one that evaluates every question on every change.

:class:`LiveCohorts` re-evaluates, per change of a patient, only the trials its
:class:`~surveillance_stream.cohorts.RelevanceIndex` selects. Here the same random sequence of
facts (inserts, updates, retractions, of every kind the engines' strategies make, consent and
adverse events included), ticks of stream time and trial registrations is fed to it and to
keepers that select every active trial for every change: one with each trial's own first-step
gate (its cohort table must be the same, write for write, after every event; so the index's
gate, which asks all trials at once, is checked too) and one without a gate (the same members
after every event; it also keeps records of patients the gate turns away).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feasibility.engines.incremental import CompiledQuestion
from surveillance_stream.cohorts import LiveCohorts
from surveillance_stream.store import PatientStore

from .test_engine_agreement import OTHER_FACTS, patient_fact, questions
from .test_stream_equals_batch import (
    CLINICAL,
    START,
    envelope,
    timed_fact,
    timed_patient,
    timed_questions,
)

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
PARTITIONS = 2


class EveryQuestion(LiveCohorts):
    """Evaluates every active trial for every change (the definition the index must meet),
    asking each trial's own first-step gate rather than the index's."""

    def relevant_trials(self, partition: int, facts: list[Any]) -> list[int]:
        return list(range(len(self.active_trials(partition))))

    def may_pass(self, partition: int, patient: str) -> set[int]:
        tokens = self.tokens(partition, patient)
        return {
            i
            for i, (_, compiled, _) in enumerate(self.active_trials(partition))
            if compiled.may_pass_first_step(tokens)
        }


class EveryQuestionUngated(EveryQuestion):
    """... and never skips a patient whose first inclusion step cannot pass."""

    def may_pass(self, partition: int, patient: str) -> set[int]:
        return set(range(len(self.active_trials(partition))))

    def _gated(self, partition: int, patient: str, trial: str, compiled: CompiledQuestion) -> bool:
        return False


@st.composite
def worlds(draw: st.DrawFn) -> list[tuple[str, Any]]:
    timed = draw(st.booleans())
    n_trials = draw(st.integers(1, 4))
    trials = []
    for i in range(n_trials):
        question = draw(timed_questions()) if timed else draw(questions())
        trials.append(
            {
                "id": f"trial-{i}",
                "version": 1,
                "status": "active",
                "criteria": question.model_copy(update={"index_date": None}).model_dump(
                    mode="json", by_alias=True
                ),
            }
        )
    first = timed_patient() if timed else patient_fact()
    other = st.one_of(timed_fact(), OTHER_FACTS) if timed else st.one_of(CLINICAL, OTHER_FACTS)
    envelopes: list[dict[str, Any]] = []
    for p in range(draw(st.integers(1, 5))):
        patient = f"p-{p:02d}"
        # the patient's demographics are not always first: clinical facts may come before them
        resources = [draw(first), *draw(st.lists(other, max_size=5))]
        for j, fact in enumerate(resources):
            key = f"urn:t|R|{patient}-{j}"
            seq = 1
            envelopes.append(envelope(patient, key, seq, [fact]))
            for change in draw(st.lists(st.sampled_from(["update", "retract"]), max_size=2)):
                seq += 1
                new = draw(first) if j == 0 else draw(other)
                envelopes.append(envelope(patient, key, seq, [new] if change == "update" else None))
    events: list[tuple[str, Any]] = [
        ("facts", envelopes[i]) for i in draw(st.permutations(range(len(envelopes))))
    ]
    for days in sorted(draw(st.lists(st.floats(0, 700), max_size=5))):
        events.insert(draw(st.integers(0, len(events))), ("tick", START + days * 86400.0))
    for trial in trials:
        events.insert(draw(st.integers(0, len(events))), ("trial", trial))
        if draw(st.integers(0, 4)) == 0:  # a new version, or the trial retired
            changed = {**trial, "version": 2, "status": draw(st.sampled_from(["active", "closed"]))}
            events.insert(draw(st.integers(0, len(events))), ("trial", changed))
    return events


def keeper(kind: type[LiveCohorts]) -> LiveCohorts:
    return kind(PatientStore(), {}, {}, wall_clock=lambda: START)


def feed(cohorts: LiveCohorts, kind: str, payload: Any) -> None:
    if kind == "facts":
        partition = int(payload["patient"][2:]) % PARTITIONS
        change = cohorts.store.apply(partition, payload)
        cohorts.on_changes(partition, change.patient, [change])
    else:
        for partition in range(PARTITIONS):
            if kind == "tick":
                cohorts.on_tick(partition, payload)
            else:
                cohorts.on_trial(partition, payload)


def members(cohorts: LiveCohorts) -> set[tuple[str, str]]:
    return {
        (record["trial"], record["patient"])
        for record in cohorts.table.values()
        if record and record.get("member")
    }


@settings(
    max_examples=1000 if LONG else 80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(worlds())
def test_indexed_keeper_equals_evaluating_every_question(events: list[tuple[str, Any]]) -> None:
    indexed = keeper(LiveCohorts)
    every = keeper(EveryQuestion)
    ungated = keeper(EveryQuestionUngated)
    for step, (kind, payload) in enumerate(events):
        for cohorts in (indexed, every, ungated):
            feed(cohorts, kind, payload)
        assert indexed.table == every.table, (step, kind)
        assert members(indexed) == members(ungated), (step, kind)
    assert indexed.evaluations <= every.evaluations
    assert indexed.summary()["members"] == every.summary()["members"]
