"""``/docs`` and ``/redoc`` work offline: a real headless Chromium that can resolve no host but
127.0.0.1 renders the API's operations, and every request the pages make goes to the API.

The app (``concierge.api.create_app``, no broker needed: feed, recruitment and monitor off) is
served by uvicorn on a free port. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from selenium.webdriver.common.by import By

from concierge.api import create_app
from concierge.docs_offline import REDOC_JS, STATIC_PATH
from core.settings import Settings
from fhir_adapters.pipeline import Ingestor
from fhir_adapters.pseudonym import Pseudonymiser
from fhir_adapters.rest import IngestService
from fhir_adapters.sinks import MemorySink
from fhir_adapters.vault import MemoryVault
from tests.browser import chromium, screenshot, wait_for
from tests.faults import free_port


@pytest.fixture
def base(tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        home=tmp_path / "home",
        kafka_bootstrap_servers="127.0.0.1:1",
        feasibility_feed=False,
        recruitment_api=False,
        surveillance_monitor=False,
    )
    ingestor = Ingestor(MemoryVault(), MemorySink(), Pseudonymiser(b"p" * 32), "urn:test")
    app = create_app(settings, ingest_service=IngestService(ingestor))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def offline_chromium() -> Iterator[Any]:
    """Headless Chromium that resolves no host name (as offline) and logs every request."""
    with chromium(
        arguments=("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",),
        capabilities={"goog:loggingPrefs": {"performance": "ALL"}},
    ) as driver:
        yield driver


def requested(driver: Any) -> list[str]:
    """Every URL the browser asked for since the last call (from the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def elsewhere(urls: list[str]) -> list[str]:
    """URLs for any host but 127.0.0.1 (data: URLs are inline; blob: URLs name their origin)."""
    return [
        u
        for u in urls
        if not u.startswith("data:") and urlsplit(u.removeprefix("blob:")).hostname != "127.0.0.1"
    ]


def test_swagger_ui_renders_the_operations_offline(base: str, offline_chromium: Any) -> None:
    driver = offline_chromium
    driver.get(f"{base}/docs")
    operations = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"),
        timeout=60,
        what="the operations list",
    )
    paths = {op.text.replace("\u200b", "") for op in operations}
    assert {"/healthz", "/fhir/{resource_type}"} <= paths, paths
    assert "/v1/feasibility/ask" in paths
    assert "Trial concierge" in driver.title
    screenshot(driver, "docs-offline-swagger")
    urls = requested(driver)
    assert f"{base}{STATIC_PATH}/swagger-ui-bundle.js" in urls
    assert f"{base}/openapi.json" in urls
    assert not elsewhere(urls), elsewhere(urls)


def test_redoc_renders_offline(base: str, offline_chromium: Any) -> None:
    driver = offline_chromium
    driver.get(f"{base}/redoc")
    wait_for(
        lambda: "/v1/feasibility/ask" in driver.find_element(By.TAG_NAME, "body").text,
        timeout=60,
        what="ReDoc's operations",
    )
    screenshot(driver, "docs-offline-redoc")
    urls = requested(driver)
    assert f"{base}{REDOC_JS}" in urls
    assert not elsewhere(urls), elsewhere(urls)


def test_the_cdn_pages_are_gone(base: str) -> None:
    page = httpx.get(f"{base}/docs").text
    assert "cdn.jsdelivr.net" not in page and "fastapi.tiangolo.com" not in page
    assert "cdn.jsdelivr.net" not in httpx.get(f"{base}/redoc").text
    assert "googleapis" not in httpx.get(f"{base}/redoc").text
    assert "cdn.redoc.ly" not in httpx.get(f"{base}{REDOC_JS}").text
    assert httpx.get(f"{base}{STATIC_PATH}/swagger-ui.css").status_code == 200
    assert "/docs" not in httpx.get(f"{base}/openapi.json").json()["paths"]
