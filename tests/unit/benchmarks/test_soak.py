"""The soak's own parts: lags found in readiness answers, error lines counted from an offset,
memory of a real process tree from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.soak import (
    Series,
    _children_map,
    alive,
    descendants,
    errors_since,
    lag_of,
    rss_bytes,
)


def test_the_largest_lag_anywhere_in_a_readiness_answer() -> None:
    assert lag_of({"ready": True, "lag_messages": 0}) == 0
    body = {"ready": False, "parts": {"facts": {"lag": 12}, "cohorts": {"lag_messages": 40}}}
    assert lag_of(body) == 40
    assert lag_of({"ready": True, "waiting_for": []}) is None  # no lag reported: none invented
    assert lag_of({"lagging": True}) is None  # a flag is not a lag


def test_error_lines_are_counted_from_where_the_soak_began(tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    log.write_text("2026 ERROR old trouble\n")
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write("INFO fine\n2026 ERROR new trouble\nTraceback (most recent call last):\n")
        f.write("  File x\nERRORS is not ERROR? it is: ERROR\n")
    count, first = errors_since(log, offset)
    assert count == 3 and first[0] == "2026 ERROR new trouble"
    assert errors_since(tmp_path / "missing.log", 0) == (0, [])


def test_memory_of_a_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = descendants(os.getpid(), _children_map())
        assert os.getpid() in tree and child.pid in tree
        assert (rss_bytes(child.pid) or 0) > 1_000_000 and alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid) and rss_bytes(child.pid) is None
    series = Series()
    for v in (3.0, 1.0, 2.0):
        series.add(v)
    series.add(None)
    assert series.summary() == {"samples": 3, "min": 1.0, "max": 3.0, "last": 2.0}
