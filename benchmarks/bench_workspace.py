"""The sponsor workspace over a large snapshot: site selection, criterion impact and the cohort
profile, p50 and p99, each beside the plain ad hoc answer to the same question in the same run.

The question is :data:`benchmarks.bench_adhoc.QUESTION` (six criteria: four inclusion steps,
two exclusion steps). Each output is what its route answers
(:class:`feasibility.workspace.service.Workspace`), in this process without HTTP:

- **profile** (``POST /v1/feasibility/profile``): the engine's evaluation, the exact sets,
  age bands by sex and region, one disclosure-control plan with the funnel;
- **impact** (``POST /v1/feasibility/impact``): the same, with the cohort for every step
  removed (six more published sets);
- **sites** (``GET /v1/feasibility/saved-questions/{id}/sites``): the question registered as a
  saved question, its live cohort in the cohort view (the engine's members, as the stream
  would hold them), a cohort history of 30 days in which a third of the members arrived over
  the last 20, and recruitment at the two largest sites (candidates, invitations, consents,
  enrolments); per site the eligible count, arrivals, rates and a projection;
- the **baseline** (``POST /v1/feasibility/answer``): the plain ad hoc answer, engine and
  funnel, sites and regions under disclosure control
  (:meth:`feasibility.service.FeasibilityService.answer`).

Every repeat uses a fresh publication registry (SQLite in memory) and query budget, so each
answer is a first publication, as a sponsor's first ask is (re-reading an unchanged one is a
cheaper republication); the four calls of a repeat run in a rotating order so drift on the
shared machine hits each alike. Counts must agree between the baseline and every output.

    python -m benchmarks.build_snapshot var/bench-home/snapshot-1000000 --patients 1000000
    python -m benchmarks.bench_workspace var/bench-home/snapshot-1000000 --repeats 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks.bench_adhoc import QUESTION
from benchmarks.common import write_result
from core.contracts.invitations import RecruitmentBySite
from feasibility.criteria import parse_question
from feasibility.disclosure.budget import QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.live import CohortView
from feasibility.saved import SavedQuestions, SavedTrial, TrialCreate
from feasibility.service import FeasibilityService
from feasibility.snapshot import ColumnarSnapshot
from feasibility.workspace.history import AnswerHistory, CohortHistory
from feasibility.workspace.service import Workspace
from infra.mirror import ReaderStatus

ORG = "Bench Pharma"
TRIAL = "bench-ws"


def _ready(name: str) -> ReaderStatus:
    """A view filled here by hand: complete by construction (no broker in this benchmark)."""
    return ReaderStatus(
        name=name,
        ready=True,
        connected=True,
        caught_up=True,
        lag=0,
        staleness_seconds=0.0,
        positions={},
        waiting_for=None,
        error=None,
    )


class _Saved(SavedQuestions):
    """The real registry of saved questions, published to memory instead of the trials topic."""

    def __init__(self) -> None:
        super().__init__("unused:0", "unused.trials")

    def _publish(self, record: SavedTrial) -> None:
        self._absorb(record.to_json())

    def readiness(self) -> ReaderStatus:
        return _ready("trials")


class _Cohorts(CohortView):
    """The real cohort view, not started: its records are the engine's members."""

    def __init__(self) -> None:
        super().__init__("unused:0", "unused.cohort")

    def readiness(self) -> ReaderStatus:
        return _ready("cohorts")


