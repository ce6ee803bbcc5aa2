"""The synthetic population: deterministic, valid FHIR, ingestible, plausible."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from fhir.resources.R4B import get_fhir_model_class

from fhir_adapters.pipeline import Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import MemorySink
from fhir_adapters.synthetic.catalogue import DEVICE_CLASSES
from fhir_adapters.synthetic.cli import bundle, generate
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
    nhs_number,
)
from fhir_adapters.vault import MemoryVault


def test_same_options_same_bytes_and_patients_independent_of_batching(tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(
            generate,
            [
                "--patients",
                "50",
                "--seed",
                "3",
                "--out",
                str(tmp_path / name),
                "--format",
                "both",
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) > 50
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["resources"]["Patient"] == 50
    config = GeneratorConfig(patients=50, seed=3)
    assert next(iter(iter_patients(config, start=37))) == list(iter_patients(config))[37]


def test_every_resource_is_valid_r4_and_ingests_without_dead_letters() -> None:
    config = GeneratorConfig(patients=150, seed=5, opt_out_rate=0.2)
    ingestor = Ingestor(MemoryVault(), MemorySink(), Pseudonymiser(b"k" * 32), "urn:test")
    reference = list(iter_reference_resources(config))
    ingestor.ingest_bundle(bundle(reference), "reference")
    types: Counter[str] = Counter()
    for resources in iter_patients(config):
        assert resources[0]["resourceType"] == "Patient"
        ids = {f"{r['resourceType']}/{r['id']}" for r in resources + reference}
        for resource in resources:
            types[resource["resourceType"]] += 1
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            for ref in _references(resource):
                assert ref in ids, ref
        ingestor.ingest_bundle(bundle(resources), "patient")
    ingestor.commit()
    assert ingestor.stats.counts["dead_lettered"] == 0
    assert ingestor.stats.counts["accepted"] == sum(types.values()) + len(reference)
    assert {"Patient", "Condition", "Observation", "MedicationRequest", "Consent"} <= set(types)


def _references(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def test_nhs_numbers_pass_modulus_11() -> None:
    import random

    rng = random.Random(1)
    for _ in range(500):
        number = nhs_number(rng)
        digits = [int(d) for d in number]
        total = sum(d * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True))
        assert (11 - total % 11) % 11 == digits[9]


@pytest.fixture(scope="module")
def population() -> list[list[dict[str, object]]]:
    return list(iter_patients(GeneratorConfig(patients=6000, seed=11, faulty_multiplier=6.0)))


def test_prevalence_and_opt_out_rate_are_plausible(population: list[list[dict]]) -> None:
    adults = [p for p in population if p[0]["birthDate"] <= "2008-01-01"]  # type: ignore[operator]
    diabetic = sum(
        any(
            r["resourceType"] == "Condition" and r["code"]["coding"][1]["code"] == "E11.9"
            for r in p
        )
        for p in adults
    )  # type: ignore[index]
    assert 0.04 < diabetic / len(adults) < 0.11
    opted_out = sum(any(r["resourceType"] == "Consent" for r in p) for p in population)
    assert 0.02 < opted_out / len(population) < 0.04


def test_the_faulty_model_fails_more_often(population: list[list[dict]]) -> None:
    implants: Counter[bool] = Counter()
    outcomes: Counter[bool] = Counter()
    hip = DEVICE_CLASSES[0]
    for resources in population:
        devices = {
            f"Device/{r['id']}": r["modelNumber"] == "Acetabulon X2"
            for r in resources
            if r["resourceType"] == "Device" and r["type"]["coding"][0]["code"] == hip.snomed
        }  # type: ignore[index]
        for key, faulty in devices.items():
            implants[faulty] += 1
            outcomes[faulty] += any(
                r["resourceType"] == "AdverseEvent"
                and r["suspectEntity"][0]["instance"]["reference"] == key  # type: ignore[index]
                for r in resources
            )
    assert implants[True] > 10 and implants[False] > 30
    assert outcomes[True] / implants[True] > outcomes[False] / implants[False]
