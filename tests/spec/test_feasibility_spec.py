"""Feasibility specs: a table of patients' facts, one criterion, and the expected result per
patient (True, False or None for UNKNOWN). Every spec runs on every engine (``engine``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from feasibility.criteria import parse_question
from feasibility.engines.results import cohort, funnel

from .feasibility_helpers import (
    AJCC,
    AT,
    ICD10,
    LOINC,
    SNOMED,
    component,
    condition,
    device,
    medication,
    observation,
    patient,
    population,
    procedure,
)


def run(
    engine: Any,
    criterion: dict[str, Any],
    patients: dict[str, list[dict[str, Any]]],
    at: datetime = AT,
    **question: Any,
) -> dict[str, bool | None]:
    q = parse_question({"inclusion": [criterion], **question})
    results = engine.evaluate(q, population(**patients), at)
    return {p: r.steps[0] for p, r in results.items()}


# --------------------------------------------------------------------------- conditions


def test_condition_codes_prefix_range_and_dots(engine: Any) -> None:
    patients = {
        "dotted": [patient(), condition(ICD10, "E11.9")],
        "undotted": [patient(), condition(ICD10, "E119")],
        "other": [patient(), condition(ICD10, "E10.1")],
        "none": [patient()],
    }
    assert run(
        engine, {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}, patients
    ) == {"dotted": True, "undotted": True, "other": False, "none": False}
    assert run(
        engine, {"type": "condition", "codes": [{"system": "icd10", "code": "E11.9"}]}, patients
    ) == {"dotted": True, "undotted": True, "other": False, "none": False}
    assert run(
        engine, {"type": "condition", "codes": [{"system": "icd10", "range": "E10-E11"}]}, patients
    ) == {"dotted": True, "undotted": True, "other": True, "none": False}


def test_condition_snomed_and_dmd_share_ids(engine: Any) -> None:
    patients = {"a": [patient(), condition(SNOMED, "44054006")], "b": [patient()]}
    got = run(
        engine, {"type": "condition", "codes": [{"system": "snomed", "code": "44054006"}]}, patients
    )
    assert got == {"a": True, "b": False}


def test_condition_refuted_and_entered_in_error_never_count(engine: Any) -> None:
    patients = {
        "refuted": [patient(), condition(ICD10, "I10", verification="refuted")],
        "error": [patient(), condition(ICD10, "I10", verification="entered-in-error")],
        "unconfirmed": [patient(), condition(ICD10, "I10", verification="unconfirmed")],
        "resolved": [patient(), condition(ICD10, "I10", clinical="resolved")],
    }
    crit = {"type": "condition", "codes": [{"system": "icd10", "code": "I10"}]}
    assert run(engine, crit, patients) == {
        "refuted": False,
        "error": False,
        "unconfirmed": True,
        "resolved": True,
    }
    active = {**crit, "clinical_status": ["active"]}
    assert run(engine, active, patients)["resolved"] is False


def test_condition_min_count_counts_distinct_records(engine: Any) -> None:
    patients = {
        "two": [
            patient(),
            condition(ICD10, "J45.9", "2019-01-01"),
            condition(ICD10, "J45.9", "2021-01-01"),
        ],
        "one": [patient(), condition(ICD10, "J45.9", "2019-01-01")],
    }
    crit = {"type": "condition", "codes": [{"system": "icd10", "code": "J45.9"}], "min_count": 2}
    assert run(engine, crit, patients) == {"two": True, "one": False}


# --------------------------------------------------------------------------- time windows


def test_window_edges_are_inclusive_to_the_microsecond(engine: Any) -> None:
    edge = AT - timedelta(days=180)
    patients = {
        "on_edge": [patient(), condition(ICD10, "I10", edge.isoformat())],
        "just_out": [patient(), condition(ICD10, "I10", (edge - timedelta(seconds=1)).isoformat())],
        "at_t": [patient(), condition(ICD10, "I10", AT.isoformat())],
        "after_t": [patient(), condition(ICD10, "I10", (AT + timedelta(seconds=1)).isoformat())],
        "dateless": [patient(), condition(ICD10, "I10", None)],
    }
    crit = {
        "type": "condition",
        "codes": [{"system": "icd10", "code": "I10"}],
        "window": {"days_before": 180},
    }
    assert run(engine, crit, patients) == {
        "on_edge": True,
        "just_out": False,
        "at_t": True,
        "after_t": False,
        "dateless": False,
    }
    ever = {"type": "condition", "codes": [{"system": "icd10", "code": "I10"}]}
    assert run(engine, ever, patients) == {
        "on_edge": True,
        "just_out": True,
        "at_t": True,
        "after_t": False,
        "dateless": True,
    }


def test_fixed_index_date_is_the_end_of_that_day(engine: Any) -> None:
    patients = {
        "late_that_day": [patient(), condition(ICD10, "I10", "2024-06-30T23:59:59+00:00")],
        "next_day": [patient(), condition(ICD10, "I10", "2024-07-01T00:00:00+00:00")],
    }
    crit = {"type": "condition", "codes": [{"system": "icd10", "code": "I10"}]}
    got = run(engine, crit, patients, index_date="2024-06-30")
    assert got == {"late_that_day": True, "next_day": False}


def test_window_anchored_after_diagnosis(engine: Any) -> None:
    dx = {"type": "condition", "id": "dx", "codes": [{"system": "icd10", "prefix": "C34"}]}
    after = {
        "type": "medication",
        "codes": [{"system": "dmd", "code": "720468002"}],
        "window": {"anchor": "dx", "start": 0, "end": None},
    }
    patients = {
        "after": [
            patient(),
            condition(ICD10, "C34.9", "2024-01-10"),
            medication("720468002", "2024-02-01"),
        ],
        "before": [
            patient(),
            condition(ICD10, "C34.9", "2024-01-10"),
            medication("720468002", "2023-12-01"),
        ],
        "no_dx": [patient(), medication("720468002", "2024-02-01")],
        "same_instant": [
            patient(),
            condition(ICD10, "C34.9", "2024-01-10"),
            medication("720468002", "2024-01-10"),
        ],
    }
    q = parse_question({"inclusion": [dx, after]})
    results = engine.evaluate(q, population(**patients), AT)
    assert {p: r.steps[1] for p, r in results.items()} == {
        "after": True,
        "before": False,
        "no_dx": False,
        "same_instant": True,
    }


def test_window_within_days_after_anchor(engine: Any) -> None:
    dx = {"type": "condition", "id": "dx", "codes": [{"system": "icd10", "code": "E11.9"}]}
    early = {
        "type": "medication",
        "codes": [{"system": "dmd", "code": "109081006"}],
        "window": {"anchor": "dx", "start": 0, "end": 90},
    }
    patients = {
        "day_90": [
            patient(),
            condition(ICD10, "E11.9", "2020-01-01T09:00:00+00:00"),
            medication("109081006", "2020-03-31T09:00:00+00:00"),
        ],
        "day_91": [
            patient(),
            condition(ICD10, "E11.9", "2020-01-01T09:00:00+00:00"),
            medication("109081006", "2020-04-01T09:00:00+00:00"),
        ],
    }
    q = parse_question({"inclusion": [dx, early]})
    results = engine.evaluate(q, population(**patients), AT)
    assert {p: r.steps[1] for p, r in results.items()} == {"day_90": True, "day_91": False}


# --------------------------------------------------------------------------- observations


HBA1C = {
    "type": "observation",
    "codes": [{"concept": "hba1c"}],
    "value": {"ge": 58, "unit": "mmol/mol"},
    "window": {"days_before": 365},
}


def test_latest_value_decides_and_missing_is_unknown(engine: Any) -> None:
    patients = {
        "high_latest": [
            patient(),
            observation("59261-8", "2025-03-01", 50, "mmol/mol"),
            observation("59261-8", "2025-11-01", 61, "mmol/mol"),
        ],
        "low_latest": [
            patient(),
            observation("59261-8", "2025-03-01", 70, "mmol/mol"),
            observation("59261-8", "2025-11-01", 52, "mmol/mol"),
        ],
        "too_old": [patient(), observation("59261-8", "2024-06-01", 80, "mmol/mol")],
        "none": [patient()],
        "entered_in_error": [
            patient(),
            observation("59261-8", "2025-11-01", 80, "mmol/mol", status="entered-in-error"),
        ],
    }
    assert run(engine, HBA1C, patients) == {
        "high_latest": True,
        "low_latest": False,
        "too_old": None,
        "none": None,
        "entered_in_error": None,
    }


def test_hba1c_percent_converts_with_the_master_equation(engine: Any) -> None:
    # 7.5 % (NGSP) is 58.5 mmol/mol (IFCC); 7.4 % is 57.4
    patients = {
        "pct_high": [patient(), observation("4548-4", "2025-11-01", 7.5, "%")],
        "pct_low": [patient(), observation("4548-4", "2025-11-01", 7.4, "%")],
    }
    assert run(engine, HBA1C, patients) == {"pct_high": True, "pct_low": False}


def test_ldl_mass_and_substance_units_convert(engine: Any) -> None:
    crit = {
        "type": "observation",
        "codes": [{"concept": "ldl_cholesterol"}],
        "value": {"ge": 3.0, "unit": "mmol/L"},
    }
    patients = {
        "mg_high": [patient(), observation("18262-6", "2025-11-01", 120.0, "mg/dL")],
        "mg_low": [patient(), observation("18262-6", "2025-11-01", 110.0, "mg/dL")],
        "mmol": [patient(), observation("22748-8", "2025-11-01", 3.2, "mmol/L")],
        "bad_unit": [patient(), observation("22748-8", "2025-11-01", 3.2, "kg")],
    }
    assert run(engine, crit, patients) == {
        "mg_high": True,
        "mg_low": False,
        "mmol": True,
        "bad_unit": None,
    }


def test_latest_testable_reading_skips_unconvertible_units(engine: Any) -> None:
    crit = {
        "type": "observation",
        "codes": [{"system": "loinc", "code": "22748-8"}],
        "value": {"ge": 3.0, "unit": "mmol/L"},
    }
    patients = {
        "p": [
            patient(),
            observation("22748-8", "2025-01-01", 3.5, "mmol/L"),
            observation("22748-8", "2025-11-01", 1.0, "furlongs"),
        ],
    }
    assert run(engine, crit, patients) == {"p": True}


EGFR = {
    "type": "observation",
    "codes": [{"concept": "egfr"}],
    "value": {"lt": 30, "unit": "mL/min/{1.73_m2}"},
}


def test_egfr_in_ml_per_min_is_not_normalised_egfr_and_is_counted_as_unconvertible(
    engine: Any,
) -> None:
    # mL/min (a clearance) and mL/min/{1.73_m2} (normalised to body surface area) are
    # different quantities: no conversion without the patient's surface area
    patients = {
        "normalised": [patient(), observation("62238-1", "2025-10-01", 20, "mL/min/{1.73_m2}")],
        "spelt_so": [patient(), observation("62238-1", "2025-10-01", 20, "mL/min/1.73m2")],
        "absolute": [patient(), observation("62238-1", "2025-10-01", 20, "mL/min")],
        "absolute_later": [
            patient(),
            observation("62238-1", "2025-06-01", 50, "mL/min/{1.73_m2}"),
            observation("62238-1", "2025-10-01", 20, "mL/min"),
        ],
        "two_absolute": [
            patient(),
            observation("62238-1", "2025-09-01", 25, "mL/min"),
            observation("62238-1", "2025-10-01", 20, "mL/min"),
        ],
        "no_unit": [patient(), observation("62238-1", "2025-10-01", 20, None)],
        "after_t": [patient(), observation("62238-1", "2026-06-01", 20, "mL/min")],
        "none": [patient()],
    }
    q = parse_question({"inclusion": [EGFR, {"type": "age", "min": 18}]})
    results = engine.evaluate(q, population(**patients), AT)
    assert {p: r.steps[0] for p, r in results.items()} == {
        "normalised": True,
        "spelt_so": True,
        "absolute": None,
        "absolute_later": False,
        "two_absolute": None,
        "no_unit": None,
        "after_t": None,
        "none": None,
    }
    assert {p: r.unconvertible for p, r in results.items()} == {
        "normalised": (0, 0),
        "spelt_so": (0, 0),
        "absolute": (1, 0),
        "absolute_later": (1, 0),
        "two_absolute": (2, 0),
        "no_unit": (1, 0),
        "after_t": (0, 0),
        "none": (0, 0),
    }


def test_unconvertible_results_are_counted_once_per_step_wherever_they_are_read(
    engine: Any,
) -> None:
    # one result read by two criteria of a step (one under not, one windowed) counts once;
    # a component in a unit that does not convert counts; a step without unit tests counts 0
    systolic = {
        "type": "observation",
        "codes": [{"concept": "bp_panel"}],
        "component": [{"concept": "systolic_bp"}],
        "value": {"ge": 140, "unit": "mm[Hg]"},
    }
    question = {
        "inclusion": [
            {
                "any_of": [
                    EGFR,
                    {"type": "not", "criterion": {**EGFR, "window": {"days_before": 365}}},
                ]
            },
            {"any_of": [systolic, {"type": "sex", "values": ["female"]}]},
        ],
        "exclusion": [{"type": "age", "max": 17}],
    }
    pop = population(
        p=[
            patient(),
            observation("62238-1", "2025-10-01", 20, "mL/min"),
            observation("62238-1", "2023-10-01", 20, "mL/min"),
            observation(
                "85354-9",
                "2025-10-01",
                components=[component("8480-6", 150, "mL"), component("8462-4", 90, "mm[Hg]")],
            ),
        ]
    )
    q = parse_question(question)
    assert engine.evaluate(q, pop, AT)["p"].unconvertible == (2, 1, 0)


def test_select_any_min_max(engine: Any) -> None:
    readings = [
        patient(),
        observation("39156-5", "2025-01-01", 41, "kg/m2"),
        observation("39156-5", "2025-06-01", 29, "kg/m2"),
        observation("39156-5", "2025-11-01", 33, "kg/m2"),
    ]
    base = {"type": "observation", "codes": [{"concept": "bmi"}]}
    assert run(engine, {**base, "value": {"gt": 40, "unit": "kg/m2"}}, {"p": readings}) == {
        "p": False
    }
    assert run(
        engine, {**base, "value": {"gt": 40, "unit": "kg/m2"}, "select": "any"}, {"p": readings}
    ) == {"p": True}
    assert run(
        engine, {**base, "value": {"lt": 30, "unit": "kg/m2"}, "select": "min"}, {"p": readings}
    ) == {"p": True}
    assert run(
        engine,
        {**base, "value": {"ge": 30, "le": 40, "unit": "kg/m2"}, "select": "max"},
        {"p": readings},
    ) == {"p": False}
    assert run(
        engine,
        {**base, "value": {"gt": 30, "unit": "kg/m2"}, "select": "any", "min_count": 2},
        {"p": readings},
    ) == {"p": True}


def test_components_systolic_blood_pressure_in_kpa(engine: Any) -> None:
    crit = {
        "type": "observation",
        "codes": [{"concept": "bp_panel"}],
        "component": [{"concept": "systolic_bp"}],
        "value": {"ge": 140, "unit": "mm[Hg]"},
    }
    patients = {
        "hyper": [
            patient(),
            observation(
                "85354-9",
                "2025-11-01",
                components=[component("8480-6", 152, "mm[Hg]"), component("8462-4", 95, "mm[Hg]")],
            ),
        ],
        "normal": [
            patient(),
            observation(
                "85354-9",
                "2025-11-01",
                components=[component("8480-6", 128, "mm[Hg]"), component("8462-4", 95, "mm[Hg]")],
            ),
        ],
        "kpa": [
            patient(),
            observation("85354-9", "2025-11-01", components=[component("8480-6", 19.0, "kPa")]),
        ],  # 142.5 mmHg
        "diastolic_only": [
            patient(),
            observation("85354-9", "2025-11-01", components=[component("8462-4", 95, "mm[Hg]")]),
        ],
    }
    assert run(engine, crit, patients) == {
        "hyper": True,
        "normal": False,
        "kpa": True,
        "diastolic_only": None,
    }


def test_interpretation_and_existence(engine: Any) -> None:
    patients = {
        "high": [
            patient(),
            observation("62238-1", "2025-11-01", 25, "mL/min/{1.73_m2}", interpretation=["L"]),
        ],
        "no_flag": [patient(), observation("62238-1", "2025-11-01", 25, "mL/min/{1.73_m2}")],
        "none": [patient()],
    }
    low = {"type": "observation", "codes": [{"concept": "egfr"}], "interpretation": ["L", "LL"]}
    assert run(engine, low, patients) == {"high": True, "no_flag": None, "none": None}
    exists = {"type": "observation", "codes": [{"concept": "egfr"}]}
    assert run(engine, exists, patients) == {"high": True, "no_flag": True, "none": False}


# --------------------------------------------------------------------------- oncology


def test_cancer_stage_prefix_and_latest(engine: Any) -> None:
    def stage(code: str, when: str) -> dict[str, Any]:
        return observation("21908-9", when, value_codes=[(AJCC, code)])

    patients = {
        "iiib": [patient(), stage("IIIB", "2025-01-01")],
        "progressed": [patient(), stage("II", "2024-01-01"), stage("IV", "2025-06-01")],
        "ii": [patient(), stage("II", "2025-01-01")],
        "unstaged": [patient()],
    }
    crit = {"type": "cancer_stage", "stages": ["III", "IV"]}
    assert run(engine, crit, patients) == {
        "iiib": True,
        "progressed": True,
        "ii": False,
        "unstaged": None,
    }


def test_molecular_markers(engine: Any) -> None:
    patients = {
        "egfr_pos": [
            patient(),
            observation("21665-5", "2025-01-01", value_codes=[(LOINC, "LA9633-4")]),
        ],
        "egfr_neg": [
            patient(),
            observation("21665-5", "2025-01-01", value_codes=[(LOINC, "LA9634-2")]),
        ],
        "kras_only": [
            patient(),
            observation("21702-6", "2025-01-01", value_codes=[(LOINC, "LA9633-4")]),
        ],
        "her2_pos": [
            patient(),
            observation("48676-1", "2025-01-01", value_codes=[(LOINC, "LA6576-8")]),
        ],
    }
    egfr = {"type": "molecular_marker", "marker": "EGFR", "status": "detected"}
    assert run(engine, egfr, patients) == {
        "egfr_pos": True,
        "egfr_neg": False,
        "kras_only": None,
        "her2_pos": None,
    }
    her2 = {"type": "molecular_marker", "marker": "HER2", "status": "positive"}
    assert run(engine, her2, patients)["her2_pos"] is True


# --------------------------------------------------------------------------- medicines etc.


def test_medication_status_and_window(engine: Any) -> None:
    patients = {
        "active": [patient(), medication("109081006", "2025-09-01")],
        "cancelled": [patient(), medication("109081006", "2025-09-01", status="cancelled")],
        "old": [patient(), medication("109081006", "2020-01-01")],
        "snomed_coded": [patient(), medication("109081006", "2025-09-01", system=SNOMED)],
    }
    crit = {
        "type": "medication",
        "codes": [{"system": "dmd", "code": "109081006"}],
        "window": {"days_before": 365},
    }
    assert run(engine, crit, patients) == {
        "active": True,
        "cancelled": False,
        "old": False,
        "snomed_coded": True,
    }


def test_procedure_opcs_prefix_and_not_done(engine: Any) -> None:
    patients = {
        "hip": [patient(), procedure("W37.1")],
        "not_done": [patient(), procedure("W37.1", status="not-done")],
        "knee": [patient(), procedure("W40.1")],
    }
    crit = {"type": "procedure", "codes": [{"system": "opcs4", "prefix": "W37"}]}
    assert run(engine, crit, patients) == {"hip": True, "not_done": False, "knee": False}


def test_device_by_type_manufacturer_model(engine: Any) -> None:
    patients = {
        "ax2": [patient(), device()],
        "exeter": [patient(), device(manufacturer="Stryker", model="Exeter V40")],
        "knee": [
            patient(),
            device(type_code="304121006", manufacturer="Zimmer Biomet", model="NexGen LPS"),
        ],
    }
    hip = {"type": "device", "device_types": [{"system": "snomed", "code": "304120007"}]}
    assert run(engine, hip, patients) == {"ax2": True, "exeter": True, "knee": False}
    model = {"type": "device", "model": ["acetabulon x2"]}
    assert run(engine, model, patients) == {"ax2": True, "exeter": False, "knee": False}


# --------------------------------------------------------------------------- demographics


def test_age_at_index_birthday_edges(engine: Any) -> None:
    at = datetime(2026, 3, 10, 12, tzinfo=UTC)
    patients = {
        "turns_18_today": [patient(birth="2008-03-10")],
        "turns_18_tomorrow": [patient(birth="2008-03-11")],
        "leap_day": [patient(birth="2008-02-29")],
        "no_birth": [patient(birth=None)],
        "eighty": [patient(birth="1946-01-01")],
        "eighty_one": [patient(birth="1945-03-10")],
    }
    got = run(engine, {"type": "age", "min": 18, "max": 80}, patients, at=at)
    assert got == {
        "turns_18_today": True,
        "turns_18_tomorrow": False,
        "leap_day": True,
        "no_birth": None,
        "eighty": True,
        "eighty_one": False,
    }


def test_sex_site_region_unknowns(engine: Any) -> None:
    patients = {
        "f": [patient(sex="female", site="RA1", region="London")],
        "m": [patient(sex="male", site="RB2", region="Wales")],
        "u": [patient(sex="unknown", site=None, region="Unknown")],
    }
    assert run(engine, {"type": "sex", "values": ["female"]}, patients) == {
        "f": True,
        "m": False,
        "u": None,
    }
    assert run(engine, {"type": "site", "sites": ["RA1"]}, patients) == {
        "f": True,
        "m": False,
        "u": None,
    }
    assert run(engine, {"type": "region", "regions": ["Wales"]}, patients) == {
        "f": False,
        "m": True,
        "u": None,
    }


# --------------------------------------------------------------------------- logic, funnel


def test_kleene_logic(engine: Any) -> None:
    known_true = {"type": "sex", "values": ["female"]}
    unknown = {
        "type": "observation",
        "codes": [{"concept": "hba1c"}],
        "value": {"ge": 1, "unit": "%"},
    }
    false = {"type": "sex", "values": ["male"]}
    patients = {"p": [patient(sex="female")]}
    cases = [
        ({"type": "all_of", "criteria": [known_true, unknown]}, None),
        ({"type": "all_of", "criteria": [false, unknown]}, False),
        ({"type": "any_of", "criteria": [known_true, unknown]}, True),
        ({"type": "any_of", "criteria": [false, unknown]}, None),
        ({"type": "not", "criterion": unknown}, None),
        ({"type": "not", "criterion": false}, True),
    ]
    for crit, expected in cases:
        assert run(engine, crit, patients) == {"p": expected}, crit


def test_population_excludes_deceased_and_patients_without_demographics(engine: Any) -> None:
    q = parse_question({"inclusion": [{"type": "sex", "values": ["female", "male"]}]})
    pop = population(
        alive=[patient()],
        dead=[patient(deceased=True)],
        died_later=[patient(deceased=True, deceased_date="2026-06-01")],
        died_before=[patient(deceased=True, deceased_date="2025-06-01")],
        no_patient=[condition(ICD10, "I10")],
    )
    results = engine.evaluate(q, pop, AT)
    assert {p for p, r in results.items() if r.in_population} == {"alive", "died_later"}


def test_population_at_an_index_date_excludes_patients_born_after_it(engine: Any) -> None:
    """Seen on third-party data: patients born after the index date were in the population at
    that date (and in its funnel). The patient view's rule: born by the index instant's day."""
    q = parse_question(
        {"index_date": "2020-06-30", "inclusion": [{"type": "sex", "values": ["female"]}]}
    )
    pop = population(
        before=[patient(birth="1990-01-01")],
        on_the_day=[patient(birth="2020-06-30")],
        day_after=[patient(birth="2020-07-01")],
        years_after=[patient(birth="2023-05-05", site="RB2")],
        unknown_birth=[patient(birth=None)],
    )
    results = engine.evaluate(q, pop, AT)
    assert {p for p, r in results.items() if r.in_population} == {
        "before",
        "on_the_day",
        "unknown_birth",
    }
    assert cohort(q, results) == {"before", "on_the_day", "unknown_birth"}
    # at today's date (no index date) they are born, so they are in it
    today = parse_question({"inclusion": [{"type": "sex", "values": ["female"]}]})
    assert {p for p, r in engine.evaluate(today, pop, AT).items() if r.in_population} == set(pop)


def test_funnel_and_cohort_with_exclusion_unknowns(engine: Any) -> None:
    question = {
        "inclusion": [
            {"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]},
            {"type": "age", "min": 18},
        ],
        "exclusion": [
            {
                "type": "observation",
                "codes": [{"concept": "egfr"}],
                "value": {"lt": 30, "unit": "mL/min/{1.73_m2}"},
            },
        ],
    }
    pop = population(
        eligible=[
            patient(),
            condition(ICD10, "E11.9"),
            observation("62238-1", "2025-10-01", 55, "mL/min/{1.73_m2}"),
        ],
        excluded=[
            patient(),
            condition(ICD10, "E11.9"),
            observation("62238-1", "2025-10-01", 20, "mL/min/{1.73_m2}"),
        ],
        no_egfr=[patient(), condition(ICD10, "E11.9")],
        child=[patient(birth="2015-01-01"), condition(ICD10, "E11.9")],
        no_dx=[patient()],
        no_birth=[patient(birth=None), condition(ICD10, "E11.9")],
    )
    q = parse_question(question)
    results = engine.evaluate(q, pop, AT)
    assert cohort(q, results) == {"eligible", "no_egfr"}
    steps = funnel(q, results)
    assert [
        (s.kind, len(s.entered), len(s.passed), len(s.failed), len(s.unknown), len(s.remaining))
        for s in steps
    ] == [
        ("population", 6, 6, 0, 0, 6),
        ("inclusion", 6, 5, 1, 0, 5),
        ("inclusion", 5, 3, 1, 1, 3),
        ("exclusion", 3, 1, 1, 1, 2),
    ]
    strict = parse_question({**question, "exclusion_unknown": "exclude"})
    assert cohort(strict, engine.evaluate(strict, pop, AT)) == {"eligible"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"inclusion": []}, "at least 1"),
        ({"inclusion": [{"type": "age"}]}, "min and/or max"),
        (
            {"inclusion": [{"type": "condition", "codes": [{"system": "snomed", "prefix": "4"}]}]},
            "ICD-10 and OPCS-4",
        ),
        (
            {"inclusion": [{"type": "condition", "codes": [{"system": "nope", "code": "1"}]}]},
            "unknown code system",
        ),
        (
            {
                "inclusion": [
                    {
                        "type": "observation",
                        "codes": [{"concept": "hba1c"}],
                        "window": {"start": 0, "end": -5},
                    }
                ]
            },
            "after its end",
        ),
        (
            {
                "inclusion": [
                    {
                        "type": "medication",
                        "codes": [{"system": "dmd", "code": "1"}],
                        "window": {"anchor": "dx"},
                    }
                ]
            },
            "names no criterion",
        ),
        (
            {"inclusion": [{"type": "molecular_marker", "marker": "EGFR", "status": "positive"}]},
            "detected",
        ),
        (
            {
                "inclusion": [
                    {"type": "condition", "codes": [{"system": "icd10", "range": "E1-E14"}]}
                ]
            },
            "equal length",
        ),
        (
            {"inclusion": [{**HBA1C, "value": {"ge": 58, "unit": "mmol/mool"}}]},
            "unknown unit atom 'mool'",
        ),
        (
            {"inclusion": [{**HBA1C, "value": {"ge": 58, "unit": "kg"}}]},
            "'kg' .*hba1c",
        ),
        ({"inclusion": [{**EGFR, "value": {"lt": 30, "unit": "mL/min"}}]}, "'mL/min'"),
    ],
)
def test_malformed_criteria_have_clear_errors(bad: dict[str, Any], message: str) -> None:
    from feasibility.criteria import CriteriaError

    with pytest.raises(CriteriaError, match=message):
        parse_question(bad)


def test_a_bad_unit_is_rejected_at_its_place_in_the_question() -> None:
    from feasibility.criteria import CriteriaError

    body = {
        "inclusion": [
            {"type": "age", "min": 18},
            {"any_of": [{"type": "sex", "values": ["male"]}, {**HBA1C, "value": {"ge": 7}}]},
        ],
        "exclusion": [
            {"all_of": [{"type": "age", "min": 80}, {**EGFR, "value": {"lt": 30, "unit": "kg"}}]},
            {**HBA1C, "value": {"ge": 58, "unit": "mmol/mool"}},
        ],
    }
    with pytest.raises(CriteriaError) as caught:
        parse_question(body)
    assert [e["pointer"] for e in caught.value.errors] == [
        "/exclusion/0/all_of/1/value/unit",
        "/exclusion/1/value/unit",
    ]


@pytest.mark.parametrize("unit", ["mmol/mol", "%", "mol/mol", "1", "%{HbA1c}"])
def test_units_of_the_right_kind_are_accepted(unit: str) -> None:
    parse_question({"inclusion": [{**HBA1C, "value": {"ge": 7, "unit": unit}}]})


def test_codes_whose_unit_is_not_known_are_checked_for_spelling_only() -> None:
    from feasibility.criteria import CriteriaError

    local = {"type": "observation", "codes": [{"system": "loinc", "code": "1234-5"}]}
    parse_question({"inclusion": [{**local, "value": {"ge": 1, "unit": "kg"}}]})
    with pytest.raises(CriteriaError, match="unknown unit atom 'furlongs'"):
        parse_question({"inclusion": [{**local, "value": {"ge": 1, "unit": "furlongs"}}]})
