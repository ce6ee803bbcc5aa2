"""Stream equals batch: the live cohort of a saved question, kept per event by the stream's
:class:`LiveCohorts`, equals the batch answer (reference and polars engines) over the same data
at the same evaluation time, after random interleavings of inserts, updates, retractions, ticks
of stream time, a trial registration, and worker crashes with restarts.

The worker is modelled faithfully where it matters: per partition, one log holds facts and
control messages in order; a crash loses all memory; what survives is the committed offset and
a prefix of the table writes made after it (changelogs are flushed before offsets are
committed, never after); a restart rebuilds patient state from the facts before the committed
offset, recovers timers and stream time from the table, and replays the rest of the log.
"""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from core.contracts.cohorts import (
    EVALUATED_PREFIX,
    WATERMARK_PREFIX,
    CohortRecord,
    EvaluatedMark,
    Watermark,
    split_record_key,
)
from feasibility.criteria import Question
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.engines.reference import ReferenceEngine
from feasibility.engines.results import cohort
from surveillance_stream.cohorts import LiveCohorts
from surveillance_stream.store import PatientStore

from .test_engine_agreement import (
    condition_fact,
    device_fact,
    medication_fact,
    observation_fact,
    patient_fact,
    procedure_fact,
    questions,
)

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
START = (AT - timedelta(days=400)).timestamp()
PARTITIONS = 2

CLINICAL = st.one_of(
    condition_fact(), observation_fact(), medication_fact(), procedure_fact(), device_fact()
)


def envelope(patient: str, key: str, seq: int, facts: list[dict[str, Any]] | None) -> dict:
    return {
        "schema": "concierge.facts/1",
        "key": key,
        "patient": patient,
        "seq": seq,
        "retracted": facts is None,
        "provenance": {"source": "urn:t", "resource_type": "X", "resource_id": key,
                       "version": str(seq), "ingested_at": "2026-01-01T00:00:00Z"},
        "facts": facts or [],
    }  # fmt: skip


# ---- a time-heavy world: few codes, dates spread over the ticks, birthdays in range, so that
# windows open and close and patients come of age while the stream runs


def _iso(days: float) -> str:
    return datetime.fromtimestamp(START + days * 86400.0, UTC).isoformat()


DAYS = st.floats(-300, 720).map(lambda d: round(d, 3))


@st.composite
def timed_patient(draw: st.DrawFn) -> dict[str, Any]:
    birth = (AT - timedelta(days=draw(st.integers(16 * 365, 19 * 365)))).date()
    return {"kind": "patient", "birth_date": birth.isoformat(),
            "sex": draw(st.sampled_from(["female", "male"])), "deceased": False,
            "deceased_date": None, "site": draw(st.sampled_from(["RA1", "RB2", None])),
            "site_key": draw(st.sampled_from([None, "urn:s|Organization|o1"])),
            "region": "London", "gp_practice": None, "general_practitioners": []}  # fmt: skip


def _coding(system: str, code: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": None}


@st.composite
def timed_fact(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["condition", "observation", "medication"]))
    when = _iso(draw(DAYS))
    if kind == "condition":
        code = draw(st.sampled_from(["E11.9", "I10"]))
        return {"kind": "condition", "codes": [_coding("http://hl7.org/fhir/sid/icd-10", code)],
                "onset": when, "abatement": None, "recorded": None, "clinical_status": "active",
                "verification_status": "confirmed", "stage": []}  # fmt: skip
    if kind == "observation":
        return {"kind": "observation", "codes": [_coding("http://loinc.org", "59261-8")],
                "status": "final", "effective": when,
                "value": draw(st.sampled_from([40.0, 52.0, 58.0, 61.0, 75.0])), "unit": "mmol/mol",
                "value_codes": [], "interpretation": [], "components": [],
                "category": ["laboratory"]}  # fmt: skip
    return {"kind": "medication", "codes": [_coding("https://dmd.nhs.uk", "109081006")],
            "status": "active", "start": when, "end": None, "source": "request"}  # fmt: skip


TIMED_CRITERIA = [
    {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}],
     "window": {"days_before": 180}},
    {"type": "condition", "codes": [{"system": "icd10", "code": "I10"}]},
    {"type": "observation", "codes": [{"concept": "hba1c"}],
     "value": {"ge": 58, "unit": "mmol/mol"}, "window": {"days_before": 90}},
    {"type": "observation", "codes": [{"concept": "hba1c"}],
     "value": {"lt": 58, "unit": "mmol/mol"}, "select": "any", "window": {"days_before": 365}},
    {"type": "medication", "codes": [{"system": "dmd", "code": "109081006"}],
     "window": {"days_before": 30}},
    {"type": "age", "min": 18},
    {"type": "age", "max": 17},
]  # fmt: skip


