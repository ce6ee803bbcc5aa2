"""One table of every benchmark figure: value, same-run baseline, ratio, target, met or not.

    python -m benchmarks.summary                 # print the table, write results/summary.md
    python -m benchmarks.summary --no-write      # print only

Reads every ``benchmarks/results/*.json`` (one per figure, written by the benchmarks) and the
targets below, which come from the issues that asked for each figure. A target is checked
against the figure's own fields, so a figure that lacks a field the target needs is shown as
"not measured", never as met. ``summary.md`` also holds the plot of answer time against
population (``population.png``) when the scaling benchmark has written its series.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

Result = Mapping[str, Any]


@dataclass(frozen=True)
class Target:
    """What an issue asked of a figure, in words and as a check (None: the figure lacks the
    fields the check needs). ``issue`` is the issue's number where known, else empty."""

    words: str
    check: Callable[[Result], bool | None]
    issue: str


def _get(result: Result, *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _at_least(path: tuple[str, ...], bound: float) -> Callable[[Result], bool | None]:
    def check(result: Result) -> bool | None:
        value = _get(result, *path)
        return None if value is None else float(value) >= bound

    return check


def _at_most(path: tuple[str, ...], bound: float) -> Callable[[Result], bool | None]:
    def check(result: Result) -> bool | None:
        value = _get(result, *path)
        return None if value is None else float(value) <= bound

    return check


def _below(path: tuple[str, ...], bound: float) -> Callable[[Result], bool | None]:
    def check(result: Result) -> bool | None:
        value = _get(result, *path)
        return None if value is None else float(value) < bound

    return check


def _all(*checks: Callable[[Result], bool | None]) -> Callable[[Result], bool | None]:
    def check(result: Result) -> bool | None:
        outcomes = [c(result) for c in checks]
        if any(o is False for o in outcomes):
            return False
        if any(o is None for o in outcomes):
            return None
        return True

    return check


def _soak_ok(result: Result) -> bool | None:
    ok = result.get("ok")
    return None if ok is None else bool(ok)


def _exponent_at_most(bound: float) -> Callable[[Result], bool | None]:
    return _at_most(("exponent",), bound)


# Targets as the issues state them (issue 16's table for the hot paths; the issue named for the
# others). Figures without a target here are listed with "-".
TARGETS: dict[str, Target] = {
    "ingest_throughput_per_core": Target(
        ">= 4x the naive fhir.resources pipeline", _at_least(("ratio",), 4.0), "16"
    ),
    "stream_throughput_per_core": Target(
        ">= 50% of consume-and-decode (>= 45k facts/CPU-s)",
        _all(_at_least(("ratio",), 0.5), _at_least(("value",), 45_000)),
        "16",
    ),
    "stream_devices_per_core": Target(">= 20k facts/CPU-s", _at_least(("value",), 20_000), ""),
    "clinician_api_p99": Target(
        ">= 2,000 req/s and p99 < 50 ms",
        _all(_below(("value",), 50.0), _at_least(("requests_per_second",), 2_000)),
        "16",
    ),
    "clinician_answer_p99": Target(
        ">= 2,000 req/s and p99 < 50 ms (saved question's live count)",
        _all(_below(("value",), 50.0), _at_least(("requests_per_second",), 2_000)),
        "16",
    ),
    "recruitment_routed_per_second": Target(
        ">= 5,000 candidates/s", _at_least(("value",), 5_000), "16"
    ),
    "recruitment_routed_per_second_postgres": Target(
        ">= 5,000 candidates/s on PostgreSQL", _at_least(("value",), 5_000), "16"
    ),
    "adhoc_answer_p50": Target(
        "whole sponsor answer p50 < 100 ms; engine <= 1.2x an index-aware hand-written query",
        _all(
            _below(("full_answer_p50_ms",), 100.0),
            _at_most(("ratio_index_aware",), 1.2),
        ),
        "16",
    ),
    "adhoc_scaling": Target(
        "time linear or better in patients (power-law exponent <= 1); <= 200 bytes/fact",
        _all(_exponent_at_most(1.0), _at_most(("bytes_per_fact",), 200)),
        "16",
    ),
    "stream_memory_per_patient": Target(
        "<= 1 KB of stream state per patient", _at_most(("value",), 1024), "16"
    ),
    "recovery": Target(
        "restart from a checkpoint faster than from offset 0 (and flat as history grows)",
        _below(("ratio",), 1.0),
        "15",
    ),
    "scale_workers": Target(
        "2 workers > 1 worker in facts/s (on 2 cores)", _at_least(("ratio",), 1.0), "15"
    ),
    "freshness_live_count_p99": Target("p99 < 1 s", _below(("value",), 1.0), ""),
    "freshness_signal_statistic_p99": Target("p99 < 1 s", _below(("value",), 1.0), ""),
    "followup_safety_event_p99": Target(
        "p99 within seconds (< 5 s) from /fhir to the notification queued, at >= 950 of the "
        "1,000 resources/s of background asked",
        _all(_below(("value",), 5.0), _at_least(("parameters", "achieved_rate"), 950.0)),
        "19",
    ),
    "terminology_search_p99": Target("p99 < 50 ms", _below(("value",), 50.0), "13"),
    "terminology_load_seconds": Target(
        "minutes, not hours (< 1 h)", _below(("value",), 3_600), "13"
    ),
    "surveillance_simulation": Target(
        "family-wise false-signal rate <= 5%", _at_most(("value",), 0.05), "17"
    ),
    "surveillance_simulation_monthly": Target(
        "family-wise false-signal rate <= 5%", _at_most(("value",), 0.05), "17"
    ),
    "soak": Target("every sampled figure bounded; nothing left running", _soak_ok, "10"),
}


def load_results(folder: Path = RESULTS) -> list[dict[str, Any]]:
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise SystemExit(f"{path}: not JSON ({exc})") from exc
        if isinstance(data, dict) and "name" in data:
            results.append(data)
    return results


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def verdict(result: Result) -> tuple[str, str]:
    """(target in words, "met" | "NOT met" | "not measured" | "-")."""
    target = TARGETS.get(str(result["name"]))
    if target is None:
        return "-", "-"
    outcome = target.check(result)
    # the issue that asked for it, where known (older figures' targets came from stops whose
    # issue numbers the result files do not record)
    words = f"{target.words} (issue {target.issue})" if target.issue else target.words
    if outcome is None:
        return words, "not measured"
    return words, "met" if outcome else "NOT met"


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    table = []
    for result in results:
        words, status = verdict(result)
        value = result.get("value")
        if value is None and result["name"] == "soak":
            value = "ok" if result.get("ok") else "failed"
        table.append(
            [
                str(result["name"]),
                _number(value),
                str(result.get("unit") or "-"),
                _number(result.get("baseline")),
                _number(result.get("ratio")),
                words,
                status,
                str(result.get("date", "-"))[:10],
            ]
        )
    return table


HEADER = ["figure", "value", "unit", "baseline (same run)", "ratio", "target", "status", "date"]


def text_table(table: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(HEADER)
    ]
    # the target column can be long: cap it so the table stays readable in a terminal
    widths[2] = min(widths[2], 22)
    widths[5] = min(widths[5], 60)

    def line(cells: list[str]) -> str:
        return "  ".join(
            (c if len(c) <= widths[i] else c[: widths[i] - 1] + "…").ljust(widths[i])
            for i, c in enumerate(cells)
        ).rstrip()

    out = [line(HEADER), line(["-" * w for w in widths])]
    out.extend(line(r) for r in table)
    return "\n".join(out)


def markdown_table(table: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    out.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table)
    return "\n".join(out)


def plot_population(results: list[dict[str, Any]], png: Path) -> Path | None:
    """Answer time against population (log-log) from every result carrying a ``series`` of
    points with ``patients`` and ``p50_ms``; None when there is none."""
    series = [
        r
        for r in results
        if isinstance(r.get("series"), list)
        and r["series"]
        and all("patients" in p and "p50_ms" in p for p in r["series"])
    ]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; PNG only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for result in series:
        points = sorted(result["series"], key=lambda p: p["patients"])
        xs = [p["patients"] for p in points]
        ax.plot(xs, [p["p50_ms"] for p in points], marker="o", label=f"{result['name']} p50")
        if all("p99_ms" in p for p in points):
            ax.plot(
                xs,
                [p["p99_ms"] for p in points],
                marker="^",
                linestyle="--",
                label=f"{result['name']} p99",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("patients")
    ax.set_ylabel("answer time (ms)")
    ax.set_title("Ad hoc answer time against population")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def write_markdown(results: list[dict[str, Any]], folder: Path = RESULTS) -> Path:
    table = rows(results)
    met = sum(1 for r in table if r[6] == "met")
    not_met = [r[0] for r in table if r[6] == "NOT met"]
    unmeasured = [r[0] for r in table if r[6] == "not measured"]
    parts = [
        "# Benchmark summary",
        "",
        "Written by `python -m benchmarks.summary` (the last step of `bash benchmarks/run.sh`)"
        " from the result files beside it. Each figure's baseline ran in the same run; the"
        " command and machine load of each are in its JSON.",
        "",
        f"Targets met: {met}; not met: {', '.join(not_met) or 'none'};"
        f" not measured: {', '.join(unmeasured) or 'none'}.",
        "",
        markdown_table(table),
        "",
    ]
    png = plot_population(results, folder / "population.png")
    if png is not None:
        parts += [
            "## Time against population",
            "",
            f"![answer time against population]({png.name})",
            "",
        ]
    else:
        parts += [
            "## Time against population",
            "",
            "No scaling series has been measured yet (a result with a `series` of"
            " `patients`/`p50_ms` points).",
            "",
        ]
    path = folder / "summary.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    if not results:
        raise SystemExit(f"no results in {args.results}")
    print(text_table(rows(results)))
    if not args.no_write:
        print(f"\nwritten: {write_markdown(results, args.results)}")


if __name__ == "__main__":
    main()
