"""Counts of unconvertible results under overlap control: published per set of patients, so a
second question whose patients differ by one cannot read that patient's results by difference
(the hole the stop-10 note left: these counts were not in the publication registry)."""

from __future__ import annotations

import polars as pl
from pyroaring import FrozenBitMap

from feasibility.criteria import parse_question
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.registry import NewPublication, PublicationRegistry
from feasibility.service import RESULT_SETS, unconvertible_results

QUESTION = parse_question(
    {
        "inclusion": [
            {
                "type": "observation",
                "codes": [{"concept": "hba1c"}],
                "value": {"ge": 48, "unit": "mmol/mol"},
            }
        ]
    }
)
POLICY = DisclosurePolicy()  # threshold 10, rounding 5, overlap control on


def steps(skipped: dict[int, int], patients: int = 200) -> pl.DataFrame:
    """A step frame: every patient in the population, entering step 0, with ``skipped[pid]``
    unconvertible results (0 for the rest)."""
    return pl.DataFrame(
        {
            "pid": pl.Series(range(patients), dtype=pl.UInt32),
            "in_population": [True] * patients,
            "s0": pl.Series([None] * patients, dtype=pl.Int8),
            "u0": [skipped.get(p, 0) for p in range(patients)],
        }
    )


def value(cells: dict, step: int = 0) -> int | None:
    return cells[step].value


# 30 patients with 2 unconvertible results each: 60; patient 150 has 13 of its own
BASE = dict.fromkeys(range(30), 2)
WITH_ONE_MORE = {**BASE, 150: 13}


def test_without_a_registry_two_questions_differ_by_one_patients_results() -> None:
    """The leak, as it was: the rounded totals differ by that one patient's results."""
    first = unconvertible_results(QUESTION, steps(BASE), POLICY)
    second = unconvertible_results(QUESTION, steps(WITH_ONE_MORE), POLICY)
    assert (value(first), value(second)) == (60, 75)


def test_a_near_set_gets_the_earlier_publication_again() -> None:
    registry = PublicationRegistry("sqlite://")
    first = unconvertible_results(QUESTION, steps(BASE), POLICY, registry, "acme", "q1")
    second = unconvertible_results(QUESTION, steps(WITH_ONE_MORE), POLICY, registry, "rival", "q2")
    assert value(first) == 60
    assert second[0] == first[0], "a set one patient away published a new value"
    # the same set again (a republication) and a set far from it
    again = unconvertible_results(QUESTION, steps(BASE), POLICY, registry, "acme", "q1")
    assert again[0] == first[0]
    far = dict.fromkeys(range(100, 140), 3)
    assert value(unconvertible_results(QUESTION, steps(far), POLICY, registry, "acme", "q3")) == 120


def test_a_withheld_publication_stays_withheld_for_near_sets() -> None:
    registry = PublicationRegistry("sqlite://")
    few = dict.fromkeys(range(8), 3)  # 8 patients: under the threshold, withheld
    first = unconvertible_results(QUESTION, steps(few), POLICY, registry, "acme", "q1")
    assert first[0].suppressed and first[0].value is None
    more = {**few, 50: 3, 51: 3, 52: 3}  # 11 patients, 3 away from the withheld set
    second = unconvertible_results(QUESTION, steps(more), POLICY, registry, "acme", "q2")
    assert second[0].suppressed and second[0].value is None


def test_result_sets_never_meet_sets_of_patients() -> None:
    """A count of patients published for the very same patients is not a count of results:
    the result sets are a namespace of their own."""
    registry = PublicationRegistry("sqlite://")
    patients = FrozenBitMap(range(30))
    registry.record([NewPublication(patients, 30, "30", False, None)], "acme", "other", 0)
    cells = unconvertible_results(QUESTION, steps(BASE), POLICY, registry, "acme", "q1")
    assert value(cells) == 60, "the count of patients was copied as a count of results"
    registry.refresh()
    by_value = {entry.value: entry.bits for entry in map(registry.entry, range(1, 3))}
    assert by_value[30] == patients
    assert by_value[60] == FrozenBitMap(p + RESULT_SETS for p in range(30))


def test_without_overlap_control_nothing_is_recorded() -> None:
    registry = PublicationRegistry("sqlite://")
    plain = DisclosurePolicy(overlap_control=False)
    unconvertible_results(QUESTION, steps(BASE), plain, registry, "acme", "q1")
    assert len(registry) == 0
