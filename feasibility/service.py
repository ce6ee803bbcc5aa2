"""The feasibility service: answers sponsors' questions under disclosure control.

Ad hoc questions run over the columnar snapshot (kept current from the facts topic by
:class:`~feasibility.feed.FactsFeed`) with an engine that evaluates over its frames (the polars
engine, a :class:`~feasibility.engines.base.FrameEngine`); saved questions count the cohort as
the stream keeps it (:class:`~feasibility.readers.CohortReader`). The exact per-patient results
become sets of patient ids (bitmaps), and only what
:func:`feasibility.disclosure.protection.protect` lets through leaves this module. Nothing
patient-level is returned, logged or audited. See ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
from pyroaring import BitMap, FrozenBitMap

from .criteria import ExclusionStep, ObservationCriterion, Question, step_label
from .disclosure.answer import AnswerSets, Cell, FunnelStepSets, ProtectionAudit
from .disclosure.budget import QueryBudget
from .disclosure.policy import DisclosurePolicy
from .disclosure.protection import protect
from .disclosure.registry import NewPublication, PublicationRegistry, current_display
from .engines.base import FrameEngine
from .engines.reference import walk_criterion
from .expansion import ExpansionSource
from .readers import CohortReader, FactsReader, Reader
from .refresh import ExpansionRefresher
from .saved import SavedQuestions, SavedTrial, TrialCreate
from .sites import (
    UNRESOLVED,
    UNRESOLVED_REGION,
    SiteDirectory,
    SiteResolver,
    describe_sites,
    label_population,
    label_site,
    with_site_columns,
)
from .snapshot import ColumnarSnapshot
from .workspace.history import AnswerHistory, CohortHistory

log = logging.getLogger(__name__)


class NotCurrent(RuntimeError):
    """A view an answer needs is behind, disconnected or inconsistent with another: answering
    would give a stale or partial count as if it were current. The API answers 503 with
    ``Retry-After`` and these reasons instead."""

    def __init__(self, waiting_for: list[str], retry_after: int = 2) -> None:
        super().__init__("; ".join(waiting_for))
        self.waiting_for = waiting_for
        self.retry_after = retry_after


#: An answer's JSON body, or its audit detail (counts of rules applied, never patient-level).
Body = dict[str, Any]


def _not_ready(name: str, reader: object) -> str | None:
    """Why ``reader`` is not current, or None when it is (a view that cannot say its
    readiness, not a :class:`~feasibility.readers.Reader`, is trusted only because it is a
    static test double without a broker)."""
    if not isinstance(reader, Reader):
        return None
    status = reader.readiness()
    if status.ready:
        return None
    return f"{name}: {status.waiting_for or 'not ready'}"


def fingerprint(question: Question) -> str:
    return hashlib.sha256(question.to_json().encode()).hexdigest()[:24]


def _bitmap(frame: pl.DataFrame, mask: pl.Expr) -> BitMap:
    return bitmap_of(frame.filter(mask).get_column("pid"))


def bitmap_of(ids: pl.Series) -> BitMap:
    """A bitmap of patient ids, through a typed buffer (a million ids in milliseconds)."""
    buffer = array.array("I")
    buffer.frombytes(ids.cast(pl.UInt32).to_numpy().tobytes())
    return BitMap(buffer)


def answer_sets(
    question: Question, steps: pl.DataFrame, sites: SiteResolver | None = None
) -> AnswerSets:
    """Exact sets from an engine's per-patient step frame (``pid``, ``in_population``,
    ``s0``..``sN`` as 1/0/null, ``site``, ``region``, and ``site_key`` where known). Sites
    are labelled now, from ``sites`` (:func:`feasibility.sites.label_site`): by ODS code, or
    :data:`~feasibility.sites.UNRESOLVED`, never by an organisation's key."""
    population = with_site_columns(steps.filter(pl.col("in_population")))
    remaining = pl.lit(True)
    funnel = [
        FunnelStepSets(
            "population",
            "population",
            entered=_bitmap(population, remaining),
            passed=_bitmap(population, remaining),
            failed=BitMap(),
            unknown=BitMap(),
            remaining=_bitmap(population, remaining),
        )
    ]
    for i, step in enumerate(question.steps):
        column = pl.col(f"s{i}")
        exclusion = isinstance(step, ExclusionStep)
        true, false, unknown = column == 1, column == 0, column.is_null()
        passed, failed = (false, true) if exclusion else (true, false)
        keep = passed | unknown if exclusion and question.exclusion_unknown == "keep" else passed
        funnel.append(
            FunnelStepSets(
                step_label(step, i),
                "exclusion" if exclusion else "inclusion",
                entered=_bitmap(population, remaining),
                passed=_bitmap(population, remaining & passed),
                failed=_bitmap(population, remaining & failed),
                unknown=_bitmap(population, remaining & unknown),
                remaining=_bitmap(population, remaining & keep),
            )
        )
        remaining = remaining & keep
    members = population.filter(remaining)
    cohort = bitmap_of(members.get_column("pid"))
    labels, site_region = label_population(population, sites)
    by_site = {site: BitMap() for site in site_region}
    by_region = {region: BitMap() for region in set(site_region.values())}
    for key, code, ids in members.group_by("site_key", "site").agg(pl.col("pid")).iter_rows():
        site = labels[(key, code)]
        if site is not None:
            by_site[site] |= BitMap(ids)
    for site, ids in by_site.items():
        by_region[site_region[site]] |= ids
    return AnswerSets(
        cohort=cohort,
        by_site=by_site,
        site_region=site_region,
        by_region=by_region,
        funnel=funnel,
    )


