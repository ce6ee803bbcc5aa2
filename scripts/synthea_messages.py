"""Ingest the third-party Synthea samples (``../shared/fhir-samples``) with an in-memory vault and
sink, print the ingest counts and write every published message, canonical and without its
``ingested_at``, one JSON per line: two versions of the adapters that publish the same messages
give the same file (a check for refactors that must not change what is published).

    python scripts/synthea_messages.py /tmp/new.jsonl [--samples DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from fhir_adapters.pipeline import Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.sinks import MemorySink
from fhir_adapters.vault import MemoryVault

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "fhir-samples"


def canonical(message: Any) -> str:
    data = message.model_dump(mode="json") if hasattr(message, "model_dump") else vars(message)
    data.pop("ingested_at", None)
    if isinstance(data.get("provenance"), dict):
        data["provenance"].pop("ingested_at", None)
    return json.dumps(data, sort_keys=True, default=str)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    args = parser.parse_args()
    sink = MemorySink()
    ingestor = Ingestor(MemoryVault(), sink, Pseudonymiser(b"k" * 32), "urn:test:synthea")
    paths = sorted(args.samples.rglob("*.json"))
    if not paths:
        raise SystemExit(f"no samples under {args.samples}")
    for path in paths:
        ingestor.ingest_text(path.read_bytes(), path.name)
    stats = ingestor.stats.to_dict()
    messages = [*sink.published_facts, *sink.published_references, *sink.dead_letters]
    digest = hashlib.sha256()
    with args.out.open("w") as out:
        for message in messages:
            line = canonical(message)
            digest.update(line.encode())
            out.write(line + "\n")
    counts = {k: stats[k] for k in ("total", "accepted", "unchanged", "skipped", "dead_lettered")}
    print(json.dumps(counts), f"messages={len(messages)} sha256={digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
