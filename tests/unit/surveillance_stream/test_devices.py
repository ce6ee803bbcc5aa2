"""Device exposures, outcomes and per-patient contributions from hand-built patient state."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from surveillance_stream.devices import (
    DEFAULT_OUTCOMES,
    EXPOSED,
    ICD10,
    OPCS4,
    SNOMED,
    Contribution,
    Counters,
    DeviceClass,
    OutcomeDefinition,
    PersonTime,
    code,
    contribution,
    device_classes_from_json,
    diff,
    exposures,
    node_path,
    outcome_definitions_from_json,
    outcomes,
    parse_node,
    period_matches,
    quarter,
)

SRC = "urn:t"
PATIENT = "pat-1"
HIP, KNEE, PACEMAKER, PUMP = "304120007", "304121006", "14106009", "69805005"
T0 = datetime(2023, 2, 10, 9, 0, tzinfo=UTC)
MODEL = "hip/Orthomedica/Acetabulon X2"

Entries = dict[str, dict[str, Any]]


def key(rtype: str, rid: str) -> str:
    return f"{SRC}|{rtype}|{rid}"


def dev(rid: str) -> str:
    return key("Device", rid)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def entry(
    rtype: str, rid: str, *facts: dict[str, Any], seq: int = 1, retracted: bool = False
) -> tuple[str, dict[str, Any]]:
    return key(rtype, rid), {
        "seq": seq,
        "retracted": retracted,
        "facts": [] if retracted else list(facts),
        "provenance": {
            "source": SRC,
            "resource_type": rtype,
            "resource_id": rid,
            "version": f"v{seq}",
            "last_updated": None,
            "fhir_version": "R4",
        },
    }


def coding(system: str, value: str) -> dict[str, str]:
    return {"system": system, "code": value}


def description(
    rid: str,
    type_code: str | None = HIP,
    manufacturer: str | None = "Orthomedica",
    model: str | None = "Acetabulon X2",
    lot: str | None = "AC231234",
    udi: str | None = "05000000000001",
) -> dict[str, Any]:
    return {
        "device": dev(rid),
        "type_codes": [coding(SNOMED, type_code)] if type_code else [],
        "manufacturer": manufacturer,
        "model": model,
        "lot": lot,
        "udi": udi,
    }


def device_fact(
    rid: str,
    *,
    source: str = "device",
    start: datetime | None = None,
    end: datetime | None = None,
    status: str = "active",
    **desc: Any,
) -> dict[str, Any]:
    return {
        "kind": "device_exposure",
        "device": description(rid, **desc),
        "status": status,
        "start": iso(start),
        "end": iso(end),
        "source": source,
    }


def procedure_fact(
    codes: list[tuple[str, str]],
    performed: datetime | None,
    devices: tuple[str, ...] = (),
    status: str = "completed",
) -> dict[str, Any]:
    return {
        "kind": "procedure",
        "codes": [coding(s, c) for s, c in codes],
        "status": status,
        "performed": iso(performed),
        "performed_end": None,
        "devices": [dev(d) for d in devices],
    }


def condition_fact(
    icd10: str,
    onset: datetime | None,
    recorded: datetime | None = None,
    verification: str = "confirmed",
) -> dict[str, Any]:
    return {
        "kind": "condition",
        "codes": [coding(ICD10, icd10)],
        "onset": iso(onset),
        "abatement": None,
        "recorded": iso(recorded),
        "clinical_status": "active",
        "verification_status": verification,
        "stage": [],
    }


def ae_fact(
    icd10: str, when: datetime | None, devices: tuple[str, ...] = (), actuality: str = "actual"
) -> dict[str, Any]:
    return {
        "kind": "adverse_event",
        "codes": [coding(ICD10, icd10)],
        "actuality": actuality,
        "date": iso(when),
        "seriousness": [],
        "suspect_devices": [description(d) for d in devices],
        "suspect_medications": [],
    }


def patient_fact(site: str | None = "RA1", region: str = "London") -> dict[str, Any]:
    return {
        "kind": "patient",
        "site": site,
        "region": region,
        "sex": "female",
        "birth_date": "1950-06-15",
    }


#: the stratum of the patient above's implants in 2023: age band at implant, sex, region
STRATUM = "65-74|female|London"


IMPLANT_HIP = [(OPCS4, "W37.1"), (SNOMED, "52734007")]
REVISE_HIP = [(OPCS4, "W37.3"), (SNOMED, "179344006")]
PUMP_CODES = [(OPCS4, "X50.9"), (SNOMED, "225286007")]


def implanted_hip(rid: str = "d1", at: datetime = T0, **desc: Any) -> Entries:
    """A hip implant as the synthetic generator writes it: Device, implant Procedure, DUS."""
    return dict(
        [
            entry("Device", rid, device_fact(rid, **desc)),
            entry("Procedure", f"imp-{rid}", procedure_fact(IMPLANT_HIP, at, (rid,))),
            entry(
                "DeviceUseStatement",
                f"dus-{rid}",
                device_fact(rid, source="use_statement", start=at + timedelta(minutes=30), **desc),
            ),
        ]
    )


def state(*parts: Entries | tuple[str, dict[str, Any]]) -> Entries:
    out: Entries = dict([entry("Patient", "p1", patient_fact())])
    for part in parts:
        if isinstance(part, tuple):
            out[part[0]] = part[1]
        else:
            out.update(part)
    return out


# --------------------------------------------------------------------------- exposures


def test_one_exposure_merged_from_device_use_statement_and_implant_procedure() -> None:
    entries = state(implanted_hip())
    (exposure,) = exposures(PATIENT, entries)
    assert exposure.device == dev("d1")
    assert exposure.device_class == "hip"
    assert (exposure.manufacturer, exposure.model, exposure.lot, exposure.udi) == (
        "Orthomedica",
        "Acetabulon X2",
        "AC231234",
        "05000000000001",
    )
    assert exposure.start == T0  # the implant procedure, before the use statement's time
    assert exposure.end is None
    assert (exposure.site, exposure.region, exposure.period) == ("RA1", "London", "2023Q1")
    assert [s.resource for s in exposure.sources] == sorted(
        [key("Device", "d1"), key("DeviceUseStatement", "dus-d1"), key("Patient", "p1"),
         key("Procedure", "imp-d1")]
    )  # fmt: skip
    assert {s.version for s in exposure.sources} == {"v1"}


def test_device_resource_values_win_and_gaps_are_filled_from_use_statements() -> None:
    entries = state(
        entry("Device", "d1", device_fact("d1", lot="FROM-DEVICE", udi=None)),
        entry(
            "DeviceUseStatement",
            "u1",
            device_fact("d1", source="use_statement", start=T0, lot="FROM-DUS", udi="UDI-DUS"),
        ),
    )
    (exposure,) = exposures(PATIENT, entries)
    assert exposure.lot == "FROM-DEVICE"
    assert exposure.udi == "UDI-DUS"
    assert exposure.start == T0


@pytest.mark.parametrize(
    ("type_code", "expected"),
    [(HIP, "hip"), (KNEE, "knee"), (PACEMAKER, "pacemaker"), (PUMP, "insulin_pump"),
     ("123456789", "other")],
)  # fmt: skip
def test_class_comes_from_the_type_code_table(type_code: str, expected: str) -> None:
    entries = state(entry("Device", "d1", device_fact("d1", type_code=type_code)))
    assert exposures(PATIENT, entries)[0].device_class == expected


def test_the_device_resource_type_wins_over_a_use_statement_type() -> None:
    entries = state(
        entry("Device", "d1", device_fact("d1", type_code=KNEE)),
        entry("DeviceUseStatement", "u", device_fact("d1", source="use_statement", start=T0)),
    )
    assert exposures(PATIENT, entries)[0].device_class == "knee"


def test_the_class_table_is_configurable() -> None:
    stent = DeviceClass("stent", frozenset({code(SNOMED, "65818007")}))
    entries = state(entry("Device", "d1", device_fact("d1", type_code="65818007")))
    assert exposures(PATIENT, entries, classes=(stent,))[0].device_class == "stent"
    assert exposures(PATIENT, entries)[0].device_class == "other"
    loaded = device_classes_from_json(
        [{"name": "stent", "type_codes": [f"{SNOMED}|65818007"], "implant_codes": []}]
    )
    assert loaded == (stent,)


def test_a_device_known_only_from_a_procedure_gets_its_class_from_the_procedure_code() -> None:
    entries = state(entry("Procedure", "imp", procedure_fact(IMPLANT_HIP, T0, ("d9",))))
    (exposure,) = exposures(PATIENT, entries)
    assert exposure.device_class == "hip"
    assert exposure.start == T0
    assert exposure.nodes()[-1] == ("lot", "hip/unknown/unknown/unknown")


def test_hierarchy_nodes_and_paths() -> None:
    (exposure,) = exposures(PATIENT, state(implanted_hip(manufacturer="A/B", lot=None)))
    assert exposure.nodes() == (
        ("class", "hip"),
        ("manufacturer", "hip/A%2FB"),
        ("model", "hip/A%2FB/Acetabulon X2"),
        ("lot", "hip/A%2FB/Acetabulon X2/unknown"),
    )
    assert parse_node("hip/A%2FB/Acetabulon X2") == ("model", ("hip", "A/B", "Acetabulon X2"))
    assert node_path("knee", None) == "knee/unknown"
    with pytest.raises(ValueError, match="1 to 4"):
        parse_node("a/b/c/d/e")


def test_the_first_revision_after_implant_ends_the_exposure() -> None:
    revised = T0 + timedelta(days=200)
    entries = state(
        implanted_hip(),
        entry("Procedure", "rev", procedure_fact(REVISE_HIP, revised, ("d1",))),
        entry(
            "Procedure", "rev-late", procedure_fact(REVISE_HIP, revised + timedelta(100), ("d1",))
        ),
        # a revision recorded before the implant cannot end it
        entry("Procedure", "rev-early", procedure_fact(REVISE_HIP, T0 - timedelta(5), ("d1",))),
    )
    (exposure,) = exposures(PATIENT, entries)
    assert (exposure.start, exposure.end) == (T0, revised)


def test_an_insulin_pump_replacement_with_the_initiation_codes_ends_the_exposure() -> None:
    # The generator's use statement can be timed before the implant procedure on the same day;
    # the implant procedure (same codes as a replacement) must not end the exposure.
    recorded = T0 - timedelta(hours=3)
    base = state(
        entry("Device", "p", device_fact("p", type_code=PUMP, model="t:slim X2")),
        entry("DeviceUseStatement", "u", device_fact("p", source="use_statement", start=recorded)),
        entry("Procedure", "init", procedure_fact(PUMP_CODES, T0, ("p",))),
    )
    (exposure,) = exposures(PATIENT, base)
    assert (exposure.start, exposure.end) == (recorded, None)
    replaced = T0 + timedelta(days=90)
    later = {
        **base,
        **dict([entry("Procedure", "repl", procedure_fact(PUMP_CODES, replaced, ("p",)))]),
    }
    (exposure,) = exposures(PATIENT, later)
    assert (exposure.start, exposure.end) == (recorded, replaced)


def test_a_use_statement_end_ends_the_exposure() -> None:
    end = T0 + timedelta(days=30)
    entries = state(
        entry(
            "DeviceUseStatement", "u", device_fact("d1", source="use_statement", start=T0, end=end)
        )
    )
    assert exposures(PATIENT, entries)[0].end == end


def test_retracted_and_not_happened_resources_contribute_nothing() -> None:
    retracted = state(
        entry("Device", "d1", seq=2, retracted=True),
        entry("Procedure", "imp-d1", seq=2, retracted=True),
        entry("DeviceUseStatement", "dus-d1", seq=3, retracted=True),
    )
    assert exposures(PATIENT, retracted) == []
    assert contribution(PATIENT, retracted) == Contribution(PATIENT)
    intended = state(
        entry(
            "DeviceUseStatement", "u", device_fact("d1", source="use_statement", status="intended")
        ),
        entry("Procedure", "x", procedure_fact(IMPLANT_HIP, T0, ("d1",), status="not-done")),
    )
    assert exposures(PATIENT, intended) == []


def test_as_of_leaves_out_what_was_not_known_yet() -> None:
    revised = T0 + timedelta(days=100)
    entries = state(
        implanted_hip(),
        entry("Procedure", "rev", procedure_fact(REVISE_HIP, revised, ("d1",))),
        entry("AdverseEvent", "ae", ae_fact("T84.0", revised - timedelta(days=1), ("d1",))),
    )
    assert exposures(PATIENT, entries, as_of=T0.date() - timedelta(days=1)) == []
    (open_exposure,) = exposures(PATIENT, entries, as_of=T0.date() + timedelta(days=50))
    assert open_exposure.end is None
    assert outcomes(PATIENT, entries, [open_exposure], as_of=T0.date() + timedelta(days=50)) == []
    (closed,) = exposures(PATIENT, entries, as_of=revised)
    assert closed.end == revised
    names = {o.name for o in outcomes(PATIENT, entries, [closed], as_of=revised)}
    assert names == {"adverse event", "joint mechanical complication", "hip revision within 1 year"}


# --------------------------------------------------------------------------- outcomes


def test_outcomes_naming_a_device_go_to_that_device_only() -> None:
    second = T0 + timedelta(days=10)
    entries = state(
        implanted_hip("d1"),
        implanted_hip("d2", at=second, model="TriFit CF"),
        entry("AdverseEvent", "ae", ae_fact("T84.0", T0 + timedelta(days=40), ("d2",))),
        entry("Procedure", "rev", procedure_fact(REVISE_HIP, T0 + timedelta(days=60), ("d1",))),
    )
    found = exposures(PATIENT, entries)
    got = {(o.name, o.device, o.attribution) for o in outcomes(PATIENT, entries, found)}
    assert got == {
        ("adverse event", dev("d2"), "device"),
        ("joint mechanical complication", dev("d2"), "device"),
        ("hip revision within 1 year", dev("d1"), "device"),
    }


def test_conditions_go_to_every_exposure_of_the_class_whose_window_holds_them() -> None:
    late = T0 + timedelta(days=400)
    entries = state(
        implanted_hip("d1"),
        implanted_hip("d2", at=late),
        entry("Device", "pm", device_fact("pm", type_code=PACEMAKER)),
        entry("Procedure", "pm-imp", procedure_fact([(OPCS4, "K60.1")], T0, ("pm",))),
        entry("Condition", "early", condition_fact("T84.5", T0 + timedelta(days=100))),
        entry("Condition", "both", condition_fact("T84.5", late + timedelta(days=10))),
    )
    found = exposures(PATIENT, entries)
    got = sorted((o.device, o.source.resource_id) for o in outcomes(PATIENT, entries, found))
    assert got == [(dev("d1"), "both"), (dev("d1"), "early"), (dev("d2"), "both")]
    assert {o.attribution for o in outcomes(PATIENT, entries, found)} == {"window"}


REVISION_1Y = next(d for d in DEFAULT_OUTCOMES if d.name == "hip revision within 1 year")


@pytest.mark.parametrize(
    ("offset", "counted"),
    [
        (timedelta(0), False),  # the implant instant itself is not after the implant
        (timedelta(seconds=1), True),
        (timedelta(days=365), True),  # the window's end is inside
        (timedelta(days=365, seconds=1), False),
        (-timedelta(days=1), False),
    ],
)
def test_window_edges(offset: timedelta, counted: bool) -> None:
    entries = state(
        implanted_hip(), entry("Procedure", "rev", procedure_fact(REVISE_HIP, T0 + offset, ("d1",)))
    )
    found = outcomes(PATIENT, entries, exposures(PATIENT, entries), [REVISION_1Y])
    assert bool(found) is counted


def test_a_condition_after_the_exposure_ended_is_not_attributed_by_window() -> None:
    revised = T0 + timedelta(days=30)
    infection = OutcomeDefinition("infection", {(ICD10, "T84.5")}, window_days=365)
    entries = state(
        implanted_hip(),
        entry("Procedure", "rev", procedure_fact(REVISE_HIP, revised, ("d1",))),
    )
    at_end = {**entries, **dict([entry("Condition", "c", condition_fact("T84.5", revised))])}
    after = {
        **entries,
        **dict([entry("Condition", "c", condition_fact("T84.5", revised + timedelta(1)))]),
    }
    assert len(outcomes(PATIENT, at_end, exposures(PATIENT, at_end), [infection])) == 1
    assert outcomes(PATIENT, after, exposures(PATIENT, after), [infection]) == []


def test_outcomes_respect_classes_codes_and_statuses() -> None:
    pacemaker = (
        entry("Device", "pm", device_fact("pm", type_code=PACEMAKER, model="Azure XT DR")),
        entry("Procedure", "pm-imp", procedure_fact([(OPCS4, "K60.1")], T0, ("pm",))),
    )
    day = T0 + timedelta(days=20)
    entries = state(
        *pacemaker,
        entry(
            "Condition", "joint", condition_fact("T84.5", day)
        ),  # a joint code: not a pacemaker's
        entry("Condition", "lead", condition_fact("T821", day)),  # dotless code matches T82.1
        entry("Condition", "refuted", condition_fact("T82.7", day, verification="refuted")),
        entry("Condition", "recorded", condition_fact("T82.7", None, recorded=day)),
        entry("AdverseEvent", "potential", ae_fact("T82.1", day, ("pm",), actuality="potential")),
        entry("AdverseEvent", "no-device", ae_fact("T82.1", day)),
        entry("AdverseEvent", "stranger", ae_fact("T82.1", day, ("not-mine",))),
    )
    got = {
        (o.name, o.source.resource_id)
        for o in outcomes(PATIENT, entries, exposures(PATIENT, entries))
    }
    assert got == {("pacemaker lead failure", "lead"), ("device infection", "recorded")}


def test_outcome_definitions_validate_and_load_from_json() -> None:
    with pytest.raises(ValueError, match="only adverse-event"):
        OutcomeDefinition("anything", kinds={"condition"})
    with pytest.raises(ValueError, match="kinds"):
        OutcomeDefinition("x", {(ICD10, "T84.5")}, kinds={"observation"})
    with pytest.raises(ValueError, match="not 'exposed'"):
        OutcomeDefinition(EXPOSED, {(ICD10, "T84.5")})
    with pytest.raises(ValueError, match="system\\|code"):
        OutcomeDefinition("x", {"T84.5"})
    loaded = outcome_definitions_from_json(
        [{"name": "hip revision within 1 year", "codes": [f"{OPCS4}|W37.3", f"{SNOMED}|179344006"],
          "kinds": ["procedure"], "device_class": "hip", "window_days": 365}]
    )  # fmt: skip
    assert loaded == (REVISION_1Y,)
    assert REVISION_1Y.classes == frozenset({"hip"})
    assert code(ICD10, "t84.5") == code(ICD10, "T845") == (ICD10, "T845")


# --------------------------------------------------------------------------- contributions


def revised_hip_patient() -> Entries:
    return state(
        implanted_hip(),
        entry("AdverseEvent", "ae", ae_fact("T84.0", T0 + timedelta(days=50), ("d1",))),
        entry("Procedure", "rev", procedure_fact(REVISE_HIP, T0 + timedelta(days=60), ("d1",))),
    )


def test_contribution_keys_for_one_revised_hip() -> None:
    got = contribution(PATIENT, revised_hip_patient())
    nodes = [("class", "hip"), ("lot", f"{MODEL}/AC231234"), ("manufacturer", "hip/Orthomedica"),
             ("model", MODEL)]  # fmt: skip
    names = [
        "adverse event",
        EXPOSED,
        "hip revision within 1 year",
        "joint mechanical complication",
    ]
    assert got.keys == tuple(
        (level, node, name, "2023Q1", "RA1", STRATUM) for level, node in nodes for name in names
    )
    spent = PersonTime(closed_days=60)
    assert got.person_time == tuple(
        ((lv, node, "2023Q1", "RA1", STRATUM), spent) for lv, node in nodes
    )
    assert got.latest == (T0 + timedelta(days=60)).date().toordinal()


def test_two_exposures_in_one_node_count_twice_and_open_time_ages() -> None:
    entries = state(implanted_hip("d1"), implanted_hip("d2", at=T0 + timedelta(days=3)))
    got = contribution(PATIENT, entries)
    assert got.keys.count(("model", MODEL, EXPOSED, "2023Q1", "RA1", STRATUM)) == 2
    counters = Counters.rebuild([got])
    assert counters.count("model", MODEL, EXPOSED) == 2
    first = T0.date().toordinal()
    assert dict(got.person_time)[("model", MODEL, "2023Q1", "RA1", STRATUM)] == PersonTime(
        0, 2, 2 * first + 3
    )
    assert counters.person_days("model", MODEL, T0.date() + timedelta(days=10)) == 10 + 7


def test_contribution_is_canonical_and_round_trips_through_json() -> None:
    entries = revised_hip_patient()
    items = list(entries.items())
    random.Random(4).shuffle(items)
    first = contribution(PATIENT, entries)
    assert contribution(PATIENT, dict(items)) == first
    assert Contribution.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def test_diff_apply_and_rebuild_agree() -> None:
    before = contribution(PATIENT, state(implanted_hip()))
    after = contribution(PATIENT, revised_hip_patient())
    other = contribution("pat-2", state(implanted_hip(model="TriFit CF")))
    assert not diff(after, after)
    assert diff(None, before).counts == {k: 1 for k in before.keys}
    assert diff(before, None).counts == {k: -1 for k in before.keys}
    change = diff(before, after)
    assert set(change.counts.values()) == {1}  # the outcome keys appear; exposure keys stay
    assert all(k[2] != EXPOSED for k in change.counts)
    counters = Counters()
    counters.update(None, before)
    counters.update(None, other)
    counters.update(before, after)
    assert counters == Counters.rebuild([after, other])
    counters.update(after, None)
    assert counters == Counters.rebuild([other])
    with pytest.raises(ValueError, match="negative"):
        counters.apply(diff(after, None))  # removing what is not there
    with pytest.raises(ValueError, match="cannot diff"):
        diff(before, other)


def test_drill_down_from_a_count_to_patients_and_resource_versions() -> None:
    mine = contribution(PATIENT, revised_hip_patient())
    theirs = contribution("pat-2", state(implanted_hip()))
    counters = Counters.rebuild([mine, theirs])
    exposed = ("model", MODEL, EXPOSED, "2023Q1", "RA1", STRATUM)
    revision = ("model", MODEL, "hip revision within 1 year", "2023Q1", "RA1", STRATUM)
    assert counters.patients(exposed) == ("pat-1", "pat-2")
    assert counters.patients(revision) == ("pat-1",)
    assert counters.patients_of("model", MODEL, "hip revision within 1 year", "2023") == ("pat-1",)
    sources = {(s.resource_type, s.resource_id, s.version) for s in mine.sources_for(revision)}
    assert ("Procedure", "rev", "v1") in sources
    assert ("Device", "d1", "v1") in sources
    assert ("AdverseEvent", "ae", "v1") not in sources  # that fact is behind other outcomes


def test_counters_filter_by_period_and_site() -> None:
    a = contribution("a", state(implanted_hip()))
    b = contribution("b", state(implanted_hip(at=datetime(2024, 5, 1, tzinfo=UTC))))
    c_state = state(implanted_hip(at=datetime(2024, 8, 1, tzinfo=UTC)))
    c_state.update(dict([entry("Patient", "p1", patient_fact(site="RB2"))]))
    c = contribution("c", c_state)
    counters = Counters.rebuild([a, b, c])
    assert counters.count("class", "hip", EXPOSED) == 3
    assert counters.count("class", "hip", EXPOSED, "2024") == 2
    assert counters.count("class", "hip", EXPOSED, "2024Q2..") == 2
    assert counters.count("class", "hip", EXPOSED, "..2024Q2") == 2
    assert counters.count("class", "hip", EXPOSED, ["2023Q1", "2024Q3"]) == 2
    assert counters.count("class", "hip", EXPOSED, site="RB2") == 1
    assert counters.nodes("class") == [("class", "hip")]
    assert counters.outcome_names() == []
    assert counters.latest_day == date(2024, 8, 1)
    assert counters.person_days("class", "hip", date(2024, 8, 11)) == (
        (date(2024, 8, 11) - T0.date()).days + 102 + 10
    )


def test_periods() -> None:
    assert quarter(date(2023, 3, 31)) == "2023Q1" and quarter(None) == "unknown"
    assert period_matches(None, "unknown")
    assert period_matches("2023Q2..2023Q3", "2023Q3")
    assert not period_matches("2023Q2..", "unknown")
    assert not period_matches("2023", "2024Q1")


# --------------------------------------------------------------------------- outcomes from text


def text_finding_fact(
    problem: str, at: datetime, *codes: tuple[str, str], devices: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "kind": "text_finding",
        "from_text": True,
        "problem": problem,
        "codes": [coding(s, c) for s, c in codes],
        "date": iso(at),
        "element": "DocumentReference.content[0].attachment",
        "start": 10,
        "end": 19,
        "devices": [dev(d) for d in devices],
    }


def test_a_problem_read_from_text_is_a_candidate_outcome_counted_apart() -> None:
    note = entry(
        "DocumentReference",
        "note-1",
        text_finding_fact("LOOSENING", T0 + timedelta(days=200), (ICD10, "T84.0")),
    )
    entries = state(implanted_hip(), note)
    found = outcomes(PATIENT, entries, exposures(PATIENT, entries))
    assert [(o.name, o.kind, o.attribution) for o in found] == [
        ("joint mechanical complication (from text)", "text", "window")
    ]
    assert found[0].source.resource == key("DocumentReference", "note-1")
    names = {k[2] for k in contribution(PATIENT, entries).keys}
    assert "joint mechanical complication (from text)" in names
    assert "joint mechanical complication" not in names  # the coded outcome is not touched


def test_a_text_problem_matches_by_code_whatever_kind_the_definition_reads() -> None:
    # "revised" in a note stands for the hip revision procedure's code; the definition reads
    # procedures, and its class and window still apply (a knee code on a hip counts nothing)
    note = entry(
        "DocumentReference",
        "note-2",
        text_finding_fact("REVISION", T0 + timedelta(days=100), (OPCS4, "W37.3"), (OPCS4, "W40.3")),
    )
    late = entry(
        "DocumentReference",
        "note-3",
        text_finding_fact("REVISION", T0 + timedelta(days=500), (OPCS4, "W37.3")),
    )
    entries = state(implanted_hip(), note, late)
    names = [o.name for o in outcomes(PATIENT, entries, exposures(PATIENT, entries))]
    assert names == ["hip revision within 1 year (from text)"]
