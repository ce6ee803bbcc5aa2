"""Ingest throughput: the adapter's resources/s per core beside a naive pipeline, same run.

Naive pipeline (the baseline): parse each NDJSON line, validate it with fhir.resources (R4B
models), publish the resource to Kafka. The adapter: parse, checked extraction, pseudonymise,
version via the resource index (SQLite), publish facts, flush, commit. Both publish to the same
real broker; each runs single-threaded, and "per core" is resources per CPU-second of the
ingesting process (the broker's own CPU is outside both). Runs alternate (naive, adapter, naive,
...) so drift on this shared machine hits both alike; medians are reported.

    python -m benchmarks.bench_ingest --patients 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer
from fhir.resources.R4B import get_fhir_model_class

from benchmarks.common import summary, write_result
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.sources import expand, ingest_file
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from infra.topics import TopicSpec
from infra.topics_admin import ensure_topics


def write_population(directory: Path, patients: int, seed: int) -> int:
    config = GeneratorConfig(patients=patients, seed=seed)
    handles: dict[str, Any] = {}
    count = 0

    def write(resource: dict[str, Any]) -> None:
        nonlocal count
        rtype = resource["resourceType"]
        if rtype not in handles:
            handles[rtype] = (directory / f"{rtype}.ndjson").open("wb")
        handles[rtype].write(orjson.dumps(resource) + b"\n")
        count += 1

    for resource in iter_reference_resources(config):
        write(resource)
    for record in iter_patients(config):
        for resource in record:
            write(resource)
    for handle in handles.values():
        handle.close()
    return count


def naive(files: list[Path], bootstrap: str, topic: str) -> int:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    count = 0
    for path in files:
        with path.open("rb") as handle:
            for line in handle:
                resource = orjson.loads(line)
                model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
                producer.produce(topic, key=str(model.id).encode(), value=line)
                count += 1
                if count % 1000 == 0:
                    producer.poll(0)
    producer.flush(60)
    return count


def adapter(files: list[Path], settings: Settings) -> int:
    ingestor = build_ingestor(settings, source=f"urn:bench:{uuid.uuid4()}")
    for path in files:
        for _ in ingest_file(ingestor, path):
            pass
    ingestor.commit()
    ingestor.vault.close()
    return ingestor.stats.total


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn()
    return count, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "population"
        data.mkdir()
        resources = write_population(data, args.patients, args.seed)
        files = expand([data])
        prefix = f"bench-{uuid.uuid4().hex[:8]}."
        ensure_topics(base.kafka_bootstrap_servers, prefix)
        naive_topic = prefix + "naive.fhir"
        ensure_topics(base.kafka_bootstrap_servers, prefix, (TopicSpec("naive.fhir", 6),))
        print(f"population: {args.patients} patients, {resources} resources in {len(files)} files")
        naive_rates: list[float] = []
        adapter_rates: list[float] = []
        naive_wall: list[float] = []
        adapter_wall: list[float] = []
        for run in range(args.repeats):
            count, wall, cpu = timed(
                lambda: naive(files, base.kafka_bootstrap_servers, naive_topic)
            )
            naive_rates.append(count / cpu)
            naive_wall.append(count / wall)
            settings = base.model_copy(
                update={"topic_prefix": prefix, "home": Path(tmp) / f"home-{run}"}
            )
            count2, wall2, cpu2 = timed(lambda s=settings: adapter(files, s))  # type: ignore[misc]
            adapter_rates.append(count2 / cpu2)
            adapter_wall.append(count2 / wall2)
            print(
                f"run {run + 1}: naive {count / cpu:,.0f} res/CPU-s ({count / wall:,.0f}/s "
                f"wall); adapter {count2 / cpu2:,.0f} res/CPU-s ({count2 / wall2:,.0f}/s wall)"
            )

        profile = cProfile.Profile()
        settings = base.model_copy(update={"topic_prefix": prefix, "home": Path(tmp) / "prof"})
        profile.enable()
        adapter(files, settings)
        profile.disable()
        stream = io.StringIO()
        pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(12)
        hot = [
            line.strip()
            for line in stream.getvalue().splitlines()
            if line.strip() and line.strip()[0].isdigit()
        ][:12]

    value = summary(adapter_rates)["median"]
    baseline = summary(naive_rates)["median"]
    result = write_result(
        "ingest_throughput_per_core",
        value,
        "resources/CPU-second",
        baseline,
        {
            "patients": args.patients,
            "resources": resources,
            "repeats": args.repeats,
            "validation_mode": base.validation_mode,
        },
        f"python -m benchmarks.bench_ingest --patients {args.patients} --repeats {args.repeats}",
        extra={
            "adapter": summary(adapter_rates),
            "naive": summary(naive_rates),
            "adapter_wall_per_s": summary(adapter_wall),
            "naive_wall_per_s": summary(naive_wall),
            "profile_top_tottime": hot,
        },
    )
    print(
        f"adapter {value:,.0f} vs naive {baseline:,.0f} resources/CPU-s: "
        f"ratio {result['ratio']}x (target >= 4x)"
    )
    print("where the adapter's time goes (cProfile, by own time):")
    for line in hot:
        print("   ", line)


if __name__ == "__main__":
    main()
