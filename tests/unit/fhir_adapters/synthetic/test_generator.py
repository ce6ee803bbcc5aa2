"""The synthetic population: deterministic, valid FHIR, ingestible, plausible."""

from __future__ import annotations

import json
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fhir.resources.R4B import get_fhir_model_class

from concierge.commands.generate import bundle, generate
from fhir_adapters.synthetic.catalogue import DEVICE_CLASSES, ICD10, LOINC, UCUM
from fhir_adapters.synthetic.generator import (
    FaultyDevice,
    GeneratorConfig,
    is_valid_nhs_number,
    iter_patients,
    iter_reference_resources,
    nhs_number,
)
from fhir_adapters.uk_geography import region_for_postcode

Population = list[list[dict[str, Any]]]
HIP = DEVICE_CLASSES[0].snomed


def _run(out: Path, *extra: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        generate,
        ["--patients", "40", "--seed", "3", "--out", str(out), "--quiet", *extra],
    )
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.output.strip().splitlines()[-1])
    return summary


def test_same_options_give_byte_identical_output(tmp_path: Path) -> None:
    summary = _run(tmp_path / "a", "--format", "both")
    _run(tmp_path / "b", "--format", "both")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert Path("Patient.ndjson") in files and Path("bundles/reference.json") in files
    assert Path("bundles/patient-39.json") in files
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert summary["resources"]["Patient"] == 40
    assert summary["total"] == sum(summary["resources"].values())
    lines = (tmp_path / "a" / "Patient.ndjson").read_bytes().splitlines()
    assert len(lines) == 40 and all(json.loads(line)["resourceType"] == "Patient" for line in lines)
    other = _run(tmp_path / "c", "--seed", "4")
    assert other["resources"]["Patient"] == 40
    assert (tmp_path / "c" / "Patient.ndjson").read_bytes() != b"\n".join(lines) + b"\n"


def test_a_patient_does_not_depend_on_the_patients_before_it() -> None:
    config = GeneratorConfig(patients=60, seed=3)
    everyone = list(iter_patients(config))
    assert next(iter_patients(config, start=37)) == everyone[37]
    assert list(iter_patients(config, start=10, stop=12)) == everyone[10:12]
    # a bigger population has the same first patients (same site count)
    assert list(iter_patients(GeneratorConfig(patients=90, seed=3), stop=60)) == everyone


def test_bundles_are_transactions_with_uuid_full_urls(tmp_path: Path) -> None:
    _run(tmp_path, "--format", "bundles")
    assert not (tmp_path / "Patient.ndjson").exists()
    data = json.loads((tmp_path / "bundles" / "patient-0.json").read_text())
    assert data["type"] == "transaction"
    first = data["entry"][0]
    rid = first["resource"]["id"]
    assert first["fullUrl"] == f"urn:uuid:{rid}"
    assert first["request"] == {"method": "PUT", "url": f"Patient/{rid}"}
    get_fhir_model_class("Bundle").model_validate(data)
    reference = json.loads((tmp_path / "bundles" / "reference.json").read_text())
    kinds = {e["resource"]["resourceType"] for e in reference["entry"]}
    assert kinds == {"Organization", "Practitioner", "PractitionerRole"}


def _references(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def test_every_resource_is_valid_r4_and_references_resolve() -> None:
    config = GeneratorConfig(patients=50, seed=5, opt_out_rate=0.3)
    reference = list(iter_reference_resources(config))
    reference_ids = {f"{r['resourceType']}/{r['id']}" for r in reference}
    for resource in reference:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert all(ref in reference_ids for ref in _references(resource))
    types: Counter[str] = Counter()
    for resources in iter_patients(config):
        patient = resources[0]
        assert patient["resourceType"] == "Patient"
        assert types["Patient"] == 0 or patient["meta"]["versionId"] == "1"
        own = {f"{r['resourceType']}/{r['id']}" for r in resources}
        for resource in resources:
            types[resource["resourceType"]] += 1
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            for ref in _references(resource):
                assert ref in own or ref in reference_ids, ref
                if ref.startswith("Patient/"):
                    assert ref == f"Patient/{patient['id']}"
            if resource["resourceType"] != "Patient":
                holder = resource.get("subject") or resource.get("patient")
                assert holder == {"reference": f"Patient/{patient['id']}"}
    assert {"Patient", "Condition", "Observation", "MedicationRequest", "Consent"} <= set(types)


def test_nhs_numbers_are_valid_and_unique() -> None:
    numbers = [nhs_number(i, seed=7) for i in range(20_000)]
    assert len(set(numbers)) == len(numbers)
    assert all(is_valid_nhs_number(n) for n in numbers)
    for number in numbers[:500]:
        digits = [int(d) for d in number]
        total = sum(d * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True))
        assert (11 - total % 11) % 11 == digits[9]
    assert not is_valid_nhs_number("9434765918")  # last digit changed from a valid 9434765919
    assert is_valid_nhs_number("9434765919")


