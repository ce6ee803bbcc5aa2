"""The device-surveillance path on the real broker: a synthetic population with a faulty hip
model, published by the real adapter, counted by a real ``concierge worker``, and the signal
monitor reading what the worker publishes.

Used by the device-signal integration test and, through the ``regulator_stack`` fixture, by the
dashboard's browser test (which needs the API served over HTTP).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from concierge.commands.generate import bundle
from core.auth import issue
from core.settings import Settings
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import KafkaSink
from fhir_adapters.synthetic.generator import (
    DENSE_IMPLANT_RATES,
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from surveillance_stream import patient_state
from surveillance_stream.devices import Counters, contribution

from .worker_proc import WorkerProcess, free_port

FAULTY = "Acetabulon X2"
FAULTY_NODE = "hip/Orthomedica/Acetabulon X2"
#: Dense implants over five years, so 3,000 patients give each hip model ~100-150 implants
#: (the generator's default rates would need ~100,000 patients for that). Seed 3 makes the
#: faulty model signal clearly (tests/generative/test_device_counters.py checks seeds 1-5).
IMPLANT_RATES = DENSE_IMPLANT_RATES
KEEP = {"Patient", "Device", "Procedure", "DeviceUseStatement", "Condition", "AdverseEvent"}


def config(patients: int = 3000, seed: int = 3) -> GeneratorConfig:
    return GeneratorConfig(
        patients=patients, seed=seed, sites=10, history_years=5, implant_rates=IMPLANT_RATES
    )


def implanted_patients(generator: GeneratorConfig) -> list[list[dict[str, Any]]]:
    """The patients with a device, with only the resources device surveillance reads."""
    found = []
    for resources in iter_patients(generator):
        if any(r["resourceType"] == "Device" for r in resources):
            found.append([r for r in resources if r["resourceType"] in KEEP])
    return found


class Recorder:
    """A sink that publishes to Kafka and keeps every envelope (the oracle's input)."""

    def __init__(self, inner: KafkaSink) -> None:
        self.inner = inner
        self.envelopes: list[Any] = []

    def facts(self, envelope: Any) -> None:
        self.envelopes.append(envelope)
        self.inner.facts(envelope)

    def reference(self, record: Any) -> None:
        self.inner.reference(record)

    def dead_letter(self, letter: Any) -> None:
        self.inner.dead_letter(letter)

    def flush(self) -> None:
        self.inner.flush()


def reference_counters(envelopes: list[Any]) -> Counters:
    """The counters computed in batch from the published envelopes (the oracle)."""
    patients: dict[str, dict[str, Any]] = {}
    for key, entry in patient_state.fold(envelopes).items():
        patient, resource = patient_state.split_key(key)
        patients.setdefault(patient, {})[resource] = entry
    return Counters.rebuild(contribution(p, entries) for p, entries in patients.items())


@dataclass
class Population:
    settings: Settings
    ingestor: Ingestor
    recorder: Recorder
    patients: list[list[dict[str, Any]]]
    sent: int = 0

    @classmethod
    def build(cls, settings: Settings, generator: GeneratorConfig) -> Population:
        recorder = Recorder(KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix))
        ingestor = build_ingestor(settings, sink=recorder)  # type: ignore[arg-type]
        ingestor.ingest_bundle(bundle(list(iter_reference_resources(generator))), "reference")
        return cls(settings, ingestor, recorder, implanted_patients(generator))

    def send(self, upto: int | None = None) -> None:
        end = len(self.patients) if upto is None else upto
        for record in self.patients[self.sent : end]:
            self.ingestor.ingest_bundle(bundle(record), "test")
        self.sent = max(self.sent, end)
        self.ingestor.commit()


@dataclass
class ApiProcess:
    """``concierge api`` served by uvicorn in a subprocess (as the product runs it)."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: ``api``, or ``monitor`` for the signal monitor's service
    verb: str = "api"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ApiProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", self.verb, "--port", str(self.port)],
            # the monitor in-process unless the test says otherwise (the demo's mode)
            env={"CONCIERGE_SURVEILLANCE_MONITOR": "true", **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"api exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"api did not answer in {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class RegulatorStack:
    api_url: str
    token: str
    faulty_node: str
    env: dict[str, str]
    population: Population
    worker: WorkerProcess
    api: ApiProcess

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def signals(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.api_url}/v1/surveillance/signals", headers=self.headers)
        if response.status_code != 200:
            return []
        rows: list[dict[str, Any]] = response.json()["signals"]
        return rows


def start_regulator_stack(
    settings: Settings, tmp_path: Path, patients: int = 3000, seed: int = 3
) -> Iterator[RegulatorStack]:
    """Worker, API (subprocess) and the population; yields once the faulty model signals."""
    population = Population.build(settings, config(patients, seed))
    population.send()
    worker = WorkerProcess(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        tmp_path / "worker-home",
        tmp_path / "worker.log",
    ).start()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONCIERGE_TOPIC_PREFIX": settings.topic_prefix,
        "CONCIERGE_HOME": str(settings.home),
        "CONCIERGE_FEASIBILITY_FEED": "false",
        "CONCIERGE_TOKEN_KEY": settings.token_key.get_secret_value(),
    }
    api = ApiProcess(env, tmp_path / "api.log").start()
    key = settings.token_key.get_secret_value().encode()
    stack = RegulatorStack(
        api_url=api.url,
        token=issue(key, "regulator", "MHRA"),
        faulty_node=FAULTY_NODE,
        env=env,
        population=population,
        worker=worker,
        api=api,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = stack.signals()
            if any(r["node"] == FAULTY_NODE and r["state"] == "signalled" for r in rows):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"the faulty model did not signal in 180 s\nworker:\n{worker.tail()}\n"
                f"api:\n{api.tail()}"
            )
        yield stack
    finally:
        api.stop()
        worker.stop()
