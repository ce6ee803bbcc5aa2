"""Each rule of the shipped note rule set (``fhir_adapters/note_rules/device_problems.json``) on
hand-written notes: a true mention (a candidate outcome), and the same problem negated, historical,
uncertain, about the family and hypothetical (none of them a candidate). Spans are checked against
the text, so provenance points at the words read.

These notes are written for the tests; they describe no one.
"""

from __future__ import annotations

import pytest

from fhir_adapters.notes import NoteFinding, find_device_problems, rule_set

#: (problem, true mention, the problem's words in it, the device's words in it)
TRUE = [
    ("LOOSENING", "X-ray today shows loosening of the acetabular cup.", "loosening", "cup"),
    ("DISLOCATION", "Seen in ED: dislocated hip prosthesis, reduced.", "dislocated", "prosthesis"),
    ("REVISION", "The left hip replacement was revised on 3 May.", "revised", "replacement"),
    ("INFECTION", "Wound swab grew S. aureus: infection of the pacemaker pocket.", "infection",
     "pacemaker"),
    ("LEAD_FRACTURE", "Pacemaker interrogation: lead fracture with high impedance.",
     "lead fracture", "lead fracture"),
    ("PUMP_FAILURE", "Insulin pump failure overnight with hyperglycaemia.", "pump failure",
     "pump failure"),
]  # fmt: skip

#: (problem, note, the modifier ConText must find)
MODIFIED = [
    ("LOOSENING", "No evidence of loosening of the hip prosthesis.", "negated"),
    ("LOOSENING", "History of loosening of the knee implant, revised 2015.", "historical"),
    ("LOOSENING", "Possible loosening of the femoral stem.", "uncertain"),
    ("LOOSENING", "Her mother had loosening of her hip replacement.", "family"),
    ("DISLOCATION", "The prosthesis shows no dislocation.", "negated"),
    ("DISLOCATION", "History of dislocation of the hip prosthesis in 2010.", "historical"),
    ("DISLOCATION", "Suspected dislocation of the hip replacement, awaiting X-ray.", "uncertain"),
    ("DISLOCATION", "His father had a dislocation of his hip replacement.", "family"),
    ("REVISION", "If pain persists consider revision of the implant.", "hypothetical"),
    ("REVISION", "Denies any revision of the knee replacement.", "negated"),
    ("REVISION", "Brother had a revision of his hip prosthesis.", "family"),
    ("INFECTION", "No signs of infection around the pacemaker.", "negated"),
    ("INFECTION", "Possible infection of the hip prosthesis, aspirate sent.", "uncertain"),
    ("INFECTION", "History of infection of the knee implant, treated.", "historical"),
    ("LEAD_FRACTURE", "Pacemaker interrogation shows no lead fracture.", "negated"),
    ("LEAD_FRACTURE", "Possible lead fracture on the pacemaker chest film.", "uncertain"),
    ("PUMP_FAILURE", "No insulin pump failure since the last visit.", "negated"),
    ("PUMP_FAILURE", "Mother had insulin pump failure last year.", "family"),
]


FLAGS = ("negated", "uncertain", "historical", "hypothetical", "family")


def _only(text: str, problem: str) -> NoteFinding:
    found = [f for f in find_device_problems(text) if f.problem == problem]
    assert len(found) == 1, (text, found)
    return found[0]


def test_every_problem_rule_has_a_true_case_and_codes() -> None:
    problems = {r["category"] for r in rule_set()["target_rules"] if r["category"] != "DEVICE"}
    assert problems == {p for p, *_ in TRUE}
    assert problems <= {p for p, *_ in MODIFIED}
    for rule in rule_set()["target_rules"]:
        if rule["category"] != "DEVICE":
            assert rule["metadata"]["codes"], rule


@pytest.mark.parametrize(("problem", "text", "words", "device"), TRUE)
def test_a_true_mention_is_a_candidate_with_its_span(
    problem: str, text: str, words: str, device: str
) -> None:
    finding = _only(text, problem)
    assert finding.asserted
    assert not any(getattr(finding, flag) for flag in FLAGS)
    assert text[finding.start : finding.end] == words
    assert text[finding.device_start : finding.device_end] == device


@pytest.mark.parametrize(("problem", "text", "flag"), MODIFIED)
def test_a_modified_mention_is_marked_and_not_a_candidate(
    problem: str, text: str, flag: str
) -> None:
    finding = _only(text, problem)
    assert getattr(finding, flag), (text, finding)
    assert not finding.asserted


def test_a_problem_with_no_device_near_it_is_not_a_finding() -> None:
    assert find_device_problems("Loosening of the stools noted.") == ()
    assert find_device_problems("Infection of the left big toe, antibiotics started.") == ()
    assert find_device_problems("") == ()


def test_each_mention_in_a_note_is_judged_on_its_own() -> None:
    text = (
        "History of dislocation of the right hip prosthesis in 2012. "
        "Today the left hip replacement is dislocated again. "
        "No evidence of infection of the prosthesis."
    )
    found = find_device_problems(text)
    assert [(f.problem, f.asserted) for f in found] == [
        ("DISLOCATION", False),
        ("DISLOCATION", True),
        ("INFECTION", False),
    ]
    assert text[found[1].start : found[1].end] == "dislocated"