@st.composite
def timed_questions(draw: st.DrawFn) -> Question:
    from feasibility.criteria import parse_question

    inclusion = draw(st.lists(st.sampled_from(TIMED_CRITERIA), min_size=1, max_size=3))
    exclusion = draw(st.lists(st.sampled_from(TIMED_CRITERIA), max_size=1))
    return parse_question({"inclusion": inclusion, "exclusion": exclusion})


@st.composite
def scenarios(draw: st.DrawFn, timed: bool = False) -> dict[str, Any]:
    # saved questions are evaluated "now": the index instant moves with stream time
    if timed:
        question: Question = draw(timed_questions())
    else:
        question = draw(questions()).model_copy(update={"index_date": None})
    first = timed_patient() if timed else patient_fact()
    other = timed_fact() if timed else CLINICAL
    n_patients = draw(st.integers(1, 6))
    envelopes: list[dict[str, Any]] = []
    for i in range(n_patients):
        patient = f"p-{i:02d}"
        resources = [draw(first), *draw(st.lists(other, max_size=5))]
        for j, fact in enumerate(resources):
            key = f"urn:t|R|{patient}-{j}"
            envelopes.append(envelope(patient, key, 1, [fact]))
            seq = 1
            for change in draw(st.lists(st.sampled_from(["update", "retract"]), max_size=2)):
                seq += 1
                if change == "update":
                    new = draw(first) if j == 0 else draw(other)
                    envelopes.append(envelope(patient, key, seq, [new]))
                else:
                    envelopes.append(envelope(patient, key, seq, None))
    order = draw(st.permutations(range(len(envelopes))))
    events: list[tuple[str, Any]] = [("facts", envelopes[i]) for i in order]
    # stream time moves forward in ticks, by hours to months
    t = START
    ticks = sorted(draw(st.lists(st.floats(0, 700), min_size=1, max_size=6)))
    for days in ticks:
        t = START + days * 86400.0
        events.insert(draw(st.integers(0, len(events))), ("tick", t))
    trial = {"id": "trial-1", "version": 1, "status": "active",
             "criteria": question.model_dump(mode="json", by_alias=True)}  # fmt: skip
    events.insert(draw(st.integers(0, len(events))), ("trial", trial))
    restarts = draw(st.lists(st.integers(0, len(events)), max_size=3))
    end = max(t, START) + draw(st.sampled_from([0.0, 86400.0, 200 * 86400.0]))
    return {
        "question": question,
        "envelopes": envelopes,
        "events": events,
        "restarts": sorted(set(restarts)),
        "durable": draw(st.lists(st.floats(0, 1), min_size=3, max_size=3)),
        "committed": draw(st.lists(st.floats(0, 1), min_size=3, max_size=3)),
        "end": end,
    }


def partition_of(patient: str) -> int:
    return int(patient[2:]) % PARTITIONS


class Worker:
    """One simulated worker process: memory that a crash loses, tables that survive."""

    def __init__(self, table: dict[str, Any], trials: dict[str, Any]) -> None:
        self.store = PatientStore()
        self.cohorts = LiveCohorts(self.store, table, trials, wall_clock=lambda: START)

    def process(self, partition: int, kind: str, payload: Any) -> None:
        if kind == "facts":
            change = self.store.apply(partition, payload)
            self.cohorts.on_changes(partition, change.patient, [change])
        elif kind == "tick":
            self.cohorts.on_tick(partition, payload)
        else:
            self.cohorts.on_trial(partition, payload)