@pytest.fixture(scope="module")
def population() -> Population:
    faulty = FaultyDevice(multiplier=6.0, from_date=date(2019, 1, 1))
    return list(iter_patients(GeneratorConfig(patients=4000, seed=11, faulty=faulty)))


def _has(patient: list[dict[str, Any]], kind: str, system: str, codes: set[str]) -> bool:
    return any(
        r["resourceType"] == kind
        and any(c["system"] == system and c["code"] in codes for c in r["code"]["coding"])
        for r in patient
    )


def test_prevalence_of_chronic_conditions_is_plausible(population: Population) -> None:
    adults = [p for p in population if p[0]["birthDate"] <= "2007-12-31"]
    expected = {
        ("E11.9",): (0.05, 0.09),
        ("I10",): (0.11, 0.17),
        ("N18.3", "N18.4", "N18.5"): (0.025, 0.055),
        ("J45.9",): (0.045, 0.08),
        ("I48.9",): (0.01, 0.03),
        ("J44.9",): (0.01, 0.03),
    }
    for codes, (low, high) in expected.items():
        share = sum(_has(p, "Condition", ICD10, set(codes)) for p in adults) / len(adults)
        assert low < share < high, (codes, share)
    children = [p for p in population if p[0]["birthDate"] > "2008-01-01"]
    assert not any(r["resourceType"] == "Condition" for p in children for r in p)


def test_labs_are_coded_and_correlated_with_conditions(population: Population) -> None:
    def mean_hba1c(diabetic: bool) -> float:
        values = [
            r["valueQuantity"]["value"]
            for p in population
            if _has(p, "Condition", ICD10, {"E11.9"}) == diabetic
            for r in p
            if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "59261-8"
        ]
        return sum(values) / len(values)

    assert mean_hba1c(True) > mean_hba1c(False) + 15
    units: Counter[tuple[str, str]] = Counter()
    for p in population:
        for r in p:
            if r["resourceType"] == "Observation" and "valueQuantity" in r:
                quantity = r["valueQuantity"]
                assert quantity["system"] == UCUM and quantity["code"] == quantity["unit"]
                assert r["code"]["coding"][0]["system"] == LOINC
                units[(r["code"]["coding"][0]["code"], quantity["code"])] += 1
    assert units[("4548-4", "%")] and units[("59261-8", "mmol/mol")]
    assert units[("18262-6", "mg/dL")] and units[("22748-8", "mmol/L")]
    assert units[("33914-3", "mL/min/{1.73_m2}")] and units[("62238-1", "mL/min/{1.73_m2}")]
    ckd_egfr = [
        r["valueQuantity"]["value"]
        for p in population
        if _has(p, "Condition", ICD10, {"N18.4", "N18.5"})
        for r in p
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["code"] == "62238-1"
    ]
    assert ckd_egfr and sum(ckd_egfr) / len(ckd_egfr) < 30


def test_postcodes_match_the_site_region(population: Population) -> None:
    config = GeneratorConfig(patients=4000, seed=11)
    regions = {
        r["id"]: region_for_postcode(r["address"][0]["postalCode"])
        for r in iter_reference_resources(config)
        if r["resourceType"] == "Organization" and "partOf" not in r
    }
    assert len(set(regions.values())) >= 5 and "Unknown" not in regions.values()
    for patient in population[:500]:
        site = patient[0]["managingOrganization"]["reference"].split("/")[1]
        assert region_for_postcode(patient[0]["address"][0]["postalCode"]) == regions[site]


