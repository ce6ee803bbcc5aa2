"""Patient view specs: a patient's resource versions in, the patient view out.

This table is the definition of :mod:`core.patient_view` (the one fold every engine, the
snapshot, device counters and recruitment read). Each case lists envelopes (in arrival order;
replays and stale versions included) and what the view must say.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from core.codes import ICD10, OPCS4, SNOMED
from core.patient_view import PatientView, Source, build_view, view_of_envelopes

from .feasibility_helpers import condition, device, observation, patient, procedure

P = "pat"
NHS_OPCS4 = "https://fhir.nhs.uk/Id/opcs-4"


def env(
    rtype: str,
    rid: str,
    *facts: dict[str, Any],
    seq: int = 1,
    retracted: bool = False,
    updated: str | None = None,
) -> dict[str, Any]:
    return {
        "key": f"urn:t|{rtype}|{rid}",
        "patient": P,
        "seq": seq,
        "retracted": retracted,
        "facts": [] if retracted else list(facts),
        "provenance": {
            "source": "urn:t",
            "resource_type": rtype,
            "resource_id": rid,
            "version": f"v{seq}",
            "last_updated": updated,
        },
    }


def demographics(view: PatientView) -> dict[str, Any] | None:
    d = view.demographics
    if d is None:
        return None
    return {
        "site": d.site,
        "site_key": d.site_key,
        "region": d.region,
        "birth": d.birth_date,
        "sex": d.sex,
        "gp": d.gp_practice,
        "from": d.source.resource,
    }


def with_gp(fact: dict[str, Any], gp: str) -> dict[str, Any]:
    return {**fact, "gp_practice": gp, "general_practitioners": [f"urn:t|Practitioner|{gp}"]}


ORG = "urn:t|Organization|o1"

#: (case, envelopes in arrival order, expected demographics)
DEMOGRAPHICS: list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]] = [
    ("no Patient: no demographics", [env("Condition", "c", condition(ICD10, "I10"))], None),
    (
        "one Patient",
        [env("Patient", "a", with_gp(patient(site="RA1", region="London"), "G1"))],
        {
            "site": "RA1",
            "site_key": None,
            "region": "London",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": "G1",
            "from": "urn:t|Patient|a",
        },
    ),
    (
        "region Unknown is no region",
        [env("Patient", "a", patient(region="Unknown"))],
        {
            "site": "RA1",
            "site_key": None,
            "region": None,
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|a",
        },
    ),
    (
        "a legacy site holding an organisation key is a key, not an ODS code",
        [env("Patient", "a", patient(site=ORG))],
        {
            "site": None,
            "site_key": ORG,
            "region": "London",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|a",
        },
    ),
    (
        "a newer version replaces the older (stale and replayed versions change nothing)",
        [
            env("Patient", "a", patient(site="OLD"), seq=1),
            env("Patient", "a", patient(site="NEW"), seq=2),
            env("Patient", "a", patient(site="OLD"), seq=1),
            env("Patient", "a", patient(site="NEW"), seq=2),
        ],
        {
            "site": "NEW",
            "site_key": None,
            "region": "London",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|a",
        },
    ),
    (
        "two Patients: the latest last_updated sets site, region and GP (not the first key)",
        [
            env(
                "Patient",
                "a",
                with_gp(patient(site="RA1", region="London"), "G1"),
                updated="2025-01-01T00:00:00+00:00",
            ),
            env(
                "Patient",
                "b",
                with_gp(patient(site="RB2", region="North West"), "G2"),
                updated="2025-06-01T00:00:00+00:00",
            ),
        ],
        {
            "site": "RB2",
            "site_key": None,
            "region": "North West",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": "G2",
            "from": "urn:t|Patient|b",
        },
    ),
    (
        "two Patients: a dated version outranks an undated one",
        [
            env("Patient", "a", patient(site="RA1"), updated="2020-01-01T00:00:00+00:00"),
            env("Patient", "b", patient(site="RB2"), seq=5),
        ],
        {
            "site": "RA1",
            "site_key": None,
            "region": "London",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|a",
        },
    ),
    (
        "two undated Patients: the higher seq, then the greater key",
        [
            env("Patient", "b", patient(site="RB2"), seq=1),
            env("Patient", "a", patient(site="RA1"), seq=2),
            env("Patient", "c", patient(site="RC3"), seq=2),
        ],
        {
            "site": "RC3",
            "site_key": None,
            "region": "London",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|c",
        },
    ),
    (
        "the latest Patient deleted: the other one sets the site again",
        [
            env("Patient", "a", patient(site="RA1"), updated="2025-01-01T00:00:00+00:00"),
            env("Patient", "b", patient(site="RB2"), updated="2025-06-01T00:00:00+00:00"),
            env("Patient", "b", seq=2, retracted=True),
        ],
        {
            "site": "RA1",
            "site_key": None,
            "region": "London",
            "birth": date(1960, 6, 15),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|a",
        },
    ),
    (
        "the only Patient deleted: no demographics; an older version replayed stays deleted",
        [
            env("Patient", "a", patient(), seq=1),
            env("Patient", "a", seq=2, retracted=True),
            env("Patient", "a", patient(), seq=1),
        ],
        None,
    ),
    (
        "born after today is still the patient's birth date (the population decides)",
        [env("Patient", "a", patient(birth="2030-02-01"))],
        {
            "site": "RA1",
            "site_key": None,
            "region": "London",
            "birth": date(2030, 2, 1),
            "sex": "female",
            "gp": None,
            "from": "urn:t|Patient|a",
        },
    ),
]


@pytest.mark.parametrize(
    ("envelopes", "expected"),
    [pytest.param(e, x, id=case) for case, e, x in DEMOGRAPHICS],
)
def test_demographics(envelopes: list[dict[str, Any]], expected: dict[str, Any] | None) -> None:
    view = view_of_envelopes(P, envelopes)
    assert demographics(view) == expected
    # the same envelopes in reverse order give the same view
    assert view_of_envelopes(P, list(reversed(envelopes))) == view


AT = datetime(2026, 1, 1, 12, tzinfo=UTC)

#: (case, birth date, death, index instant, in the population)
POPULATION: list[tuple[str, str | None, str | None, datetime, bool]] = [
    ("born before", "1960-06-15", None, AT, True),
    ("born on the index day", "2026-01-01", None, AT, True),
    ("born the day after the index day", "2026-01-02", None, AT, False),
    (
        "born after an index date in the past",
        "2020-01-01",
        None,
        datetime(2019, 12, 31, tzinfo=UTC),
        False,
    ),
    ("no birth date is not excluded", None, None, AT, True),
    ("died before", "1960-06-15", "2025-01-01", AT, False),
    ("dies after", "1960-06-15", "2026-06-01", AT, True),
]


@pytest.mark.parametrize(
    ("birth", "death", "at", "expected"),
    [pytest.param(b, d, t, x, id=case) for case, b, d, t, x in POPULATION],
)
def test_population_at_an_instant(
    birth: str | None, death: str | None, at: datetime, expected: bool
) -> None:
    fact = patient(birth=birth, deceased=death is not None, deceased_date=death)
    view = view_of_envelopes(P, [env("Patient", "a", fact)])
    assert view.in_population(at.timestamp()) is expected


def test_without_a_patient_nobody_is_in_the_population() -> None:
    view = view_of_envelopes(P, [env("Condition", "c", condition(ICD10, "I10"))])
    assert view.in_population(AT.timestamp()) is False


def test_records_carry_normalised_tokens_dates_and_provenance() -> None:
    envelopes = [
        env("Condition", "c", condition(ICD10, "e11.9", onset=None, recorded="2021-03-04")),
        env("Procedure", "p", procedure("W37.1", system=NHS_OPCS4)),
        env("Observation", "o", observation("4548-4", value=7.1, unit="%")),
        env("DeviceUseStatement", "d", device()),
    ]
    view = view_of_envelopes(P, envelopes)
    (cond,) = view.conditions
    assert cond.tokens == frozenset({f"{ICD10}|E119"})
    # no onset: the recorded date
    assert cond.at == datetime(2021, 3, 4, 9, tzinfo=UTC)
    assert cond.when == cond.at.timestamp()
    assert cond.source == Source("urn:t|Condition|c", "Condition", "c", "v1", 1, None)
    (proc,) = view.procedures
    # the NHS OPCS-4 URI is OPCS-4, and the dot goes
    assert proc.tokens == frozenset({f"{OPCS4}|W371"})
    (obs,) = view.observations
    assert obs.measurement is not None and obs.measurement.value == 7.1
    (exposure,) = view.exposures
    assert exposure.tokens == frozenset({f"{SNOMED}|304120007"})
    assert exposure.manufacturer == "Orthomedica" and exposure.origin == "use_statement"


def test_deleted_resources_contribute_nothing() -> None:
    envelopes = [
        env("Condition", "c", condition(ICD10, "I10")),
        env("Condition", "c", seq=2, retracted=True),
        env("Condition", "c", condition(ICD10, "I10"), seq=1),  # an old version replayed
    ]
    assert view_of_envelopes(P, envelopes).conditions == ()


def test_a_newer_version_replaces_the_older_records() -> None:
    envelopes = [
        env("Condition", "c", condition(ICD10, "I10"), seq=2),
        env("Condition", "c", condition(ICD10, "E11"), seq=1),
    ]
    (cond,) = view_of_envelopes(P, envelopes).conditions
    assert cond.tokens == frozenset({f"{ICD10}|I10"}) and cond.source is not None
    assert cond.source.seq == 2


def test_research_opt_out_needs_an_active_consent() -> None:
    def consent(status: str, opt_out: bool) -> dict[str, Any]:
        return {"kind": "consent", "status": status, "research_opt_out": opt_out, "date": None}

    assert view_of_envelopes(P, [env("Consent", "k", consent("active", True))]).research_opt_out
    assert not view_of_envelopes(
        P, [env("Consent", "k", consent("inactive", True))]
    ).research_opt_out
    assert not view_of_envelopes(
        P, [env("Consent", "k", consent("active", False))]
    ).research_opt_out


def test_the_state_shape_and_the_envelopes_give_the_same_view() -> None:
    envelopes = [
        env("Patient", "a", patient()),
        env("Condition", "c", condition(ICD10, "I10")),
        env("Observation", "o", observation("4548-4", value=7.1, unit="%")),
    ]
    entries = {e["key"]: e for e in envelopes}
    assert build_view(P, entries) == view_of_envelopes(P, envelopes)