#: Sets of patients with unconvertible results are recorded in the publication registry with
#: every patient id moved up by this much: they are a namespace of their own, so they never
#: equal, nor come near, a set of patients published as a count of patients (whose value would
#: then be copied as a count of results, or the other way round).
RESULT_SETS = 1 << 31


def unconvertible_results(
    question: Question,
    steps: pl.DataFrame,
    policy: DisclosurePolicy,
    registry: PublicationRegistry | None = None,
    org: str = "",
    fingerprint: str = "",
    numbering: Callable[[BitMap], BitMap] | None = None,
) -> dict[int, Cell]:
    """Per funnel step whose criteria convert units (index into ``question.steps``): the
    results its criteria skipped because their unit does not convert (the step frame's
    ``u{i}``), among the patients who entered the step. Published under the policy's small
    number rule applied both to the results and to the patients they belong to (a few
    patients' many results would otherwise point at them), then rounded; withheld cells look
    like every other withheld cell.

    With overlap control (a ``registry``), each count is published for the set of patients it
    belongs to, like every other cell (rule 4 of ``docs/explanation/disclosure-control.md``): a
    set that is, or comes within the threshold of, one published before gets that
    publication's value again, so two questions whose patients differ by one cannot tell that
    patient's results by difference; a new set is recorded. The sets live in a namespace of
    their own (:data:`RESULT_SETS`)."""
    population = steps.filter(pl.col("in_population"))
    remaining = pl.lit(True)
    out: dict[int, Cell] = {}
    fresh: list[NewPublication] = []
    used = registry if policy.overlap_control else None
    # one step across every API process: the lookups and the recording (registry.lock)
    guard: AbstractContextManager[Any] = used.lock if used is not None else nullcontext()
    with guard:
        for i, step in enumerate(question.steps):
            column = pl.col(f"s{i}")
            exclusion = isinstance(step, ExclusionStep)
            tops = step.all_of if isinstance(step, ExclusionStep) else step.any_of
            if any(
                isinstance(c, ObservationCriterion) and c.value is not None and c.value.unit
                for top in tops
                for c in walk_criterion(top)
            ):
                skipped = population.filter(remaining & (pl.col(f"u{i}") > 0))
                results = int(skipped.get_column(f"u{i}").sum())
                patients = skipped.height
                fresh_cell = (
                    Cell(None, policy.withheld_display, True)
                    if policy.is_small(results) or policy.is_small(patients)
                    else Cell(policy.rounded(results), str(policy.rounded(results)), False)
                )
                if used is None:
                    out[i] = fresh_cell
                else:
                    pids = skipped.get_column("pid")
                    if pids.len() and int(pids.max()) >= RESULT_SETS:  # type: ignore[arg-type]
                        raise ValueError("patient ids reach the result sets' namespace")
                    ids = BitMap(pids.cast(pl.UInt32).to_numpy())
                    if numbering is not None:  # the registry's numbers (registry_bits)
                        ids = numbering(ids)
                    bits = FrozenBitMap(np.asarray(ids.to_array(), dtype=np.uint32) + RESULT_SETS)
                    if not fresh:
                        used.refresh()
                    match = used.match(bits, policy.threshold)
                    if match is not None:
                        entry = match.entry
                        out[i] = Cell(entry.value, current_display(entry.display), entry.hidden)
                        if not match.exact:  # the near set is published as a copy, like a cell's
                            fresh.append(NewPublication(bits, entry.value, entry.display,
                                                        entry.hidden, entry.id))  # fmt: skip
                    else:
                        out[i] = fresh_cell
                        fresh.append(NewPublication(bits, fresh_cell.value, fresh_cell.display,
                                                    fresh_cell.suppressed, None))  # fmt: skip
            passed = (column == 0) if exclusion else (column == 1)
            if exclusion and question.exclusion_unknown == "keep":
                passed = passed | column.is_null()
            remaining = remaining & passed
        if used is not None and fresh:
            used.record(fresh, org, fingerprint, overlap_hits=0)
    return out


