"""The sponsor workspace over real stores (SQLite in memory) and a real snapshot; no broker.

Profile, criterion impact, site selection and forecast: every cell is a protected cell (shown
values are multiples of the rounding, withheld ones read ``withheld``), rates come from shown
cells only, each output is charged once and re-reading it unchanged is free, and the answers
are kept in the organisation's history.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl
import pytest
from pypdf import PdfReader
from pyroaring import BitMap

from concierge.commands.generate import bundle
from core.contracts.invitations import RecruitmentBySite
from core.settings import Settings
from feasibility.criteria import parse_question
from feasibility.disclosure.answer import AnswerSets, Breakdown, FunnelStepSets
from feasibility.disclosure.budget import QueryBudget
from feasibility.disclosure.policy import DisclosurePolicy
from feasibility.disclosure.protection import protect
from feasibility.disclosure.registry import PublicationRegistry
from feasibility.engines.polars_engine import PolarsEngine
from feasibility.render import render
from feasibility.saved import TrialCreate
from feasibility.service import FeasibilityService
from feasibility.snapshot import ColumnarSnapshot
from feasibility.workspace.export import report_html, report_pdf
from feasibility.workspace.history import AnswerHistory, CohortHistory
from feasibility.workspace.outputs import (
    AGE_BANDS,
    SEXES,
    keep_expressions,
    profile_structural,
    with_extra,
)
from feasibility.workspace.service import Workspace
from fhir_adapters.service import build_ingestor
from fhir_adapters.sinks import MemorySink
from fhir_adapters.synthetic.generator import (
    GeneratorConfig,
    iter_patients,
    iter_reference_resources,
)
from tests.api_world import MemoryCohortView, MemorySavedQuestions

AT = datetime(2026, 1, 1, 12, tzinfo=UTC)
QUESTION = parse_question(
    {
        "title": "Adults without diabetes",
        "inclusion": [{"type": "age", "min": 18}, {"type": "age", "max": 85}],
        "exclusion": [{"type": "condition", "codes": [{"system": "icd10", "prefix": "E11"}]}],
    }
)


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    home = tmp_path_factory.mktemp("workspace")
    sink = MemorySink()
    ingestor = build_ingestor(Settings(home=home, kafka_bootstrap_servers="127.0.0.1:1"), sink=sink)
    config = GeneratorConfig(patients=600, seed=5, as_of=AT.date())
    ingestor.ingest_bundle(bundle(list(iter_reference_resources(config))), "reference")
    for record in iter_patients(config):
        ingestor.ingest_bundle(bundle(record), "test")
    ingestor.commit()
    ingestor.vault.close()
    return [orjson.loads(e.to_json()) for e in sink.published_facts]


@pytest.fixture
def service(facts: list[Any]) -> Iterator[FeasibilityService]:
    snapshot = ColumnarSnapshot()
    for envelope in facts:
        snapshot.apply(envelope)
    registry = PublicationRegistry("sqlite://")
    yield FeasibilityService(
        snapshot=snapshot,
        lock=threading.Lock(),
        engine=PolarsEngine(),
        policy=DisclosurePolicy(),
        registry=registry,
        budget=QueryBudget(registry.engine, max_queries=50, lockout_after=50),
        saved=MemorySavedQuestions(),
        clock=lambda: AT,
        answers=AnswerHistory(registry.engine),
    )


def shown_or_withheld(cell: dict[str, Any], rounding: int = 5) -> None:
    if cell["suppressed"]:
        assert cell == {"value": None, "display": "withheld", "suppressed": True}
    else:
        assert cell["value"] % rounding == 0 and cell["display"] == str(cell["value"])


def test_profile_cells_are_protected_and_add_up_where_shown(service: FeasibilityService) -> None:
    workspace = Workspace(service)
    body, audit = workspace.profile("Acme", QUESTION)
    profile = body["profile"]
    assert profile["sexes"] == list(SEXES)
    assert profile["age_bands"] == [b for b, _, _ in AGE_BANDS]
    for sex in SEXES:
        shown_or_withheld(profile["by_sex"][sex])
        for cell in profile["age_by_sex"][sex].values():
            shown_or_withheld(cell)
    # adults only: the question says nobody is under 18, so that band is a known 0, shown as
    # one (withheld, it would only make the plan withhold a real band beside it)
    zero = {"value": 0, "display": "0", "suppressed": False}
    assert all(profile["age_by_sex"][s]["0-17"] == zero for s in SEXES)
    assert audit["budget"] == {"charged": True, "used": 1}
    again, audit = workspace.profile("Acme", QUESTION)  # unchanged: a free republication
    assert again["profile"] == profile and audit["budget"]["charged"] is False
    history = service.answers.list("Acme") if service.answers else []
    assert [a.kind for a in history] == ["profile", "profile"]
    assert service.answers is not None and service.answers.list("Rival") == []


def test_impact_is_independent_of_step_order(service: FeasibilityService) -> None:
    workspace = Workspace(service)
    body, _ = workspace.impact("Acme", QUESTION)
    impact = body["impact"]
    assert [row["kind"] for row in impact] == ["inclusion", "inclusion", "exclusion"]
    # the exact sets, computed by hand: every step but one kept
    steps = service.evaluate(QUESTION, AT)
    keeps = keep_expressions(QUESTION)
    population = steps.filter(pl.col("in_population"))
    exact = []
    for i in range(len(keeps)):
        kept = pl.lit(True)
        for j, k in enumerate(keeps):
            if j != i:
                kept = kept & k
        exact.append(population.filter(kept).height)
    cohort = population.filter(keeps[0] & keeps[1] & keeps[2]).height
    for row, n in zip(impact, exact, strict=True):
        cell = row["without_it"]
        shown_or_withheld(cell)
        if not cell["suppressed"]:
            assert abs(cell["value"] - n) <= 2.5 and n - cohort >= 0
    reordered = parse_question(
        {
            "title": "Adults without diabetes",
            "inclusion": [{"type": "age", "max": 85}, {"type": "age", "min": 18}],
            "exclusion": QUESTION.model_dump(mode="json")["exclusion"],
        }
    )
    other, _ = workspace.impact("Acme", reordered)
    flipped = [other["impact"][1], other["impact"][0], other["impact"][2]]
    assert [r["without_it"] for r in flipped] == [r["without_it"] for r in impact]


def trial_world(
    service: FeasibilityService, recruiting: list[str]
) -> tuple[Any, CohortHistory, list[str]]:
    """A registered trial, its live cohort (the engine's) in a cohort view, and a history in
    which a third of the members arrived over the last 20 days."""
    assert service.saved is not None
    create = TrialCreate(
        id="t-ws", title="WS", criteria=QUESTION, recruiting_sites=recruiting, target=40
    )
    record, _ = service.register(create, "Acme")
    steps = service.evaluate(QUESTION, AT)
    members = steps.filter(pl.col("member")).get_column("patient").to_list()
    view = MemoryCohortView()
    view.records["t-ws"] = {
        p: {"trial": "t-ws", "trial_version": record.version, "patient": p, "member": True,
            "change": 1}
        for p in members
    }  # fmt: skip
    service.cohorts = view
    history = CohortHistory(service.registry.engine)
    base = (AT - timedelta(days=30)).timestamp()
    rows = [
        {
            "trial": "t-ws",
            "patient": p,
            "change": 1,
            "member": True,
            "at_epoch": base if i % 3 else base + 86400 * (10 + i % 20),
        }
        for i, p in enumerate(members)
    ]
    history.absorb([r for r in rows if r["at_epoch"] == base])
    assert history.set_baseline("t-ws", base - 1) == base  # the latest change so far
    history.absorb([r for r in rows if r["at_epoch"] > base])
    assert history.set_baseline("t-ws", AT.timestamp()) == base  # set once
    return record, history, members


def test_sites_rank_projected_sites_and_rates_come_from_shown_cells(
    service: FeasibilityService,
) -> None:
    ranked = service.answer(QUESTION, "Acme")[0]["by_site"]
    sites = sorted(ranked)[:2]
    record, history, members = trial_world(service, sites)
    site_of = dict(
        service.evaluate(QUESTION, AT)
        .filter(pl.col("member"))
        .select("patient", "site")
        .iter_rows()
    )
    candidates = {s: frozenset(p for p in members if site_of[p] == s) for s in sites}
    enrolled = {s: frozenset(sorted(c)[: len(c) // 3]) for s, c in candidates.items()}
    recruitment = RecruitmentBySite(
        "t-ws",
        {
            "candidates": candidates,
            "invited": {s: frozenset(sorted(c)[: len(c) // 2]) for s, c in candidates.items()},
            "consented": enrolled,
            "enrolled": enrolled,
        },
    )
    workspace = Workspace(service, history)
    body, audit = workspace.sites("Acme", record, recruitment)
    assert body["history"]["available"] and body["history"]["window_days"] == 30
    rows = body["sites"]
    assert {r["site"] for r in rows} == set(ranked)
    ranks = [r["rank"] for r in rows if r["rank"] is not None]
    assert ranks == list(range(1, len(ranks) + 1))
    days = [r["projection"]["median_days"] for r in rows if r["rank"] is not None]
    assert days == sorted(days)
    for row in rows:
        shown_or_withheld(row["eligible_now"])
        shown_or_withheld(row["new_eligible"])
        rate = row["new_per_30_days"]
        if row["new_eligible"]["suppressed"]:
            assert rate["suppressed"] and not row["projection"]["forecast"]
        else:
            assert rate["value"] == pytest.approx(row["new_eligible"]["value"], abs=1e-3)
        if row["recruiting"]:
            for kind in ("candidates", "invited", "enrolled"):
                shown_or_withheld(row[kind])
            if not row["enrolled"]["suppressed"] and not row["invited"]["suppressed"]:
                assert row["enrolment_rate"]["value"] == pytest.approx(
                    row["enrolled"]["value"] / row["invited"]["value"], abs=1e-3
                )
            else:
                assert row["enrolment_rate"]["suppressed"]
    assert body["trial_forecast"]["from"] == "recruiting sites"
    assert audit["budget"]["charged"] is True


def test_forecast_has_an_interval_and_a_protected_daily_series(
    service: FeasibilityService,
) -> None:
    record, history, _ = trial_world(service, [])
    body, _ = Workspace(service, history).forecast("Acme", record, None)
    trial = body["forecast"]
    assert trial["forecast"] and not trial["conversion_known"]
    low, high = trial["interval_days"]
    assert low is not None and low <= trial["median_days"]
    assert high is None or trial["median_days"] <= high
    series = body["series"]
    assert series[0]["day"] == (AT - timedelta(days=30)).date().isoformat()
    assert series[-1]["day"] == AT.date().isoformat() and len(series) == 31
    for point in series:
        shown_or_withheld({k: v for k, v in point.items() if k != "day"})
    # the last day is the cohort now: the same set as the total, so the same publication
    assert series[-1]["display"] == body["total"]["display"]
    # days a few arrivals apart are never both shown exactly
    shown = [p["value"] for p in series if not p["suppressed"]]
    assert len(shown) < len(series)


def test_rates_and_forecasts_wait_for_enough_history(service: FeasibilityService) -> None:
    """Seen in the browser: minutes after registration one arrival read "1500000.00 new / 30
    days" and the target "reached today". Before CONCIERGE_DC_RATE_MIN_HISTORY_HOURS of history
    there is no rate and no forecast, and the answer says when there will be."""
    record, history, _ = trial_world(service, [])  # 30 days of history
    service.rate_min_history_hours = 31 * 24.0
    body, _ = Workspace(service, history).forecast("Acme", record, None)
    assert body["history"]["available"] is False
    assert "covers 720.0 h" in body["history"]["reason"]
    assert "need 744 h" in body["history"]["reason"]
    assert body["forecast"]["forecast"] is False
    assert body["forecast"]["reason"] == body["history"]["reason"]
    sites, _ = Workspace(service, history).sites("Acme", record, None)
    assert sites["totals"]["new_per_30_days"] is None
    assert all(row["new_per_30_days"] is None for row in sites["sites"])
    assert all(row["rank"] is None for row in sites["sites"])
    # with the history long enough, the same question has its rate and forecast
    service.rate_min_history_hours = 24.0
    body, _ = Workspace(service, history).forecast("Acme", record, None)
    assert body["history"]["available"] and body["forecast"]["forecast"]


def _pdf_text(pdf: bytes) -> tuple[int, str]:
    """Pages and text of a PDF, read back by pypdf (not by the library that wrote it)."""
    reader = PdfReader(io.BytesIO(pdf))
    return len(reader.pages), "\n".join(page.extract_text() or "" for page in reader.pages)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_pdf_report_has_the_criteria_the_funnel_and_the_rules_on_one_page(
    service: FeasibilityService,
) -> None:
    service.answer(QUESTION, "Acme")
    assert service.answers is not None
    past = service.answers.list("Acme")[0]
    assert past.kind == "ad hoc" and past.body["funnel"]
    assert past.summary()["links"]["pdf"] == f"/v1/feasibility/history/{past.id}/report.pdf"
    pdf = report_pdf(past)
    assert pdf.startswith(b"%PDF-")
    pages, text = _pdf_text(pdf)
    assert pages == 1
    flat = _words(text)
    for heading in ("Criteria", "Funnel", "Sites", "Disclosure rules in force"):
        assert heading in flat, heading
    # the criteria in words, as the HTML report and the page put them
    for line in render(QUESTION).splitlines():
        if line.strip():
            assert _words(line) in flat, line
    # every funnel step, with its remaining count as shown to the sponsor
    for row in past.body["funnel"]:
        assert _words(str(row["label"])) in flat, row["label"]
    for rule in past.body["rules"]:
        assert _words(str(rule))[:40] in flat, rule


def test_pdf_report_shows_withheld_cells_as_withheld(service: FeasibilityService) -> None:
    body, _ = Workspace(service).profile("Acme", QUESTION)
    assert service.answers is not None
    past = service.answers.list("Acme")[0]
    assert past.kind == "profile"
    # small bands (few patients of sex "other" or "unknown" in 600) are withheld ...
    withheld = [
        (sex, band)
        for sex, bands in body["profile"]["age_by_sex"].items()
        for band, cell in bands.items()
        if cell["suppressed"]
    ]
    assert withheld
    pages, text = _pdf_text(report_pdf(past))
    flat = _words(text)
    # ... and in the PDF: as many "withheld" as the HTML report has, never a number for them
    html = re.sub(r"<style>.*?</style>", "", report_html(past), flags=re.S)
    html_text = _words(re.sub(r"<[^>]+>", " ", html))
    assert flat.count("withheld") == html_text.count("withheld") >= len(withheld)
    for sex, band in withheld:
        assert f"profile / age_by_sex / {sex} / {band} withheld" in flat, (sex, band)
    assert pages == 1


def test_a_band_the_criteria_leave_empty_is_a_known_zero_not_a_reason_to_withhold() -> None:
    """Seen on the sponsor page: an adults-only question's profile showed one band of a row and
    withheld the others. Its 0-17 band is empty; withheld as a zero, it made the plan withhold a
    real band beside it (here female 18-29, 40 patients), which a reader who knows 0-17 is
    empty works out as 150 - 60 - 50. Marked structural, it is shown as 0 and nothing else is
    withheld."""
    counts = {"female": (0, 40, 60, 50), "male": (0, 45, 55, 35)}
    bands = ("0-17", "18-29", "30-39", "40-49")
    ids = iter(range(1000))
    extra: dict[str, Any] = {}
    breakdowns = []
    for sex, row in counts.items():
        for band, n in zip(bands, row, strict=True):
            extra[f"profile:{sex}:{band}"] = BitMap(next(ids) for _ in range(n))
        extra[f"profile:sex:{sex}"] = BitMap().union(*(extra[f"profile:{sex}:{b}"] for b in bands))
        breakdowns.append(
            Breakdown(f"profile:sex:{sex}", tuple(f"profile:{sex}:{b}" for b in bands))
        )
    breakdowns.append(Breakdown("total", ("profile:sex:female", "profile:sex:male")))
    cohort = extra["profile:sex:female"] | extra["profile:sex:male"]
    step = FunnelStepSets("population", "population", cohort, cohort, BitMap(), BitMap(), cohort)
    sets = AnswerSets(cohort, {"A": cohort}, {"A": "R"}, {"R": cohort}, [step])
    policy = DisclosurePolicy(rounding=1)

    def shown(structural: frozenset[str]) -> dict[str, str]:
        full = with_extra(sets, extra, breakdowns, structural)
        protected, _ = protect(full, policy, PublicationRegistry("sqlite://"), "Acme", "q")
        return {k: c.display for k, c in protected.extra.items()}

    before = shown(frozenset())
    assert before["profile:female:0-17"] == "withheld"
    assert before["profile:female:18-29"] == "withheld"  # 40: derivable by a reader
    empty = frozenset(f"profile:{s}:0-17" for s in counts)
    after = shown(empty)
    assert after["profile:female:0-17"] == after["profile:male:0-17"] == "0"
    assert "withheld" not in after.values()
    assert profile_structural(QUESTION) == frozenset(f"profile:{s}:0-17" for s in SEXES)