def _outcome_rates(population: Population, after: str) -> dict[bool, tuple[int, int]]:
    implants: Counter[bool] = Counter()
    outcomes: Counter[bool] = Counter()
    for resources in population:
        implanted = {
            r["focalDevice"][0]["manipulated"]["reference"]: r["performedPeriod"]["start"]
            for r in resources
            if r["resourceType"] == "Procedure" and "performedPeriod" in r
        }
        suspects = {
            r["suspectEntity"][0]["instance"]["reference"]
            for r in resources
            if r["resourceType"] == "AdverseEvent"
        }
        for r in resources:
            if r["resourceType"] != "Device" or r["type"]["coding"][0]["code"] != HIP:
                continue
            key = f"Device/{r['id']}"
            if implanted[key] < after:
                continue
            faulty = r["modelNumber"] == "Acetabulon X2"
            implants[faulty] += 1
            outcomes[faulty] += key in suspects
    return {k: (outcomes[k], implants[k]) for k in (True, False)}


def test_the_faulty_model_fails_more_often(population: Population) -> None:
    rates = _outcome_rates(population, "2019-01-01")
    (bad, bad_n), (good, good_n) = rates[True], rates[False]
    assert bad_n >= 10 and good_n >= 30
    assert bad / bad_n > 2 * good / good_n


def test_opt_out_rate_and_consent_shape(population: Population) -> None:
    consents = [r for p in population for r in p if r["resourceType"] == "Consent"]
    assert 0.02 < len(consents) / len(population) < 0.04
    consent = consents[0]
    assert consent["provision"]["type"] == "deny"
    assert consent["scope"]["coding"][0]["code"] == "research"
    assert consent["category"][0]["coding"][0] == {
        "system": LOINC,
        "code": "59284-0",
        "display": "Patient Consent",
    }


def test_implants_link_device_procedure_and_use_statement(population: Population) -> None:
    seen = 0
    for resources in population:
        devices = {f"Device/{r['id']}" for r in resources if r["resourceType"] == "Device"}
        for r in resources:
            if r["resourceType"] == "DeviceUseStatement":
                assert r["device"]["reference"] in devices
                seen += 1
        for ref in devices:
            assert any(
                r["resourceType"] == "Procedure"
                and r.get("focalDevice", [{}])[0].get("manipulated", {}).get("reference") == ref
                for r in resources
            )
    assert seen > 20


def test_cli_prints_a_json_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        generate,
        [
            "--patients",
            "12",
            "--out",
            str(tmp_path),
            "--as-of",
            "2025-06-30",
            "--faulty-model",
            "Exeter V40",
            "--faulty-multiplier",
            "10",
            "--faulty-from",
            "2020-01-01",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["resources"]["Patient"] == 12
    assert summary["as_of"] == "2025-06-30"
    assert summary["faulty"] == {"model": "Exeter V40", "multiplier": 10.0, "from": "2020-01-01"}
    dates = [
        json.loads(line)["meta"]["lastUpdated"]
        for line in (tmp_path / "Patient.ndjson").read_text().splitlines()
    ]
    assert set(dates) == {"2025-06-30T00:00:00+00:00"}


def test_the_population_ingests_without_dead_letters() -> None:
    from fhir_adapters.pipeline import Ingestor
    from fhir_adapters.pseudonym import Pseudonymiser
    from fhir_adapters.sinks import MemorySink
    from fhir_adapters.vault import MemoryVault

    config = GeneratorConfig(patients=80, seed=5, opt_out_rate=0.2)
    ingestor = Ingestor(MemoryVault(), MemorySink(), Pseudonymiser(b"k" * 32), "urn:test")
    reference = list(iter_reference_resources(config))
    ingestor.ingest_bundle(bundle(reference), "reference")
    total = len(reference)
    for resources in iter_patients(config):
        ingestor.ingest_bundle(bundle(resources), "patient")
        total += len(resources)
    ingestor.commit()
    assert ingestor.stats.counts["dead_lettered"] == 0
    assert ingestor.stats.counts["accepted"] == total
