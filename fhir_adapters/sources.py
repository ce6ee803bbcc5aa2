"""Reading FHIR from files and folders: JSON resources and Bundles, Bulk Data NDJSON (plain or
gzip), streamed line by line so a file of any size runs in bounded memory."""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from pathlib import Path

from .extract import FhirVersion
from .pipeline import Ingestor, Outcome

#: Reference data first, then patients, then everything that points at them.
_PRIORITY = {
    "organization": 0,
    "practitioner": 1,
    "practitionerrole": 2,
    "reference": 0,
    "location": 2,
    "patient": 3,
    "device": 4,
}

NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")


def _is_ndjson(path: Path) -> bool:
    return path.name.lower().endswith(NDJSON_SUFFIXES)


def _priority(path: Path) -> tuple[int, str]:
    stem = path.name.lower().split(".")[0]
    if _is_ndjson(path):
        return _PRIORITY.get(stem, 5), path.name
    return (0 if "reference" in stem else 5), path.name


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files to ingest, in an order that lets references resolve; raises for missing paths."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and (p.suffix.lower() == ".json" or _is_ndjson(p))
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(files, key=_priority)


def _lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        yield from handle


def ingest_file(
    ingestor: Ingestor, path: Path, fhir_version: FhirVersion | None = None
) -> Iterator[Outcome]:
    if _is_ndjson(path):
        yield from ingestor.ingest_ndjson_lines(_lines(path), str(path), fhir_version)
    else:
        yield from ingestor.ingest_text(path.read_bytes(), str(path), fhir_version)