def percentile(samples: list[float], p: float) -> float:
    """Nearest rank (with 40 samples, p99 is the largest)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", help="a folder written by benchmarks.build_snapshot")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--at", default=None, help="evaluation date (default: the snapshot's)")
    options = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    snapshot = ColumnarSnapshot.load_parquet(options.snapshot)
    loaded = time.perf_counter() - started
    meta = json.loads((Path(options.snapshot) / "meta.json").read_text())
    as_of = options.at or meta.get("as_of") or date.today().isoformat()
    at = datetime.combine(date.fromisoformat(str(as_of)[:10]), datetime.min.time(), UTC)
    at += timedelta(hours=12)
    question = parse_question(QUESTION)
    lock = threading.Lock()
    saved = _Saved()
    cohorts = _Cohorts()

    def service(registry: PublicationRegistry) -> FeasibilityService:
        return FeasibilityService(
            snapshot=snapshot,
            lock=lock,
            engine=PolarsEngine(),
            policy=DisclosurePolicy(),
            registry=registry,
            budget=QueryBudget(registry.engine, max_queries=10**6, lockout_after=10**6),
            saved=saved,
            cohorts=cohorts,
            clock=lambda: at,
            answers=AnswerHistory(registry.engine),
        )

    # The saved question, its live cohort and its history (set up once, not timed).
    setup = service(PublicationRegistry("sqlite://"))
    plain, _ = setup.answer(question, ORG, charge=False)
    by_site = {s: c for s, c in plain["by_site"].items() if not c["suppressed"]}
    recruiting = sorted(by_site, key=lambda s: -by_site[s]["value"])[:2]
    record = saved.register(
        TrialCreate(
            id=TRIAL,
            title=question.title or "benchmark",
            criteria=question,
            recruiting_sites=recruiting,
            target=max(50, plain["total"]["value"] or 0),
        ),
        ORG,
    )
    steps = setup.evaluate(question, at)
    members = steps.filter(pl.col("member")).select("patient", "site").rows()
    cohorts.records[TRIAL] = {
        p: {"trial": TRIAL, "trial_version": record.version, "patient": p, "member": True,
            "change": 1}
        for p, _ in members
    }  # fmt: skip
    history = CohortHistory("sqlite://")
    base = (at - timedelta(days=30)).timestamp()
    rows = [
        {
            "trial": TRIAL,
            "patient": p,
            "change": 1,
            "member": True,
            "at_epoch": base if i % 3 else base + 86400 * (10 + i % 20),
        }
        for i, (p, _) in enumerate(members)
    ]
    history.absorb([r for r in rows if r["at_epoch"] == base])
    history.set_baseline(TRIAL, base - 1)
    history.absorb([r for r in rows if r["at_epoch"] > base])
    site_of = dict(members)
    candidates = {
        s: frozenset(p for p, site in members if site == s) for s in recruiting
    }  # the members at each recruiting site: what recruitment would have routed there
    invited = {s: frozenset(sorted(c)[: len(c) // 2]) for s, c in candidates.items()}
    enrolled = {s: frozenset(sorted(c)[: len(c) // 4]) for s, c in candidates.items()}
    recruitment = RecruitmentBySite(
        TRIAL,
        {"candidates": candidates, "invited": invited, "consented": enrolled, "enrolled": enrolled},
    )
    print(
        f"loaded {snapshot.patient_count} patients in {loaded:.1f} s; {len(members)} members "
        f"at {len(set(site_of.values()))} sites; recruiting at {recruiting}",
        file=sys.stderr,
    )

    outputs: dict[str, Callable[[FeasibilityService], dict[str, Any]]] = {
        "adhoc": lambda s: s.answer(question, ORG)[0],
        "sites": lambda s: Workspace(s, history).sites(ORG, record, recruitment)[0],
        "impact": lambda s: Workspace(s, history).impact(ORG, question)[0],
        "profile": lambda s: Workspace(s, history).profile(ORG, question)[0],
    }
    names = list(outputs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    #: CPU time of the process (every thread) per call: what the call costs, whatever else the
    #: shared machine runs (wall times wait for a core)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    #: each repeat's published totals: the same set, so the same cell in every output (which
    #: output comes first decides the plan, e.g. whether the total is withheld to protect a
    #: profile cell; the others republish it)
    disagreements = 0
    for n in range(options.repeats):
        current = service(PublicationRegistry("sqlite://"))
        order = names[n % len(names) :] + names[: n % len(names)]
        totals = set()
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            body = outputs[name](current)
            samples[name].append((time.perf_counter() - t0) * 1000)
            cpu[name].append((time.process_time() - c0) * 1000)
            totals.add(json.dumps(body["total"], sort_keys=True))
        disagreements += len(totals) > 1
        print(
            f"\r{n + 1}/{options.repeats} "
            + "  ".join(f"{k} {statistics.median(v):.0f} ms" for k, v in samples.items()),
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    agree = disagreements == 0
    load_after = os.getloadavg()
    base_p50 = statistics.median(samples["adhoc"])
    base_p99 = percentile(samples["adhoc"], 0.99)
    command = "python -m benchmarks.bench_workspace " + " ".join(sys.argv[1:])
    for name in ("sites", "impact", "profile"):
        ours = samples[name]
        p50, p99 = statistics.median(ours), percentile(ours, 0.99)
        result = write_result(
            f"workspace_{name}_p50",
            p50,
            "milliseconds",
            base_p50,
            {
                "patients": snapshot.patient_count,
                "criteria": 6,
                "repeats": options.repeats,
                "at": at.isoformat(),
                "members": len(members),
                "recruiting_sites": len(recruiting),
            },
            command,
            {
                "p99": round(p99, 3),
                "baseline_p99": round(base_p99, 3),
                "ratio_p99": round(p99 / base_p99, 3),
                "p99_is": f"nearest rank over {len(ours)} samples",
                "cpu_p50": round(statistics.median(cpu[name]), 3),
                "baseline_cpu_p50": round(statistics.median(cpu["adhoc"]), 3),
                "cpu_p99": round(percentile(cpu[name], 0.99), 3),
                "baseline_cpu_p99": round(percentile(cpu["adhoc"], 0.99), 3),
                "cpu_is": "CPU time of the process (all threads) per call, ms",
                "min": round(min(ours), 3),
                "baseline_min": round(min(samples["adhoc"]), 3),
                "baseline_is": "the plain ad hoc answer to the same question (engine, funnel, "
                "sites and regions under disclosure control), same run, alternating",
                "totals_agree": agree,
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in load_after],
                "snapshot_load_seconds": round(loaded, 1),
                "in_process": "no HTTP: the route's Workspace call, fresh registry per repeat",
            },
            higher_is_better=False,
        )
        print(
            json.dumps(
                {k: result[k] for k in ("name", "value", "baseline", "ratio", "p99", "ratio_p99")}
            )
        )
    if not agree:
        raise SystemExit(f"the outputs' totals disagree in {disagreements} repeats")


if __name__ == "__main__":
    main()
