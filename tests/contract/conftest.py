"""The contract run's counts in the log: requests per operation and caller, and the statuses
answered (printed at the end of the run, also when it passes, and written to
``test-artifacts/openapi-contract.json``)."""

from __future__ import annotations

import pytest

from tests.contract.calls import CALLS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CALLS.total:
        return
    terminalreporter.section("OpenAPI contract (schemathesis)")
    for line in CALLS.report():
        terminalreporter.write_line(line)
