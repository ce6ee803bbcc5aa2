"""Build the columnar snapshot of a synthetic population and write it as partitioned Parquet.

Patients come from the project's generator (:mod:`fhir_adapters.synthetic.generator`) and go
through the adapters' own extraction (:mod:`fhir_adapters.extract`) and pseudonyms, exactly the
facts the ingest pipeline would publish, but without the broker, the vault and the resource
index (every resource is version 1, so ``seq`` is 1). Worker processes generate and extract
slices of patients; the main process folds their envelopes into one
:class:`~feasibility.snapshot.ColumnarSnapshot`, in patient order, so pids are deterministic.

    python -m benchmarks.build_snapshot var/snapshot-1m --patients 1000000 --seed 42

Progress goes to stderr; a one-line JSON summary (counts, rows per table, seconds) to stdout.
Load the result with ``ColumnarSnapshot.load_parquet(DIR)``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from core.contracts.facts import DeviceDescription, OrganizationRecord, resource_key
from feasibility.snapshot import ColumnarSnapshot
from fhir_adapters.extract import (
    EXTRACTORS,
    Extracted,
    FhirVersion,
    InvalidElement,
    UnknownReference,
    extract_device,
    extract_organization,
    extract_patient,
)
from fhir_adapters.primitives import read_identifier_token
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)

SOURCE = "urn:concierge:source:synthetic"
PSEUDONYM_KEY = b"benchmark-pseudonym-key-not-secret"


class _Context:
    """Reference resolution inside one patient's resources (what the pipeline's context does
    with the vault and the resource index)."""

    fhir_version: FhirVersion = "R4"

    def __init__(self, organizations: Mapping[str, OrganizationRecord]) -> None:
        self.organizations = organizations
        self.patients: dict[str, str] = {}
        self.devices: dict[str, DeviceDescription] = {}

    def key_for(self, reference: str, expected_type: str | None = None) -> str | None:
        parts = reference.rstrip("/").split("/")
        if len(parts) < 2 or reference.startswith(("#", "urn:")) or "?" in reference:
            return None
        rtype, rid = parts[-2], parts[-1]
        if expected_type and rtype != expected_type:
            return None
        return resource_key(SOURCE, rtype, rid)

    def patient_for(self, reference: str | None, identifier: str | None, expression: str) -> str:
        key = self.key_for(reference) if reference else None
        pseudonym = self.patients.get(key) if key else None
        if pseudonym is None:
            raise UnknownReference(expression, f"unknown patient {reference!r}")
        return pseudonym

    def organization(self, key: str) -> OrganizationRecord | None:
        return self.organizations.get(key)

    def device(self, key: str) -> DeviceDescription | None:
        return self.devices.get(key)


_ORGANIZATIONS: dict[str, OrganizationRecord] = {}
_CONFIG: GeneratorConfig | None = None


def _init(config: GeneratorConfig) -> None:
    global _CONFIG
    _CONFIG = config
    ctx = _Context({})
    for resource in iter_reference_resources(config):
        if resource["resourceType"] == "Organization":
            record = extract_organization(resource, ctx).record
            assert isinstance(record, OrganizationRecord)
            _ORGANIZATIONS[resource_key(SOURCE, "Organization", resource["id"])] = record


def _identifiers(resource: Mapping[str, Any]) -> list[str]:
    out = []
    for index, item in enumerate(resource.get("identifier") or ()):
        token = read_identifier_token(item, f"Patient.identifier[{index}]")
        if token:
            out.append(token)
    return out


def _envelopes(records: Iterator[list[dict[str, Any]]], ingested_at: str) -> list[Any]:
    pseudonymiser = Pseudonymiser(PSEUDONYM_KEY)
    out: list[Any] = []
    for resources in records:
        ctx = _Context(_ORGANIZATIONS)
        for resource in resources:
            rtype, rid = resource["resourceType"], resource["id"]
            key = resource_key(SOURCE, rtype, rid)
            try:
                if rtype == "Patient":
                    pseudonym = pseudonymiser.for_patient(_identifiers(resource), SOURCE, rid)
                    extracted: Extracted = extract_patient(resource, ctx, pseudonym)
                    ctx.patients[key] = pseudonym
                    key = resource_key(SOURCE, rtype, pseudonym)
                elif rtype == "Device":
                    extracted = extract_device(resource, ctx, key)
                    if extracted.record is not None:
                        ctx.devices[key] = extracted.record.description  # type: ignore[union-attr]
                elif rtype in EXTRACTORS:
                    extracted = EXTRACTORS[rtype](resource, ctx)
                else:
                    continue
            except InvalidElement:
                continue
            if extracted.patient is None or not (
                extracted.route == "facts" or extracted.also_facts
            ):
                continue
            retracted = extracted.entered_in_error
            out.append(
                {
                    "schema": "concierge.facts/1",
                    "key": key,
                    "patient": extracted.patient,
                    "seq": 1,
                    "retracted": retracted,
                    "provenance": {
                        "source": SOURCE,
                        "resource_type": rtype,
                        "resource_id": rid,
                        "version": "1",
                        "ingested_at": ingested_at,
                    },
                    "facts": []
                    if retracted
                    else [fact.model_dump(mode="json") for fact in extracted.facts],
                }
            )
    return out


def _slice(bounds: tuple[int, int]) -> bytes:
    assert _CONFIG is not None
    start, stop = bounds
    ingested_at = datetime.now(UTC).isoformat()
    return orjson.dumps(_envelopes(iter_patients(_CONFIG, start, stop), ingested_at))


def build(
    out: Path,
    patients: int,
    seed: int,
    workers: int,
    chunk: int,
    buckets: int,
    quiet: bool = False,
) -> dict[str, Any]:
    config = GeneratorConfig(patients=patients, seed=seed)
    snapshot = ColumnarSnapshot()
    started = time.perf_counter()
    slices = [(s, min(s + chunk, patients)) for s in range(0, patients, chunk)]
    done = envelopes = 0
    last = 0.0

    def progress(final: bool = False) -> None:
        nonlocal last
        now = time.perf_counter()
        if quiet or (not final and now - last < 2.0):
            return
        last = now
        elapsed = now - started
        rate = done / elapsed if elapsed else 0.0
        eta = (patients - done) / rate if rate else 0.0
        print(
            f"\r{done:,}/{patients:,} patients  {envelopes:,} envelopes  "
            f"{rate:,.0f} patients/s  elapsed {elapsed:,.0f}s  ETA {eta:,.0f}s ",
            end="\n" if final else "",
            file=sys.stderr,
            flush=True,
        )

    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_init, initargs=(config,)) as pool:
        for (_start, stop), payload in zip(slices, pool.imap(_slice, slices), strict=True):
            for envelope in orjson.loads(payload):
                snapshot.apply(envelope)
                envelopes += 1
            snapshot.flush()
            done = stop
            progress()
    progress(final=True)
    built = time.perf_counter()
    if not quiet:
        print("compacting and writing Parquet ...", file=sys.stderr, flush=True)
    snapshot.save_parquet(out, buckets=buckets)
    frames = snapshot.frames()
    return {
        "patients": patients,
        "seed": seed,
        "envelopes": envelopes,
        "rows": {name: view.main.height for name, view in frames.tables.items()},
        "tokens": frames.tokens.height,
        "codesets": frames.codesets.get_column("codeset").n_unique(),
        "build_seconds": round(built - started, 1),
        "write_seconds": round(time.perf_counter() - built, 1),
        "out": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=max(1, (multiprocessing.cpu_count())))
    parser.add_argument("--chunk", type=int, default=2_000, help="patients per work unit")
    parser.add_argument("--buckets", type=int, default=16, help="Parquet buckets per table")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    summary = build(
        args.out, args.patients, args.seed, args.workers, args.chunk, args.buckets, args.quiet
    )
    print(orjson.dumps(summary).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
