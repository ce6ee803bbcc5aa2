"""Shared helpers: result files, timing, environment."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(
    name: str,
    value: float,
    unit: str,
    baseline: float,
    parameters: dict[str, Any],
    command: str,
    extra: dict[str, Any] | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline": round(baseline, 3),
        "ratio": round(value / baseline, 3) if baseline else None,
        "higher_is_better": higher_is_better,
        "parameters": parameters,
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # the machine is shared: 1, 5 and 15-minute load averages when the figure was written
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        **(extra or {}),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(samples: list[float]) -> dict[str, float]:
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples)}