def _with_unconvertible(body: Body, cells: dict[int, Cell]) -> Body:
    for i, cell in cells.items():
        body["funnel"][i + 1]["unconvertible_results"] = cell.to_dict()
    return body


@dataclass(frozen=True)
class LiveSets:
    """A saved question's exact answer (:meth:`FeasibilityService.live_sets`)."""

    sets: AnswerSets
    #: The engine's step frame over the snapshot at the stream's time.
    steps: pl.DataFrame
    at: datetime
    snapshot_at: dict[int, int] | None
    #: The cohort as the snapshot counts it (equal to the stream's, by invariant 1).
    batch_cohort: BitMap


@dataclass
class Charge:
    """One unit of an organisation's query budget, taken for one request that gives it
    something new: an answer (ad hoc or saved) or a saved question's registration. Taken before
    any data is read (a locked-out or spent organisation is refused first), given back when the
    request gives nothing (a view was not current, the request was refused) or when the answer
    is a republication: the organisation's last answer to the same question again, recorded
    nothing, told nothing new (``docs/explanation/disclosure-control.md``, rule 7)."""

    #: The budget's ``used`` with this charge counted (0: not charged at all, ``charge=False``).
    used: int = 0
    #: What was answered is recorded (publications, a trial version): no refund on an error.
    given: bool = False
    #: The answer was a republication: refunded when the request ends.
    republication: bool = False

    def settle(self, audit: ProtectionAudit | None = None) -> None:
        """The answer is made (and recorded); a republication costs nothing."""
        self.given = True
        self.republication = audit is not None and audit.republished

    def to_audit(self) -> Body:
        """For the audit log: whether the request was charged, and the budget used after it."""
        if not self.used:
            return {"budget": {"charged": False}}
        charged = not self.republication
        return {"budget": {"charged": charged, "used": self.used if charged else self.used - 1}}


