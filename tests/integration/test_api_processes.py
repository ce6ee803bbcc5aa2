"""Two API processes (``concierge api``, uvicorn, separate OS processes) behind one PostgreSQL
database and one signal monitor service (``concierge monitor``), as a cluster runs them.

* A differencing attack spread across both is defended: an honest sponsor's answer is published
  through one process; after three patients arrive the attacker asks the same criteria through
  the other, which sees the first's publication (overlap control copies the near sets: the
  attacker learns nothing of the three) and locks the attacker out (``LOCKOUT_AFTER=0``).
* The lockout earned on one process is enforced on the other.
* After concurrent audited requests to both, ``concierge audit verify`` finds one unbroken chain.
* Both forward ``/v1/surveillance`` to the monitor service and report its readiness; with the
  monitor stopped they say so (503 with ``Retry-After``), never a stale answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from concierge.commands.generate import bundle
from core.audit import AuditKeys, AuditLog
from core.auth import issue
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from tests.recruitment_helpers import fresh_database

from .surveillance_stack import ApiProcess
from .test_budget_attack import CRITERIA, newcomer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path, migrate=False) as url:
        yield url


def ready(api: ApiProcess, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{api.url}/readyz", timeout=10)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        assert time.monotonic() < deadline, f"{response.text}\n{api.tail()}"
        time.sleep(0.3)


def test_two_api_processes_share_disclosure_control_and_one_audit_chain(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, database: str
) -> None:
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "ingest-home",
        source_system="urn:test:ehr",
    )
    config = GeneratorConfig(patients=300, seed=15)
    ingestor = build_ingestor(settings)
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in iter_patients(config):
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        CONCIERGE_TOPIC_PREFIX=topic_prefix,
        CONCIERGE_AUDIT_URL=database,
        CONCIERGE_FEASIBILITY_URL=database,
        CONCIERGE_VAULT_URL=database,
        CONCIERGE_TOKEN_REVOCATION_URL=database,
        CONCIERGE_RECRUITMENT_API="false",
        CONCIERGE_DC_LOCKOUT_AFTER="0",  # the first overlap hit locks out
    )
    monitor = ApiProcess(
        {**env, "CONCIERGE_HOME": str(tmp_path / "monitor")}, tmp_path / "monitor.log",
        verb="monitor",
    )  # fmt: skip
    monitor.start()
    apis = [
        ApiProcess(
            {
                **env,
                "CONCIERGE_HOME": str(tmp_path / f"api-{name}"),
                "CONCIERGE_SURVEILLANCE_MONITOR_URL": monitor.url,
            },
            tmp_path / f"api-{name}.log",
        )
        for name in "ab"
    ]
    try:
        for api in apis:
            api.start()
        a, b = apis
        for api in apis:
            views = ready(api)["views"]
            assert views["signals"]["ready"] is True  # the monitor service's own readiness
        key = settings.token_key.get_secret_value().encode()

        def bearer(role: str, org: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {issue(key, role, org)}"}

        honest, mallory = bearer("sponsor", "Honest Trials"), bearer("sponsor", "Mallory Bio")
        regulator = bearer("regulator", "MHRA")

        # the signals, through either process, answered by the one monitor
        for api in apis:
            signals = httpx.get(f"{api.url}/v1/surveillance/signals", headers=regulator)
            assert signals.status_code == 200, signals.text
            assert httpx.get(f"{api.url}/v1/surveillance/signals").status_code == 401

        first = httpx.post(f"{a.url}/v1/feasibility/ask", json=CRITERIA, headers=honest)
        assert first.status_code == 200, first.text

        # three patients arrive; both processes read them before the attacker asks
        for i in range(3):
            ingestor.ingest_bundle(bundle(newcomer(i)), "test")
        ingestor.commit()
        ingestor.vault.close()
        time.sleep(6)  # longer than the readers' staleness bound: readiness covers them
        for api in apis:
            ready(api)
        probe = {**CRITERIA, "title": "Type 2 diabetes, again"}
        asked = httpx.post(f"{b.url}/v1/feasibility/ask", json=probe, headers=mallory)
        assert asked.status_code == 200, asked.text
        # process b matched the sets process a published: the near sets are copies, so the
        # three newcomers cannot be told by difference
        assert asked.json()["total"] == first.json()["total"]
        audit = AuditLog(database, AuditKeys.from_settings(settings))
        record = next(
            r for r in reversed(list(audit.records()))
            if r["action"] == "POST /v1/feasibility/ask" and r["org"] == "Mallory Bio"
        )  # fmt: skip
        assert json.loads(record["detail"])["overlap_hits"] > 0

        # locked out on b, so refused on a too (nothing charged)
        for api in (a, b):
            refused = httpx.post(f"{api.url}/v1/feasibility/ask", json=CRITERIA, headers=mallory)
            assert refused.status_code == 429, refused.text
            assert "Retry-After" in refused.headers
        budget = httpx.get(f"{a.url}/v1/feasibility/budget", headers=mallory).json()
        assert budget["locked"] is True
        # the honest sponsor is unaffected, through either process
        for api in apis:
            assert httpx.post(
                f"{api.url}/v1/feasibility/ask", json=CRITERIA, headers=honest
            ).is_success

        # concurrent audited requests to both processes: one chain
        before = audit.head().seq

        def hit(i: int) -> int:
            api = apis[i % 2]
            path = "/v1/feasibility/budget" if i % 3 else "/v1/surveillance/signals"
            headers = honest if i % 3 else regulator
            return httpx.get(f"{api.url}{path}", headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(hit, range(60)))
        assert set(statuses) == {200}, statuses
        # every forwarded request is audited once, by the monitor service, not twice
        assert audit.head().seq - before == 60
        verified = subprocess.run(
            [sys.executable, "-m", "concierge", "audit", "verify"],
            env={**env, "CONCIERGE_HOME": str(tmp_path / "cli")},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert verified.returncode == 0, verified.stderr
        assert "OK" in verified.stderr

        # the monitor stops: readiness says so, and signals are refused, not made up; the API
        # processes stay in rotation (every one forwards to the same monitor, and feasibility
        # does not need it), their /readyz naming the monitor under "degraded"
        monitor.stop()
        for api in apis:
            # an API asks the monitor's /readyz at most once a second (RemoteMonitor's cache):
            # within a few seconds of the monitor stopping, readiness must say so
            deadline = time.monotonic() + 5
            body = httpx.get(f"{api.url}/readyz", timeout=10).json()
            while body["views"]["signals"]["ready"] and time.monotonic() < deadline:
                time.sleep(0.2)
                body = httpx.get(f"{api.url}/readyz", timeout=10).json()
            assert body["views"]["signals"]["ready"] is False
            assert body["ready"] is True and body["waiting_for"] == []
            assert [d.split(":")[0] for d in body["degraded"]] == ["signals"]
            refused = httpx.get(f"{api.url}/v1/surveillance/signals", headers=regulator)
            assert refused.status_code == 503
            assert "Retry-After" in refused.headers
            asked = httpx.post(f"{api.url}/v1/feasibility/ask", json=CRITERIA, headers=honest)
            assert asked.is_success, asked.text
    finally:
        for api in apis:
            api.stop()
        monitor.stop()
