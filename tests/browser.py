"""A real headless Chromium for page tests, driven by Selenium through Debian's chromedriver.

``scripts/test.sh`` installs ``chromium`` and ``chromium-driver`` (``scripts/chromium.sh``) and
exports their paths; outside it the binaries are looked up on ``PATH``. Under ``CI`` a missing
browser fails the test rather than skipping it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(os.environ.get("CONCIERGE_TEST_ARTIFACTS", "test-artifacts"))


def _binary(variable: str, name: str) -> str | None:
    return os.environ.get(variable) or shutil.which(name)


@contextmanager
def chromium(
    width: int = 1400,
    height: int = 1000,
    arguments: tuple[str, ...] = (),
    capabilities: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """A headless Chromium WebDriver session, quit on exit (extra command-line ``arguments``
    and ``capabilities``, e.g. a performance log, when a test needs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = _binary("CONCIERGE_CHROMIUM", "chromium")
    driver_path = _binary("CONCIERGE_CHROMEDRIVER", "chromedriver")
    if not browser or not driver_path:
        message = "Chromium/chromedriver not found: run scripts/chromium.sh (Debian packages)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        *arguments,
    ):
        options.add_argument(argument)
    for name, value in (capabilities or {}).items():
        options.set_capability(name, value)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """Save a PNG of the page under ``test-artifacts/`` and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the page may still be loading
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or predicate}: last {last!r}")


def page_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.TAG_NAME, "body").text
    return text
