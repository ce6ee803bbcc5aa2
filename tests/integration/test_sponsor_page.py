"""The sponsor page in headless Chromium, on the real broker with a real worker.

A sponsor builds a three-step question by clicking and typing (a SNOMED CT concept found by
search, descendants included; an age range; an ICD-10 exclusion), gets the answer (funnel,
sites, profile, criterion impact), registers it as a saved question and watches its live count
change as more patients stream in, with the forecast and the site ranking beside it. Each stage
is screenshotted into ``test-artifacts/``. Withheld cells must read "withheld", never a number.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from concierge.api import create_app
from concierge.commands.generate import bundle
from core.auth import issue
from core.settings import Settings
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import KafkaSink
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from terminology.store import TerminologyStore

from ..browser import chromium, page_text, screenshot, wait_for
from ..faults import free_port
from ..terminology_fixtures import RELEASE_2025
from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRIAL = "page-dm-001"
#: A diabetes diagnosis in a synthetic patient's record (ICD-10 E10/E11 beside the SNOMED CT)
DIABETES = re.compile(r'"E1[01]')


@pytest.fixture
def settings(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        home=tmp_path / "home",
        source_system="urn:test:ehr",
        recruitment_api=False,
        surveillance_monitor=False,
        audit_anchor_seconds=0,
    )


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        settings.kafka_bootstrap_servers,
        settings.topic_prefix,
        tmp_path / "worker-home",
        tmp_path / "worker.log",
    )
    proc.env["CONCIERGE_STREAM_TRIAL_SYNC_SECONDS"] = "0.5"
    yield proc
    proc.stop()


@pytest.fixture
def served(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The API over the real broker, served by uvicorn on a free port. Rates and forecasts
    from any length of history (the default waits 24 h), so the page's forecast can be seen."""
    monkeypatch.setenv("CONCIERGE_DC_RATE_MIN_HISTORY_HOURS", "0")
    settings.home.mkdir(parents=True, exist_ok=True)
    TerminologyStore(f"sqlite:///{settings.home / 'terminology.db'}").load(RELEASE_2025)
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.config.port}"
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 90, what="/readyz")
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def _count(driver: Any, element: str) -> str:
    return str(driver.find_element(By.ID, element).text.strip())


def _no_withheld_number(driver: Any) -> None:
    """Every withheld mark reads 'withheld' and carries no number beside it."""
    for mark in driver.find_elements(By.CSS_SELECTOR, ".withheld-text, text.withheld"):
        assert mark.text.strip() in ("withheld", ""), mark.text


