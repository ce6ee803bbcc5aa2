"""``/metrics``, ``/readyz`` and JSON logs of every service, each a real process on the real
broker: the API (``concierge api``, uvicorn), the stream worker and the recruitment service.

One stack for the module (starting three processes is the expensive part). It checks that each
service's lag family goes to 0 per partition once it has caught up after an ingest, that a
request moves the latency histogram of its route *template*, that no label or log line carries
an identifier from the input, that every log line is one JSON object, and that every metric the
Grafana dashboard (``infra/grafana/concierge.json``) queries is in a real scrape.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.auth import issue
from infra.topics import COHORT, DEADLETTER, FACTS
from infra.topics_admin import ensure_topics
from tests.faults import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN_KEY = "metrics-test-token-key-not-a-secret-0123456789"
SOURCE = "urn:test:metrics-ehr"
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "concierge.json"

#: Identifiers in the input that must never reach a log line or a label.
NHS_NUMBER = "9434765919"
FAMILY = "Quixotic-Zebedee"
PATIENT_ID = "pat-secret-4711"
CONDITION_ID = "cond-secret-0815"
DEAD_ID = "dead-secret-2342"
IDENTIFIERS = (NHS_NUMBER, FAMILY, PATIENT_ID, CONDITION_ID, DEAD_ID)
#: Every service the test starts, each a real process with /readyz, /healthz and /metrics.
SERVICES = ("api", "worker", "recruitment", "monitor")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", *self.argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@dataclass
class Stack:
    prefix: str
    api: str
    worker: str
    recruitment: str
    monitor: str
    procs: dict[str, Proc] = field(default_factory=dict)

    def source(self) -> dict[str, str]:
        token = issue(TOKEN_KEY.encode(), "source", "ehr", source_system=SOURCE)
        return {"Authorization": f"Bearer {token}"}

    def url(self, service: str) -> str:
        return {
            "api": self.api,
            "worker": self.worker,
            "recruitment": self.recruitment,
            "monitor": self.monitor,
        }[service]

    def ready_path(self, service: str) -> str:
        return "/readyz"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        pending = dict.fromkeys(SERVICES, "not asked")
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc = self.procs[name].proc
                assert proc is not None
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited:\n{self.procs[name].tail()}")
                try:
                    response = httpx.get(self.url(name) + "/readyz", timeout=3)
                except httpx.HTTPError as exc:
                    pending[name] = type(exc).__name__
                    continue
                if response.status_code == 200:
                    pending.pop(name)
                else:
                    pending[name] = response.text[:300]
            time.sleep(0.5)
        assert not pending, f"not ready after {timeout} s: {pending}"

    def scrape(self, service: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        """``{sample name: [(labels, value)]}`` of one scrape."""
        response = httpx.get(self.url(service) + "/metrics", timeout=5)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return samples

    def text(self, service: str) -> str:
        return httpx.get(self.url(service) + "/metrics", timeout=5).text


def _env(bootstrap: str, prefix: str, home: Path, ports: dict[str, int]) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CONCIERGE_TOPIC_PREFIX": prefix,
        "CONCIERGE_HOME": str(home),
        "CONCIERGE_TOKEN_KEY": TOKEN_KEY,
        "CONCIERGE_SOURCE_SYSTEM": SOURCE,
        "CONCIERGE_API_PORT": str(ports["api"]),
        "CONCIERGE_WORKER_WEB_PORT": str(ports["worker"]),
        "CONCIERGE_RECRUITMENT_STATUS_PORT": str(ports["recruitment"]),
        # the signal monitor is a service of its own, as deployed: the API forwards to it
        "CONCIERGE_MONITOR_PORT": str(ports["monitor"]),
        "CONCIERGE_SURVEILLANCE_MONITOR_URL": f"http://127.0.0.1:{ports['monitor']}",
        "CONCIERGE_RECRUITMENT_EMAIL_ENABLED": "false",
        "CONCIERGE_STREAM_TRIAL_SYNC_SECONDS": "0.5",
        "CONCIERGE_AUDIT_ANCHOR_SECONDS": "0",
        "CONCIERGE_LOG_FORMAT": "json",
    }


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("metrics-stack")
    prefix = f"t-metrics-{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix)
    ports = {name: free_port() for name in SERVICES}
    env = _env(kafka_bootstrap, prefix, root / "home", ports)
    stack = Stack(
        prefix,
        api=f"http://127.0.0.1:{ports['api']}",
        worker=f"http://127.0.0.1:{ports['worker']}",
        recruitment=f"http://127.0.0.1:{ports['recruitment']}",
        monitor=f"http://127.0.0.1:{ports['monitor']}",
    )
    stack.procs = {
        "api": Proc("api", ["api"], root / "api.log"),
        "worker": Proc("worker", ["worker", "--loglevel", "info"], root / "worker.log"),
        "recruitment": Proc(
            "recruitment", ["recruitment", "run", "--log-level", "INFO"], root / "recruitment.log"
        ),
        "monitor": Proc("monitor", ["monitor"], root / "monitor.log"),
    }
    try:
        for proc in stack.procs.values():
            proc.start(env)
        stack.wait_ready()
        yield stack
    finally:
        for proc in stack.procs.values():
            proc.stop()


def _bundle() -> dict[str, Any]:
    """A patient with a name and an NHS number, and a condition: the identifiers the logs and
    labels must never show."""
    patient = {
        "resourceType": "Patient",
        "id": PATIENT_ID,
        "meta": {"versionId": "1", "lastUpdated": "2026-11-01T10:00:00Z"},
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS_NUMBER}],
        "name": [{"family": FAMILY, "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1961-04-12",
        "address": [{"postalCode": "LS1 4AP"}],
    }
    condition = {
        "resourceType": "Condition",
        "id": CONDITION_ID,
        "meta": {"versionId": "1", "lastUpdated": "2026-11-01T10:00:00Z"},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "onsetDateTime": "2020-02-01",
    }
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"Patient/{PATIENT_ID}", "resource": patient},
            {"fullUrl": f"Condition/{CONDITION_ID}", "resource": condition},
        ],
    }


def _value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


def _request_count(stack: Stack, route: str, method: str) -> float:
    samples = stack.scrape("api")
    return _value(
        samples,
        "concierge_http_request_duration_seconds_count",
        service="api",
        route=route,
        method=method,
    )


def _lags(samples: dict[str, Any], topic: str) -> dict[str, float]:
    return {
        labels["partition"]: value
        for labels, value in samples.get("concierge_consumer_lag_messages", [])
        if labels["topic"] == topic
    }


def _wait_lag_zero(stack: Stack, service: str, topic: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    lags: dict[str, float] = {}
    while time.monotonic() < deadline:
        samples = stack.scrape(service)
        lags = _lags(samples, topic)
        if lags and all(v == 0 for v in lags.values()):
            return samples
        time.sleep(0.5)
    raise AssertionError(f"{service}: lag on {topic} not 0 after {timeout} s: {lags}")


@pytest.fixture(scope="module")
def ingested(stack: Stack) -> Stack:
    """An ingest through the API (a Bundle, a PUT naming an id, a dead letter), then every
    service caught up again."""
    headers = stack.source()
    response = httpx.post(f"{stack.api}/fhir", json=_bundle(), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert all(s.startswith("20") for s in statuses), statuses
    updated = _bundle()["entry"][1]["resource"] | {
        "meta": {"versionId": "2"},
        "onsetDateTime": "2020-03-01",
    }
    response = httpx.put(
        f"{stack.api}/fhir/Condition/{CONDITION_ID}", json=updated, headers=headers, timeout=30
    )
    assert response.status_code in (200, 201), response.text
    bad = {"resourceType": "Patient", "id": DEAD_ID, "birthDate": "not-a-date"}
    response = httpx.put(f"{stack.api}/fhir/Patient/{DEAD_ID}", json=bad, headers=headers)
    assert response.status_code == 422, response.text
    stack.wait_ready()
    return stack


def test_lag_per_partition_goes_to_zero_on_every_service(ingested: Stack) -> None:
    facts = ingested.prefix + FACTS
    api = _wait_lag_zero(ingested, "api", facts)
    assert set(_lags(api, facts)) == {str(p) for p in range(6)}
    worker = _wait_lag_zero(ingested, "worker", facts)
    assert set(_lags(worker, facts)) == {str(p) for p in range(6)}  # the one worker holds all
    recruitment = _wait_lag_zero(ingested, "recruitment", facts)
    assert _lags(recruitment, ingested.prefix + COHORT)  # it reads the cohort topic too
    for name, samples in (("api", api), ("worker", worker), ("recruitment", recruitment)):
        ready = [v for labels, v in samples["concierge_reader_ready"] if labels["service"] == name]
        assert ready and all(v == 1 for v in ready), (name, samples["concierge_reader_ready"])
    # what went in came out: produced by the API, consumed by the API's view and the worker
    produced = _value(api, "concierge_messages_produced_total", topic=facts)
    assert produced >= 2  # the Bundle's patient batch, the PUT
    assert _value(api, "concierge_messages_consumed_total", reader="facts", topic=facts) >= produced
    assert _value(worker, "concierge_messages_consumed_total", topic=facts) >= produced
    assert _value(worker, "concierge_worker_partitions") == 6
    assert _value(api, "concierge_ingested_resources_total", outcome="accepted") >= 3
    assert _value(api, "concierge_deadletters_total", service="api") == 1
    # the deployment's figure, from the broker: the topic holds that one letter (asked at most
    # every 15 s, so an earlier scrape may still show the size it found then)
    letters = ingested.prefix + DEADLETTER
    deadline = time.monotonic() + 30
    while _value(api, "concierge_topic_messages", topic=letters) < 1:
        assert time.monotonic() < deadline, api.get("concierge_topic_messages")
        time.sleep(1)
        api = ingested.scrape("api")
    assert _value(api, "concierge_topic_messages", topic=letters) == 1
    assert _value(api, "concierge_snapshot_rows", table="conditions") >= 1
    assert "concierge_snapshot_bytes" in api  # frames are built at the first answer (below)
    monitor = ingested.scrape("monitor")  # the signal monitor's own service
    assert "concierge_signals" in monitor
    assert "concierge_saved_questions" in api


def test_a_request_moves_its_route_templates_histogram(ingested: Stack) -> None:
    route = "/fhir/{resource_type}/{resource_id}"
    before = _request_count(ingested, route, "PUT")
    assert before >= 2  # the fixture's PUTs
    updated = _bundle()["entry"][1]["resource"] | {
        "meta": {"versionId": "3"},
        "onsetDateTime": "2020-04-01",
    }
    response = httpx.put(
        f"{ingested.api}/fhir/Condition/{CONDITION_ID}",
        json=updated,
        headers=ingested.source(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert _request_count(ingested, route, "PUT") == before + 1
    samples = ingested.scrape("api")
    buckets = [
        (labels["le"], v)
        for labels, v in samples["concierge_http_request_duration_seconds_bucket"]
        if labels["route"] == route and labels["method"] == "PUT" and labels["status"] == "200"
    ]
    inf = [v for le, v in buckets if le == "+Inf"]
    assert inf and inf[0] >= 1, buckets
    # an answer route: a sponsor's question is timed by outcome too
    sponsor = issue(TOKEN_KEY.encode(), "sponsor", "pharma")
    criteria = json.loads((ROOT / "docs/examples/criteria/t2dm-sglt2.json").read_text())
    response = httpx.post(
        f"{ingested.api}/v1/feasibility/ask",
        json=criteria,
        headers={"Authorization": f"Bearer {sponsor}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text  # every view is ready (the fixture)
    samples = ingested.scrape("api")
    answers = samples["concierge_answer_duration_seconds_count"]
    assert (
        {"service": "api", "route": "/v1/feasibility/ask", "outcome": "answered"},
        1.0,
    ) in answers, answers
    assert _value(samples, "concierge_snapshot_bytes") > 0  # the answer built the frames


def test_no_identifier_in_any_label(ingested: Stack) -> None:
    for service in SERVICES:
        text = ingested.text(service)
        for identifier in IDENTIFIERS:
            assert identifier not in text, (service, identifier)
        routes = set(re.findall(r'route="([^"]*)"', text))
        assert all("secret" not in r for r in routes), routes


def test_every_log_line_is_json_without_identifiers(ingested: Stack) -> None:
    for name, proc in ingested.procs.items():
        lines = [line for line in proc.log.read_text().splitlines() if line.strip()]
        assert lines, f"{name} logged nothing"
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise AssertionError(f"{name}: not JSON: {line[:300]}") from None
            assert {"time", "level", "logger", "message"} <= record.keys(), line
            for identifier in IDENTIFIERS:
                assert identifier not in line, (name, identifier, line[:300])


def test_the_grafana_dashboard_queries_only_metrics_that_exist(ingested: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert expressions
    queried = {
        name for expr in expressions for name in re.findall(r"\b(concierge_[a-z_]+)\b", expr)
    }
    scraped: set[str] = set()
    for service in SERVICES:
        scraped |= set(ingested.scrape(service))
    missing = queried - scraped
    assert not missing, f"the dashboard queries metrics no service exposes: {sorted(missing)}"
    # the four things an operator watches are all there
    for family in (
        "concierge_consumer_lag_messages",
        "concierge_messages_consumed_total",
        "concierge_http_request_duration_seconds_bucket",
        "concierge_deadletters_total",
    ):
        assert family in queried, family


def test_every_service_answers_its_liveness_probe(stack: Stack) -> None:
    for service in SERVICES:
        response = httpx.get(stack.url(service) + "/healthz", timeout=5)
        assert response.status_code == 200 and response.json() == {"ok": True}, service