@dataclass
class FeasibilityService:
    """Everything a sponsor request needs: the snapshot, the engine and disclosure control."""

    snapshot: ColumnarSnapshot
    lock: threading.Lock
    engine: FrameEngine
    policy: DisclosurePolicy
    registry: PublicationRegistry
    budget: QueryBudget
    #: Keeps ``snapshot`` current from the facts topic (None: the snapshot is fed by hand).
    feed: FactsReader | None = None
    #: The registry of saved questions (trials topic); None: no saved questions here.
    saved: SavedQuestions | None = None
    #: Live cohorts from the stream; None: saved questions are answered like ad hoc ones.
    cohorts: CohortReader | None = None
    #: Organisations from the reference topic (:class:`feasibility.sites.SiteView`): how
    #: answers name sites. None: by the ODS codes the facts carry.
    sites: SiteDirectory | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    #: How long a saved answer waits for the snapshot to reach the stream's position.
    consistency_timeout: float = 5.0
    #: How far behind the wall clock the stream's time may be for a saved answer (None: not
    #: checked, for views fed by hand); the API sets it from CONCIERGE_STREAM_MAX_LAG_SECONDS.
    stream_max_lag_seconds: float | None = None
    #: ``() -> {partition: high watermark}`` of the facts topic, measured now (the API passes
    #: a broker call; None where there is no broker).
    facts_high_watermarks: Callable[[], dict[int, int]] | None = None
    #: Expands ECL and ValueSet code entries when a question is compiled
    #: (:class:`terminology.expand.Terminology`); None: questions naming them are refused.
    terminology: ExpansionSource | None = None
    #: Re-expands saved questions after terminology loads (stopped with the service).
    refresher: ExpansionRefresher | None = None
    #: Every answer each organisation got (its history and exports); None: not kept.
    answers: AnswerHistory | None = None
    #: The history of saved questions' cohorts, kept from the cohort view (arrival rates, the
    #: live count's daily series); None: not kept.
    cohort_history: CohortHistory | None = None
    #: Arrival rates and forecasts wait for this much cohort history (hours;
    #: ``CONCIERGE_DC_RATE_MIN_HISTORY_HOURS``); before it they say how long is left.
    rate_min_history_hours: float = 24.0
    #: The registry's number of each snapshot id (index: pid), grown as patients appear.
    _shared_numbers: list[int] = field(default_factory=list, init=False, repr=False)
    _shared_table: np.ndarray[Any, Any] = field(
        default_factory=lambda: np.zeros(0, dtype=np.uint32), init=False, repr=False
    )

    def registry_bits(self, bits: BitMap) -> BitMap:
        """``bits`` (snapshot ids) as the registry's numbers of the same patients
        (:meth:`PublicationRegistry.numbers`): every API process on the database puts a
        patient in the same bit, so overlap control matches sets published by another process
        (or before a restart, which renumbers the snapshot). What :func:`protect` records."""
        numbers = self._number_patients()
        table = self._shared_table
        if len(table) != len(numbers):  # converted once per growth, not once per set
            table = self._shared_table = np.asarray(numbers, dtype=np.uint32)
        return BitMap(table[np.asarray(bits.to_array(), dtype=np.int64)])

    def _number_patients(self) -> list[int]:
        """:attr:`_shared_numbers` for every patient the snapshot has now."""
        with self.lock:
            count = self.snapshot.patient_count
            known = len(self._shared_numbers)
            new = [self.snapshot.pseudonym_of(pid) for pid in range(known, count)]
        if new:
            numbers = self.registry.numbers(new)
            with self.lock:
                if len(self._shared_numbers) == known:
                    self._shared_numbers.extend(numbers)
        return self._shared_numbers

    @contextmanager
    def charged(self, org: str, charge: bool = True) -> Iterator[Charge]:
        """The query budget around one request of ``org`` (:class:`Charge`): raises
        :class:`~feasibility.disclosure.budget.LockedOut` or
        :class:`~feasibility.disclosure.budget.BudgetExceeded` before anything is read. With
        ``charge=False`` (tests, and nothing else) the budget is not consulted."""
        if not charge:
            yield Charge()
            return
        charge_id, status = self.budget.reserve(org)
        taken = Charge(used=status.used)
        try:
            yield taken
        except BaseException:
            if not taken.given:
                self.budget.refund(charge_id)
            raise
        if taken.republication:
            self.budget.refund(charge_id)

    def register(self, create: TrialCreate, org: str) -> tuple[SavedTrial, Body]:
        """Register (or change) ``org``'s saved question: one charge of the query budget, as
        an answer is (each version is evaluated by the stream and recruits at its sites), so a
        locked-out or spent organisation cannot register. Returns the record and its audit
        detail."""
        if self.saved is None:
            raise RuntimeError("no saved questions here")
        with self.charged(org) as charge:
            # The next version number comes from the registry view: registering before it has
            # read the trials topic would reuse version 1, which the stream ignores as seen.
            self.require("trials")
            record = self.saved.register(create, org)
            charge.settle()
        return record, {"trial": record.id, "version": record.version, **charge.to_audit()}

    def require(self, *views: str) -> None:
        """Raise :class:`NotCurrent` unless each named view (``facts``, ``cohorts``,
        ``trials``, ``sites``) is connected and caught up."""
        readers = self._readers()
        waiting = [
            reason
            for name in views
            if name in readers and (reason := _not_ready(name, readers[name])) is not None
        ]
        if waiting:
            raise NotCurrent(waiting)

    def _snapshot_past_stream(self) -> dict[int, int] | None:
        """Wait until the snapshot has read every facts message the cohort view can reflect:
        the cohort was read before this call, and the worker cannot have processed more than
        the topic held then, so the high watermarks measured now bound it. Returns them."""
        if self.facts_high_watermarks is None or self.feed is None:
            return None
        try:
            highs = self.facts_high_watermarks()
        except Exception as exc:
            raise NotCurrent([f"facts: broker unreachable ({type(exc).__name__})"]) from None
        if not self.feed.wait_positions(highs, self.consistency_timeout):
            raise NotCurrent(["facts: the snapshot is catching up with the stream"])
        return highs

    def evaluate(self, question: Question, at: datetime) -> pl.DataFrame:
        """The engine's step frame, with each patient's ``site_key`` (row i is pid i in both)."""
        with self.lock:
            frames = self.snapshot.frames()
        steps = self.engine.evaluate_frames(question, frames, at)
        patients = frames.patients
        if "site_key" not in steps.columns and "site_key" in patients.columns:
            if steps.height != patients.height:
                raise RuntimeError("the step frame is not aligned with the snapshot's patients")
            steps = steps.with_columns(patients.get_column("site_key"))
        return steps

    def answer_live(self, trial: SavedTrial, org: str) -> tuple[Body, Body]:
        """A saved question's answer: cohort counts as the stream keeps them (per event), the
        funnel from the snapshot at the stream's time, both under disclosure control, charged
        to ``org``'s query budget like an ad hoc answer (a republication is free)."""
        with self.charged(org) as charge:
            body, audit = self._answer_live(trial, org, charge)
        return body, {**audit, **charge.to_audit()}

    def _answer_live(self, trial: SavedTrial, org: str, charge: Charge) -> tuple[Body, Body]:
        started = time.perf_counter()
        question = trial.criteria
        live = self.live_sets(trial)
        at, steps, snapshot_at = live.at, live.steps, live.snapshot_at
        assert self.cohorts is not None
        fp = fingerprint(question)
        protected, audit = protect(
            live.sets, self.policy, self.registry, org, fp, self.registry_bits
        )
        charge.settle(audit)
        body = {
            "question": fp,
            "title": question.title,
            "kind": "saved",
            "evaluated_at": at.isoformat(),
            "index_instant": question.index_instant(at).isoformat(),
            "as_of": {
                **self.as_of(),
                **self.cohorts.status(),
                "snapshot_covers_stream": True,
                "snapshot_reached": snapshot_at,
            },
            "counts_from": "stream (per event)",
            "funnel_from": "snapshot at the stream's time",
            "stream_and_snapshot_agree": live.sets.cohort == live.batch_cohort,
            "criteria_version_evaluated": self.cohorts.evaluated_version(trial.id),
            **_with_unconvertible(
                protected.to_dict(),
                unconvertible_results(
                    question, steps, self.policy, self.registry, org, fp, self.registry_bits
                ),
            ),
            "sites": describe_sites(protected.by_site, self.sites),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        self._remember(org, "saved", fp, question, body, trial.id)
        return body, {"question": fp, "kind": "saved", **audit.to_dict()}

    def _remember(
        self, org: str, kind: str, fp: str, question: Question, body: Body, trial: str | None
    ) -> None:
        """Keep the answer in the organisation's history (``GET /v1/feasibility/history``)."""
        if self.answers is None:
            return
        self.answers.record(org, kind, fp, json.loads(question.to_json()), body, trial)

    def live_sets(self, trial: SavedTrial) -> LiveSets:
        """A saved question's exact sets: the cohort as the stream keeps it (per event), each
        member's site labelled now from the snapshot, the funnel from the snapshot at the
        stream's time. :class:`NotCurrent` while any view behind it is not."""
        question = trial.criteria
        if self.cohorts is None:
            raise RuntimeError("the live cohort view is not running")
        self.require("facts", "cohorts", "trials", "sites")
        pending = self.cohorts.pending_partitions(trial.id, trial.version)
        if pending:
            raise NotCurrent(
                [f"cohorts: version {trial.version} of {trial.id} is still being evaluated on "
                 f"partitions {pending}"]
            )  # fmt: skip
        stream_time = self.cohorts.stream_time()
        if self.stream_max_lag_seconds is not None:
            # The cohort view can be caught up with its topic while the worker writing it is
            # down or behind: the stream's time (ticks, every second) says how current it is.
            lag = None if stream_time is None else (self.clock() - stream_time).total_seconds()
            if lag is None or lag > self.stream_max_lag_seconds:
                said = "has not reported its time" if lag is None else f"is {lag:.0f} s behind"
                raise NotCurrent([f"cohorts: the stream worker {said}"])
        at = stream_time or self.clock()
        members = self.cohorts.members(trial.id, trial.version)
        snapshot_at = self._snapshot_past_stream()
        steps = self.evaluate(question, at)
        sets = answer_sets(question, steps, self.sites)
        with self.lock:
            known = {r["patient"]: self.snapshot.known(r["patient"]) for r in members}
            missing = sum(1 for ok in known.values() if not ok)
            if missing:
                # The snapshot reached the stream's position, so this cannot be lag: say so
                # rather than count a cohort the funnel cannot see.
                log.error("saved answer: %s cohort members are not in the snapshot", missing)
                raise NotCurrent([f"facts: {missing} cohort members are not in the snapshot yet"])
            ids = {r["patient"]: self.snapshot.patient_id(r["patient"]) for r in members}
        cohort = BitMap(ids.values())
        by_site = {site: BitMap() for site in sets.by_site}
        by_region = {region: BitMap() for region in sets.by_region}
        site_region = dict(sets.site_region)
        # The stream says who is in the cohort; the snapshot (at or past the stream's
        # position) holds each member's organisation key, labelled now like an ad hoc answer.
        rows = steps.filter(
            pl.col("pid").is_in(pl.Series(list(ids.values()), dtype=pl.UInt32).implode())
        )
        rows = with_site_columns(rows).select("pid", "site_key", "site", "region")
        labels: dict[tuple[str | None, str | None], str | None] = {}
        for pid, key, code, region in rows.iter_rows():
            if (key, code) not in labels:
                labels[(key, code)] = label_site(key, code, self.sites)
            site = labels[(key, code)]
            if site is None:
                continue
            site_region.setdefault(
                site, UNRESOLVED_REGION if site == UNRESOLVED else region or "Unknown"
            )
            by_site.setdefault(site, BitMap()).add(pid)
            by_region.setdefault(site_region[site], BitMap()).add(pid)
        live = AnswerSets(
            cohort=cohort,
            by_site=by_site,
            site_region=site_region,
            by_region=by_region,
            funnel=sets.funnel,
        )
        return LiveSets(live, steps, at, snapshot_at, sets.cohort)

    def _readers(self) -> dict[str, Reader]:
        """The views that can say whether they are current, by the name ``require`` takes."""
        views: dict[str, object | None] = {
            "facts": self.feed,
            "cohorts": self.cohorts,
            "trials": self.saved,
            "sites": self.sites,
        }
        return {name: view for name, view in views.items() if isinstance(view, Reader)}

    def readiness(self) -> dict[str, dict[str, Any]]:
        """Each view's readiness, lag and what it waits for (as ``/readyz`` shows them)."""
        return {name: reader.readiness().to_dict() for name, reader in self._readers().items()}

    def stop(self) -> None:
        """Stop the readers that keep the views current (at the API's shutdown)."""
        if self.refresher is not None:
            self.refresher.stop()
        for reader in self._readers().values():
            reader.stop()

    def as_of(self) -> Body:
        status = self.feed.status() if self.feed is not None else None
        info: Body = dict(self.snapshot.watermark())
        if status is not None:
            info.update(
                {
                    "facts_messages": status.messages,
                    "lag_messages": status.lag,
                    "caught_up": status.caught_up,
                    "ready": _not_ready("facts", self.feed) is None,
                }
            )
        return info

    def answer(
        self, question: Question, org: str, kind: str = "ad hoc", charge: bool = True
    ) -> tuple[Body, Body]:
        """The protected answer for ``org``, and an audit detail (counts of rules applied, never
        patient-level), charged to ``org``'s query budget (a republication is free)."""
        with self.charged(org, charge) as taken:
            body, audit = self._answer(question, org, kind, taken)
        return body, {**audit, **taken.to_audit()}

    def _answer(self, question: Question, org: str, kind: str, charge: Charge) -> tuple[Body, Body]:
        self.require("facts", "sites")
        started = time.perf_counter()
        at = self.clock()
        steps = self.evaluate(question, at)
        sets = answer_sets(question, steps, self.sites)
        evaluated = time.perf_counter()
        fp = fingerprint(question)
        protected, audit = protect(sets, self.policy, self.registry, org, fp, self.registry_bits)
        charge.settle(audit)
        body = {
            "question": fp,
            "title": question.title,
            "kind": kind,
            "evaluated_at": at.isoformat(),
            "index_instant": question.index_instant(at).isoformat(),
            "as_of": self.as_of(),
            **_with_unconvertible(
                protected.to_dict(),
                unconvertible_results(
                    question, steps, self.policy, self.registry, org, fp, self.registry_bits
                ),
            ),
            "sites": describe_sites(protected.by_site, self.sites),
            "engine": self.engine.name,
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
            "evaluation_ms": round((evaluated - started) * 1000, 1),
        }
        self._remember(org, kind, fp, question, body, None)
        return body, {"question": fp, "kind": kind, **audit.to_dict()}


__all__ = [
    "Charge",
    "FeasibilityService",
    "LiveSets",
    "NotCurrent",
    "answer_sets",
    "fingerprint",
    "unconvertible_results",
]
