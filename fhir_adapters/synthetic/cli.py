"""``concierge generate``: write the synthetic population as Bulk NDJSON and/or Bundles."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import date
from pathlib import Path
from typing import IO, Any

import click
import orjson

from .generator import GeneratorConfig, iter_patients, iter_reference_resources


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{r['resourceType']}/{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def write_population(
    config: GeneratorConfig, out: Path, fmt: str = "ndjson", progress: bool = False
) -> Counter[str]:
    """Write the population; memory stays bounded (one patient at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    handles: dict[str, IO[bytes]] = {}
    ndjson, bundles = fmt in ("ndjson", "both"), fmt in ("bundles", "both")

    def emit(resource: dict[str, Any]) -> None:
        rtype = resource["resourceType"]
        counts[rtype] += 1
        if ndjson:
            if rtype not in handles:
                handles[rtype] = (out / f"{rtype}.ndjson").open("wb")
            handles[rtype].write(orjson.dumps(resource) + b"\n")

    try:
        reference = list(iter_reference_resources(config))
        for resource in reference:
            emit(resource)
        if bundles:
            (out / "bundles").mkdir(exist_ok=True)
            (out / "bundles" / "reference.json").write_bytes(orjson.dumps(bundle(reference)))
        started = last = time.perf_counter()
        for index, resources in enumerate(iter_patients(config)):
            for resource in resources:
                emit(resource)
            if bundles:
                (out / "bundles" / f"patient-{index:07d}.json").write_bytes(
                    orjson.dumps(bundle(resources))
                )
            now = time.perf_counter()
            if progress and now - last >= 1:
                last = now
                rate = (index + 1) / (now - started)
                click.echo(
                    f"\r  {index + 1}/{config.patients} patients ({rate:,.0f}/s)",
                    err=True,
                    nl=False,
                )
        if progress:
            click.echo("", err=True)
    finally:
        for handle in handles.values():
            handle.close()
    return counts


@click.command()
@click.option("--patients", type=click.IntRange(min=1), required=True, help="Population size.")
@click.option("--seed", default=42, show_default=True, help="Same seed, same population.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "bundles", "both"]),
    default="ndjson",
    show_default=True,
    help="Bulk Data NDJSON per resource type, a transaction Bundle per patient, or both.",
)
@click.option(
    "--as-of",
    type=click.DateTime(["%Y-%m-%d"]),
    default="2026-01-01",
    show_default=True,
    help="The population's 'today': no date after it.",
)
@click.option(
    "--faulty-model",
    default=GeneratorConfig.faulty_model,
    show_default=True,
    help="Device model with an elevated outcome rate.",
)
@click.option(
    "--faulty-multiplier",
    default=4.0,
    show_default=True,
    help="Outcome-rate multiplier of the faulty model.",
)
@click.option(
    "--faulty-from",
    type=click.DateTime(["%Y-%m-%d"]),
    default="2023-01-01",
    show_default=True,
    help="Implants from this date on are affected.",
)
@click.option(
    "--opt-out-rate",
    default=0.03,
    show_default=True,
    help="Share of patients with a research opt-out.",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def generate(
    patients: int,
    seed: int,
    out: Path,
    fmt: str,
    as_of: Any,
    faulty_model: str,
    faulty_multiplier: float,
    faulty_from: Any,
    opt_out_rate: float,
    quiet: bool,
) -> None:
    """Generate a deterministic synthetic UK-like population as FHIR R4.

    Sites (NHS trusts) across regions with GP practices and clinicians; patients with chronic
    conditions (SNOMED CT + ICD-10), labs with UCUM units (LOINC), medications (dm+d), device
    implants and their outcomes (OPCS-4 + SNOMED), oncology staging and markers, research
    opt-outs. Prints a JSON summary of resource counts.
    """
    config = GeneratorConfig(
        patients=patients,
        seed=seed,
        as_of=date.fromisoformat(as_of.date().isoformat()),
        opt_out_rate=opt_out_rate,
        faulty_model=faulty_model,
        faulty_multiplier=faulty_multiplier,
        faulty_from=faulty_from.date(),
    )
    started = time.perf_counter()
    counts = write_population(config, out, fmt, progress=not quiet)
    seconds = time.perf_counter() - started
    click.echo(
        json.dumps(
            {
                "patients": patients,
                "seed": seed,
                "out": str(out),
                "format": fmt,
                "seconds": round(seconds, 2),
                "patients_per_second": round(patients / seconds),
                "resources": dict(sorted(counts.items())),
                "total": sum(counts.values()),
            }
        )
    )