def run(scenario: dict[str, Any]) -> LiveCohorts:
    # the log: per partition, facts and control messages in order
    logs: dict[int, list[tuple[str, Any]]] = {p: [] for p in range(PARTITIONS)}
    for kind, payload in scenario["events"]:
        if kind == "facts":
            logs[partition_of(payload["patient"])].append((kind, payload))
        else:
            for p in range(PARTITIONS):
                logs[p].append((kind, payload))

    table: dict[str, Any] = {}
    trials: dict[str, Any] = {}
    worker = Worker(table, trials)
    position = {p: 0 for p in range(PARTITIONS)}
    committed = {p: 0 for p in range(PARTITIONS)}
    # table states since the last restart, with the log positions they reflect
    history: list[tuple[dict[int, int], dict[str, Any], dict[str, Any]]] = [
        (dict(position), {}, {})
    ]
    restarts = list(scenario["restarts"])
    step = 0
    crash_no = 0
    while True:
        if restarts and step >= restarts[0]:
            restarts.pop(0)
            # Crash. Offsets committed somewhere between the last commit and now; the table
            # keeps a prefix of the writes made after that commit (flushed before committing).
            fraction = scenario["committed"][crash_no % 3]
            committed = {
                p: committed[p] + int((position[p] - committed[p]) * fraction)
                for p in range(PARTITIONS)
            }
            # every write made before the commit is durable; later ones may be
            states = [
                (t, tr)
                for positions, t, tr in history
                if all(positions[q] >= committed[q] for q in range(PARTITIONS))
            ] or [(copy.deepcopy(table), copy.deepcopy(trials))]
            pick = int((len(states) - 1) * scenario["durable"][crash_no % 3])
            table, trials = copy.deepcopy(states[pick][0]), copy.deepcopy(states[pick][1])
            crash_no += 1
            worker = Worker(table, trials)
            for p in range(PARTITIONS):
                for kind, payload in logs[p][: committed[p]]:
                    if kind == "facts":
                        worker.store.apply(p, payload)
                worker.store.partitions.setdefault(p, {})
                worker.cohorts.recover(p)
            position = dict(committed)
            history = [(dict(position), copy.deepcopy(table), copy.deepcopy(trials))]
        pending = [(p, position[p]) for p in range(PARTITIONS) if position[p] < len(logs[p])]
        if not pending:
            break
        p, i = min(pending, key=lambda pi: (pi[1], pi[0]))
        kind, payload = logs[p][i]
        worker.process(p, kind, payload)
        position[p] += 1
        history.append((dict(position), copy.deepcopy(table), copy.deepcopy(trials)))
        step += 1
    for p in range(PARTITIONS):
        worker.cohorts.on_tick(p, scenario["end"])
    return worker.cohorts


def population(envelopes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    store = PatientStore()
    for e in envelopes:
        store.apply(0, e)
    return store.patients(0)


def check_live_equals_batch(scenario: dict[str, Any]) -> None:
    cohorts = run(scenario)
    question = scenario["question"]
    # the stream's evaluation time is its stream time: the final tick on every partition
    at = datetime.fromtimestamp(max(cohorts.stream_time.values()), UTC)
    data = population(scenario["envelopes"])
    want = cohort(question, ReferenceEngine().evaluate(question, data, at))
    assert set(cohorts.members("trial-1")) == set(want)
    assert cohort(question, PolarsEngine().evaluate(question, data, at)) == want
    check_table_follows_the_contract(cohorts.table)


def check_table_follows_the_contract(table: dict[str, Any]) -> None:
    """What the worker writes on the cohort topic is what core.contracts.cohorts defines: each
    value validates as its key's model and carries no field the contract does not name."""
    for key, value in table.items():
        if value is None:
            continue
        if key.startswith(WATERMARK_PREFIX):
            model: type[BaseModel] = Watermark
        elif key.startswith(EVALUATED_PREFIX):
            model = EvaluatedMark
        else:
            assert split_record_key(key) == (value["trial"], value["patient"]), key
            model = CohortRecord
        model.model_validate(value)
        names = {f.alias or name for name, f in model.model_fields.items()}
        assert set(value) <= names, (key, set(value) - names)


SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(max_examples=1500 if LONG else 100, deadline=None, suppress_health_check=SLOW_OK)
@given(scenarios())
def test_live_cohort_equals_batch_after_crashes(scenario: dict[str, Any]) -> None:
    """Every criterion kind (the engines' generative strategies), crashes and restarts."""
    check_live_equals_batch(scenario)


@settings(max_examples=1500 if LONG else 150, deadline=None, suppress_health_check=SLOW_OK)
@given(scenarios(timed=True))
def test_live_cohort_ages_with_stream_time(scenario: dict[str, Any]) -> None:
    """Windows opening and closing and patients coming of age while the stream runs."""
    check_live_equals_batch(scenario)


@settings(max_examples=1000 if LONG else 100, deadline=None)
@given(st.one_of(scenarios(), scenarios(timed=True)), st.floats(0, 1))
def test_nothing_changes_before_the_next_check(scenario: dict[str, Any], where: float) -> None:
    """The incremental engine's next-change instant is safe: between an evaluation and its
    next check, the reference result stays the same."""
    from feasibility.engines.incremental import CompiledQuestion
    from feasibility.engines.reference import evaluate_patient
    from feasibility.patient_data import digest

    question = scenario["question"]
    assert question.index_date is None
    compiled = CompiledQuestion(question)
    data = population(scenario["envelopes"])
    t0 = datetime.fromtimestamp(START + where * 700 * 86400, UTC)
    for patient, entries in data.items():
        patient_data = digest(patient, entries)
        result, next_check = compiled.evaluate(patient_data, t0, count_unconvertible=True)
        horizon = next_check if next_check is not None else t0.timestamp() + 3 * 365 * 86400
        for fraction in (0.0, 0.25, 0.5, 0.999999):
            t = t0.timestamp() + (horizon - t0.timestamp()) * fraction
            later = evaluate_patient(question, patient_data, datetime.fromtimestamp(t, UTC))
            assert later == result, (patient, t0, next_check, t)
