"""The regulator's dashboard in a real headless Chromium, against the real regulator API.

``regulator_stack`` (tests/integration/conftest.py) runs the API over a population with one
faulty model; this test serves the dashboard with ``concierge dashboard`` as a subprocess, finds
the faulty model signalled in the live table, opens its detail view and checks the observed vs
expected chart is drawn. The page is saved to ``test-artifacts/regulator-dashboard.png``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import chromium, page_text, screenshot, wait_for

pytestmark = pytest.mark.integration

#: The element wrapping the observed-vs-expected chart (``st.container(key="observed-expected")``).
CHART = ".st-key-observed-expected .vega-embed canvas, .st-key-observed-expected .vega-embed svg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def dashboard_url(regulator_stack: Any, tmp_path: Path) -> Iterator[str]:
    """``concierge dashboard`` serving on a free port; stopped after the test."""
    port = free_port()
    log = tmp_path / "dashboard.log"
    command = [
        sys.executable,
        "-m",
        "concierge",
        "dashboard",
        "--port",
        str(port),
        "--api-url",
        regulator_stack.api_url,
        "--token",
        regulator_stack.token,
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=regulator_stack.env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"concierge dashboard exited {process.returncode}:\n{_tail(log)}")
            return httpx.get(f"{url}/_stcore/health", timeout=2).text.strip() == "ok"

        wait_for(healthy, timeout=60, what=f"the dashboard to serve at {url}")
        assert url in log.read_text(errors="replace"), "the command prints its URL"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _signalled_outcome(driver: Any, node: str) -> str | None:
    """The outcome of the live table's row for ``node`` in the state signalled, if any."""
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.CSS_SELECTOR, ".st-key-signal-table table")
    header = [cell.text for cell in table.find_elements(By.CSS_SELECTOR, "thead th")]
    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr"):
        texts = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
        cells = dict(zip(header, texts, strict=True))
        if cells.get("Node") == node and cells.get("State") == "signalled":
            return cells.get("Outcome")
    return None


def _choose_signal(driver: Any, label: str) -> None:
    """Open the signal chooser and click the option ``label`` (``node · outcome``)."""
    from selenium.webdriver.common.by import By

    def choose() -> bool:
        # The live table redraws every few seconds: find and click in one go, retry if stale.
        options = driver.find_elements(By.CSS_SELECTOR, "[role='option']")
        if not options:
            driver.find_element(By.CSS_SELECTOR, ".st-key-signal input[role='combobox']").click()
            return False
        for item in options:
            if item.text == label:
                item.click()
                return True
        return False

    wait_for(choose, timeout=30, what=f"the chooser's option {label!r}")


def test_regulator_dashboard_shows_the_faulty_signal(
    regulator_stack: Any, dashboard_url: str
) -> None:
    node = regulator_stack.faulty_node
    with chromium(height=2200) as driver:
        driver.get(dashboard_url)
        wait_for(
            lambda: node in page_text(driver) and "signalled" in page_text(driver),
            timeout=120,
            what=f"{node} signalled in the live signal table",
        )
        outcome = wait_for(
            lambda: _signalled_outcome(driver, node),
            timeout=30,
            what=f"the table's row for {node} in the state signalled",
        )
        screenshot(driver, "regulator-dashboard-signals")  # the live, ranked table
        _choose_signal(driver, f"{node} · {outcome}")

        from selenium.webdriver.common.by import By

        wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, CHART),
            timeout=60,
            what="the observed vs expected chart",
        )
        # Streamlit draws the detail top-down: the chart can be there before the sections below
        sections = ("Observed vs expected", "Disproportionality", "Drill-down", "Provenance")
        wait_for(
            lambda: all(section in page_text(driver) for section in sections),
            timeout=60,
            what=f"the detail's sections {sections}",
        )
        assert f"{node} · {outcome}" in page_text(driver)  # the detail view's heading
        assert "signal=" in driver.current_url  # the choice is in the URL, to share
        time.sleep(1)  # let Vega finish drawing before the picture
        chart = driver.find_elements(By.CSS_SELECTOR, CHART)[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", chart)
        time.sleep(0.5)
        screenshot(driver, "regulator-dashboard")  # the detail: observed vs expected and more


#: The tree scan's chart (``st.container(key="tree-scan")``).
SCAN_CHART = ".st-key-tree-scan .vega-embed canvas, .st-key-tree-scan .vega-embed svg"


def test_the_tree_scan_chart_and_a_signal_report_in_the_browser(
    regulator_stack: Any, dashboard_url: str
) -> None:
    """The dashboard draws the tree scan over the device hierarchy; the signal's report page
    (``/v1/surveillance/signals/{id}/report``) shows the numbers the API gives."""
    from selenium.webdriver.common.by import By

    from surveillance_stream.report import fmt

    headers = {"Authorization": f"Bearer {regulator_stack.token}"}
    api = regulator_stack.api_url
    scanned = httpx.post(f"{api}/v1/surveillance/scan", json={"seed": 5}, headers=headers,
                         timeout=120)  # fmt: skip
    assert scanned.status_code == 200, scanned.text
    top = scanned.json()["top"][0]
    rows = regulator_stack.signals()
    target = next(r for r in rows if r["node"] == regulator_stack.faulty_node and r["signal"])
    detail = httpx.get(f"{api}/v1/surveillance/signals/{target['id']}", headers=headers,
                       timeout=30).json()  # fmt: skip
    with chromium(height=2400) as driver:
        driver.get(dashboard_url)
        wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, SCAN_CHART),
            timeout=120,
            what="the tree scan's chart",
        )
        text = page_text(driver)
        assert "Tree-based scan over the device hierarchy" in text
        assert "Deploy" not in text  # Streamlit's developer toolbar is hidden
        chart = driver.find_elements(By.CSS_SELECTOR, SCAN_CHART)[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", chart)
        time.sleep(1)
        screenshot(driver, "regulator-dashboard-scan")
        assert top["llr"] > 0

        # the report page, with the regulator's token on every request (DevTools protocol)
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
        driver.get(f"{api}/v1/surveillance/signals/{target['id']}/report")
        wait_for(lambda: "Device-safety signal report" in page_text(driver), timeout=30,
                 what="the report page")  # fmt: skip
        report = page_text(driver)
        maxsprt = detail["assessment"]["maxsprt"]
        for number in (fmt(maxsprt["llr"]), fmt(maxsprt["expected"]),
                       fmt(maxsprt["expected_crude"]), fmt(maxsprt["cv"])):  # fmt: skip
            assert number in report, number
        assert target["node"] in report
        charts = driver.find_elements(By.CSS_SELECTOR, "#chart-observed-expected svg polyline")
        assert len(charts) >= 2  # observed and expected lines drawn
        screenshot(driver, "signal-report")