def test_a_sponsor_builds_asks_registers_and_watches_the_live_count(
    settings: Settings, worker: WorkerProcess, served: str
) -> None:
    # diabetics and others of a synthetic population, so the cohort is large enough to be shown
    # (a cohort under the threshold would read "withheld" and prove nothing about its moving)
    config = GeneratorConfig(patients=3600, seed=3)
    diabetic, other = [], []
    for record in iter_patients(config):
        (diabetic if DIABETES.search(json.dumps(record)) else other).append(record)
    assert len(diabetic) >= 150, len(diabetic)
    half = len(diabetic) // 2
    first_wave = diabetic[:half] + other[:60]
    second_wave = diabetic[half:] + other[60:120]
    ingestor = build_ingestor(
        settings, sink=KafkaSink(settings.kafka_bootstrap_servers, settings.topic_prefix)
    )
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in first_wave:
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()
    worker.start()
    key = settings.token_key.get_secret_value().encode()
    token = issue(key, "sponsor", "Acme Pharma")
    # the page holds no data of its own: no token, no count, nothing fetched from elsewhere
    page = httpx.get(f"{served}/sponsor")
    assert (
        page.status_code == 200 and "script-src 'sha256-" in page.headers["content-security-policy"]
    )
    assert not re.search(r"(src|href)=[\"']?https?://", page.text)

    with chromium(width=1500, height=1500) as driver:
        driver.get(f"{served}/sponsor#token={token}")
        wait_for(lambda: driver.find_elements(By.ID, "step-0-search"), 20, what="the builder")
        assert "token=" not in driver.current_url
        driver.find_element(By.ID, "title").send_keys("Diabetes, adults, without CKD")

        # step 1: a diagnosis found by concept search, descendants included
        driver.find_element(By.ID, "step-0-search").send_keys("diabetes mellitus")
        driver.find_element(By.ID, "step-0-go").click()
        picks = wait_for(
            lambda: [
                b
                for b in driver.find_elements(By.CSS_SELECTOR, "#step-0-results button.pick")
                if "73211009" in b.text
            ],
            20,
            what="the concept search's results",
        )
        picks[0].click()
        wait_for(lambda: "73211009" in _count(driver, "step-0-codes"), 10, what="the chip")
        # step 2: an age range
        driver.find_element(By.ID, "add-inclusion").click()
        Select(driver.find_element(By.ID, "step-1-type")).select_by_value("age")
        driver.find_element(By.ID, "step-1-min").send_keys("18")
        driver.find_element(By.ID, "step-1-max").send_keys("95")
        # step 3: an exclusion by ICD-10 prefix
        driver.find_element(By.ID, "add-exclusion").click()
        Select(driver.find_element(By.ID, "step-2-type")).select_by_value("icd10")
        driver.find_element(By.ID, "step-2-prefix").send_keys("N18")
        screenshot(driver, "sponsor-page-1-question")

        driver.find_element(By.ID, "ask").click()
        wait_for(lambda: _count(driver, "status") == "answered", 60, what="the answer")
        text = page_text(driver)
        assert "Criterion impact" in text and "Funnel" in text
        assert driver.find_elements(By.CSS_SELECTOR, "#funnel svg text")
        assert driver.find_elements(By.CSS_SELECTOR, "#impact svg rect")
        assert driver.find_elements(By.CSS_SELECTOR, "#profile svg rect")
        total = _count(driver, "total")
        assert total == "withheld" or int(total) % 5 == 0
        _no_withheld_number(driver)
        screenshot(driver, "sponsor-page-2-answer")

        driver.find_element(By.ID, "trial-id").send_keys(TRIAL)
        target = driver.find_element(By.ID, "target")
        target.clear()
        target.send_keys("40")
        driver.find_element(By.ID, "register").click()

        def live() -> str | None:
            shown = _count(driver, "live-count")
            return shown if shown and shown != "withheld" else None

        try:
            first = wait_for(live, 90, what="the live count")
        except pytest.fail.Exception:
            # say why: the page's status line carries the API's reason, the worker its log
            pytest.fail(
                f"no live count after 90 s; the page said {_count(driver, 'status')!r} and "
                f"{_count(driver, 'error')!r}; the worker's log ends:\n{worker.tail()}"
            )
        assert int(first) % 5 == 0
        wait_for(lambda: "Site selection" in page_text(driver), 30, what="the ranking")
        wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#ranking tr td"), 30, what="ranking"
        )
        driver.execute_script("document.getElementById('live').scrollIntoView()")
        screenshot(driver, "sponsor-page-3-live")

        # more patients stream in: the live count moves on the open page
        for record in second_wave:
            ingestor.ingest_bundle(bundle(record), "test")
        ingestor.commit()
        ingestor.vault.close()
        moved = wait_for(
            lambda: (n := live()) is not None and int(n) > int(first) and n,
            120,
            what=f"the live count to move from {first}",
        )
        assert int(moved) % 5 == 0
        # the forecast and the daily series follow from the cohort's history
        # the arrivals since registration give the forecast a date and the ranking its ranks
        wait_for(lambda: "reached about" in _count(driver, "forecast"), 60, what="the forecast")
        wait_for(
            lambda: any(
                td.text.strip() == "1"
                for td in driver.find_elements(By.CSS_SELECTOR, "#ranking tr td:first-child")
            ),
            30,
            what="a ranked site",
        )
        assert driver.find_elements(By.CSS_SELECTOR, "#series svg")
        _no_withheld_number(driver)
        driver.execute_script("document.getElementById('live').scrollIntoView()")
        screenshot(driver, "sponsor-page-4-moved")

        # the demo's link: the page opens on the saved question, answered, its forecast shown
        driver.get("about:blank")
        driver.get(f"{served}/sponsor#saved={TRIAL}&token={token}")
        wait_for(lambda: _count(driver, "status") != "" and _count(driver, "total"), 60,
                 what="the saved question's answer")  # fmt: skip
        wait_for(lambda: "reached about" in _count(driver, "forecast"), 60, what="its forecast")
        assert TRIAL in _count(driver, "live-title") and "token=" not in driver.current_url
        screenshot(driver, "sponsor-page-5-opened-saved")

    # what the page showed is in the organisation's history, exportable as it was sent
    sponsor = {"Authorization": f"Bearer {token}"}
    history = httpx.get(f"{served}/v1/feasibility/history", headers=sponsor).json()["answers"]
    kinds = {a["kind"] for a in history}
    assert {"ad hoc", "profile", "impact", "saved", "sites", "forecast"} <= kinds, kinds
    rival = {"Authorization": f"Bearer {issue(key, 'sponsor', 'Rival Bio')}"}
    assert httpx.get(f"{served}/v1/feasibility/history", headers=rival).json()["answers"] == []
    sites = next(a for a in history if a["kind"] == "sites")
    assert httpx.get(f"{served}{sites['links']['csv']}", headers=rival).status_code == 404
    csv_text = httpx.get(f"{served}{sites['links']['csv']}", headers=sponsor).text
    rows = [line.split(",") for line in csv_text.splitlines()]
    assert rows[0] == ["section", "item", "measure", "display", "value"]
    for row in rows[1:]:  # a withheld cell has no value; a shown count is a rounded one
        assert (row[3], row[4]) == ("withheld", "") or row[3] == row[4] or "." in row[4], row
    report = httpx.get(f"{served}{sites['links']['report']}", headers=sponsor)
    assert report.headers["content-security-policy"].startswith("default-src 'none'")
    for part in ("Criteria", "Site selection", "Disclosure rules in force", "73211009"):
        assert part in report.text, part
    forecast = httpx.get(
        f"{served}/v1/feasibility/saved-questions/{TRIAL}/forecast", headers=sponsor
    ).json()
    assert forecast["model"] and forecast["history"]["available"] is True
    for point in forecast["series"]:
        assert point["suppressed"] or point["value"] % 5 == 0
