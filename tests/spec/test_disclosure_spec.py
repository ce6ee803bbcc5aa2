"""Disclosure specs: a table of patients' facts, a question, and what the sponsor is shown, on
every engine (``engine``). Issue 11, item 6: a withheld cell read ``<10`` even when it was large
(a funnel row "failed <10" that was really 116); it reads ``withheld``, and what a row cannot
show is said in words."""

from __future__ import annotations

from typing import Any

from pyroaring import BitMap

from concierge.commands.feasibility import render_answer
from feasibility.criteria import parse_question
from feasibility.disclosure.answer import AnswerSets, FunnelStepSets, ProtectedAnswer
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.engines.results import PatientResult, cohort, funnel

from .feasibility_helpers import AT, ICD10, condition, patient, population

#: The default rules without rounding, so the expected counts are the true ones.
EXACT = DisclosurePolicy(rounding=1, overlap_control=False)

DIABETES = {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}


def answer_sets(question: Any, results: dict[str, PatientResult]) -> AnswerSets:
    """The exact sets of an engine's results (patients numbered in name order)."""
    number = {p: i for i, p in enumerate(sorted(results))}

    def bits(patients: frozenset[str]) -> BitMap:
        return BitMap(number[p] for p in patients)

    members = cohort(question, results)
    site_region = {r.site: r.region or "Unknown" for r in results.values() if r.site}
    by_site = {s: bits(frozenset(p for p in members if results[p].site == s)) for s in site_region}
    by_region: dict[str, BitMap] = {}
    for site, region in site_region.items():
        by_region[region] = by_region.get(region, BitMap()) | by_site[site]
    steps = [
        FunnelStepSets(
            s.label,
            s.kind,  # type: ignore[arg-type]
            bits(s.entered),
            bits(s.passed),
            bits(s.failed),
            bits(s.unknown),
            bits(s.remaining),
        )
        for s in funnel(question, results)
    ]
    return AnswerSets(bits(members), by_site, site_region, by_region, steps)


def shown(engine: Any, patients: dict[str, list[dict[str, Any]]]) -> ProtectedAnswer:
    question = parse_question({"title": "Type 2 diabetes", "inclusion": [DIABETES]})
    results = engine.evaluate(question, population(**patients), AT)
    protected, _ = protect(answer_sets(question, results), EXACT, None, "Acme", "q")
    return protected


def test_a_large_failed_count_withheld_to_protect_a_small_one_reads_withheld(engine: Any) -> None:
    # 120 patients at one site; 4 have type 2 diabetes, 116 do not
    patients = {f"p{i:03}": [patient(site="RA1", region="London")] for i in range(120)}
    for name in ("p000", "p001", "p002", "p003"):
        patients[name].append(condition(ICD10, "E11.9"))
    answer = shown(engine, patients)
    step = answer.funnel[1]
    displays = {f: step[f].display for f in ("entered", "passed", "failed", "unknown")}
    # failed is 116, withheld because entered - passed - unknown would give the 4 away
    assert displays == {
        "entered": "120",
        "passed": "withheld",
        "failed": "withheld",
        "unknown": "withheld",
    }
    assert step["note"] == (
        "passed, failed, unknown and remaining are withheld to protect small counts"
    )
    label = step["label"]
    assert answer.notes == [
        "1 of 1 site is withheld to protect small counts",
        "1 of 1 region is withheld to protect small counts",
        f'funnel step "{label}": passed, failed, unknown and remaining are withheld to protect '
        "small counts",
    ]
    text = render_answer({"title": "Type 2 diabetes", **answer.to_dict()})
    assert "<10" not in text
    assert "Eligible patients: withheld" in text
    assert (
        f'Withheld: funnel step "{label}": passed, failed, unknown and remaining are withheld '
        "to protect small counts" in text
    )


def test_a_large_site_withheld_to_protect_a_small_one_reads_withheld(engine: Any) -> None:
    # with type 2 diabetes: 3 at RA1 (small), 60 at RB2 and 60 at RC3, all in London; and 20
    # patients without at RC3
    patients: dict[str, list[dict[str, Any]]] = {}
    for site, n in (("RA1", 3), ("RB2", 60), ("RC3", 60)):
        for i in range(n):
            patients[f"{site}-{i:02}"] = [
                patient(site=site, region="London"),
                condition(ICD10, "E11.9"),
            ]
    for i in range(20):
        patients[f"RC3-without-{i:02}"] = [patient(site="RC3", region="London")]
    answer = shown(engine, patients)
    # RB2 (60) is withheld so that the total minus the others does not give RA1's 3 away
    assert {s: c.display for s, c in answer.by_site.items()} == {
        "RA1": "withheld",
        "RB2": "withheld",
        "RC3": "60",
    }
    assert answer.total.display == "123"
    assert answer.notes[0] == "2 of 3 sites are withheld to protect small counts"
