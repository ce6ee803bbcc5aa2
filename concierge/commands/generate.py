"""``concierge generate``: write the synthetic population as Bulk NDJSON and/or Bundles."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click
import orjson

from fhir_adapters.synthetic.catalogue import DEFAULT_FAULTY_MODEL
from fhir_adapters.synthetic.generator import (
    FaultyDevice,
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)

_BUFFER = 1 << 20


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A FHIR transaction Bundle of ``resources``: fullUrl ``urn:uuid:<id>``, PUT ``Type/id``.

    References inside stay ``Type/id``; a server resolves them against the PUT urls.
    """
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.started = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 1 and done != self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate else 0.0
        click.echo(
            f"\r  {done:,}/{self.total:,} patients  {rate:,.0f} patients/s  eta {eta:,.0f} s ",
            err=True,
            nl=False,
        )

    def close(self) -> None:
        if self.enabled:
            click.echo("", err=True)


def write_population(
    config: GeneratorConfig, out: Path, fmt: str = "ndjson", progress: bool = False
) -> Counter[str]:
    """Write the population to ``out``; memory stays bounded (one patient at a time).

    ``ndjson``: ``out/<ResourceType>.ndjson`` (Bulk Data style, reference data included);
    ``bundles``: ``out/bundles/reference.json`` and ``out/bundles/patient-<index>.json``;
    ``both``: the two. Returns the number of resources per type.
    """
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    handles: dict[str, IO[bytes]] = {}
    ndjson, bundles = fmt in ("ndjson", "both"), fmt in ("bundles", "both")
    dumps = orjson.dumps

    def emit(resource: dict[str, Any]) -> None:
        rtype = resource["resourceType"]
        counts[rtype] += 1
        if ndjson:
            handle = handles.get(rtype)
            if handle is None:
                handle = handles[rtype] = (out / f"{rtype}.ndjson").open("wb", buffering=_BUFFER)
            handle.write(dumps(resource, option=orjson.OPT_APPEND_NEWLINE))

    meter = _Progress(config.patients, progress)
    try:
        reference: list[dict[str, Any]] = []  # kept only for the reference Bundle
        for resource in iter_reference_resources(config):
            emit(resource)
            if bundles:
                reference.append(resource)
        if bundles:
            (out / "bundles").mkdir(exist_ok=True)
            (out / "bundles" / "reference.json").write_bytes(dumps(bundle(reference)))
        for index, resources in enumerate(iter_patients(config)):
            for resource in resources:
                emit(resource)
            if bundles:
                (out / "bundles" / f"patient-{index}.json").write_bytes(dumps(bundle(resources)))
            meter.update(index + 1)
        meter.close()
    finally:
        for handle in handles.values():
            handle.close()
    return counts


@click.command()
@click.option("--patients", type=click.IntRange(min=1), required=True, help="Population size.")
@click.option("--seed", type=int, default=42, show_default=True, help="Same seed, same output.")
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
    help="The population's 'today': ages and ~10 years of history are relative to it.",
)
@click.option(
    "--faulty-model",
    default=DEFAULT_FAULTY_MODEL,
    show_default=True,
    help="Device model with an elevated outcome (revision / failure) rate.",
)
@click.option(
    "--faulty-multiplier",
    type=click.FloatRange(min=0),
    default=4.0,
    show_default=True,
    help="Outcome-rate multiplier of the faulty model.",
)
@click.option(
    "--faulty-from",
    type=click.DateTime(["%Y-%m-%d"]),
    default="2023-01-01",
    show_default=True,
    help="Implants of the faulty model from this date on are affected.",
)
@click.option(
    "--opt-out-rate",
    type=click.FloatRange(0, 1),
    default=0.03,
    show_default=True,
    help="Share of patients with a research opt-out (National Data Opt-out).",
)
@click.option(
    "--sites",
    type=click.IntRange(min=1),
    default=None,
    help="Number of sites (NHS trusts). Default: patients/1000, between 5 and 200.",
)
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def generate(
    patients: int,
    seed: int,
    out: Path,
    fmt: str,
    as_of: datetime,
    faulty_model: str,
    faulty_multiplier: float,
    faulty_from: datetime,
    opt_out_rate: float,
    sites: int | None,
    quiet: bool,
) -> None:
    """Generate a deterministic synthetic UK-like population as FHIR R4 (UK Core flavoured).

    Sites (NHS trusts) across regions with GP practices and clinicians; patients with chronic
    conditions (SNOMED CT + ICD-10), labs and vitals (LOINC, UCUM), medicines (dm+d), procedures
    (OPCS-4 + SNOMED), device implants and their outcomes with one faulty model, oncology staging
    and markers, research opt-outs. Progress goes to stderr; a JSON summary of resource counts to
    stdout.
    """
    config = GeneratorConfig(
        patients=patients,
        seed=seed,
        as_of=as_of.date(),
        opt_out_rate=opt_out_rate,
        faulty=FaultyDevice(faulty_model, faulty_multiplier, faulty_from.date()),
        sites=sites,
    )
    started = time.perf_counter()
    counts = write_population(config, out, fmt, progress=not quiet)
    seconds = time.perf_counter() - started
    total = sum(counts.values())
    click.echo(
        json.dumps(
            {
                "patients": patients,
                "seed": seed,
                "as_of": config.as_of.isoformat(),
                "out": str(out),
                "format": fmt,
                "sites": config.site_count,
                "faulty": {
                    "model": faulty_model,
                    "multiplier": faulty_multiplier,
                    "from": faulty_from.date().isoformat(),
                },
                "seconds": round(seconds, 2),
                "patients_per_second": round(patients / seconds) if seconds else None,
                "resources_per_second": round(total / seconds) if seconds else None,
                "resources": dict(sorted(counts.items())),
                "total": total,
            }
        )
    )
