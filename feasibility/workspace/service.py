""":class:`Workspace`: the sponsor workspace's answers (profile, criterion impact, site
selection, accrual forecast with the live count's history), each charged to the organisation's
query budget through :meth:`~feasibility.service.FeasibilityService.charged` and protected by
one disclosure-control plan together with the question's funnel, sites and regions
(``docs/explanation/sponsor-workspace.md``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
from pyroaring import BitMap

from core.contracts.invitations import RecruitmentBySite

from ..criteria import Question
from ..disclosure.answer import AnswerSets, Breakdown, Cell, ProtectedAnswer, ProtectionAudit
from ..disclosure.protection import protect
from ..saved import SavedTrial
from ..service import Body, Charge, FeasibilityService, NotCurrent, answer_sets, fingerprint
from ..sites import describe_sites, label_site, with_site_columns
from .forecast import MODEL, Forecast, ForecastInputs, forecast
from .history import CohortHistory, first_entries, members_at
from .outputs import (
    RECRUITMENT_KINDS,
    SiteSets,
    impact_layout,
    impact_sets,
    profile_layout,
    profile_sets,
    profile_structural,
    ratio,
    series_sets,
    site_selection_sets,
    with_extra,
)

#: Arrival rates are measured over at most this many days before now.
RATE_WINDOW_DAYS = 90
#: Daily points of the live count's history, at most.
SERIES_DAYS = 90
DAY = 86400.0


@dataclass(frozen=True)
class Base:
    """A question's exact answer, the engine's step frame and the instant it is at."""

    question: Question
    sets: AnswerSets
    steps: pl.DataFrame
    at: datetime
    kind: str
    trial: SavedTrial | None = None


@dataclass
class Workspace:
    service: FeasibilityService
    #: The history of saved questions' cohorts (None: rates and the time series unavailable).
    history: CohortHistory | None = None

    # ------------------------------------------------------------------ plumbing

    def _base(self, question: Question | None, trial: SavedTrial | None) -> Base:
        service = self.service
        if trial is not None and service.cohorts is not None:
            live = service.live_sets(trial)
            return Base(trial.criteria, live.sets, live.steps, live.at, "saved", trial)
        if question is None:
            assert trial is not None
            question = trial.criteria
        service.require("facts", "sites")
        at = service.clock()
        steps = service.evaluate(question, at)
        sets = answer_sets(question, steps, service.sites)
        return Base(question, sets, steps, at, "saved" if trial else "ad hoc", trial)

    def _protect(
        self,
        base: Base,
        extra: Mapping[str, BitMap],
        breakdowns: list[Breakdown],
        org: str,
        output: str,
        charge: Charge,
        structural: frozenset[str] = frozenset(),
    ) -> tuple[ProtectedAnswer, ProtectionAudit, str]:
        fp = fingerprint(base.question)
        sets = with_extra(base.sets, extra, breakdowns, structural)
        service = self.service
        # one fingerprint per output: re-reading an unchanged output is a free republication
        protected, audit = protect(
            sets, service.policy, service.registry, org, f"{fp}:{output}", service.registry_bits
        )
        charge.settle(audit)
        return protected, audit, fp

    def _head(self, base: Base, protected: ProtectedAnswer, fp: str, output: str) -> Body:
        head: Body = {
            "output": output,
            "question": fp,
            "title": base.question.title,
            "kind": base.kind,
            "evaluated_at": base.at.isoformat(),
            "index_instant": base.question.index_instant(base.at).isoformat(),
            "total": protected.total.to_dict(),
            "rules": protected.rules,
            "policy": protected.policy,
            "notes": protected.notes,
        }
        if base.trial is not None:
            head["trial"] = base.trial.id
            head["version"] = base.trial.version
        return head

    def _run(
        self,
        org: str,
        output: str,
        question: Question | None,
        trial: SavedTrial | None,
        build: Any,
    ) -> tuple[Body, Body]:
        started = time.perf_counter()
        with self.service.charged(org) as charge:
            base = self._base(question, trial)
            body, audit, fp = build(base, charge)
        body["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
        answers = self.service.answers
        if answers is not None:
            answers.record(
                org,
                output,
                fp,
                json.loads(base.question.to_json()),
                body,
                trial.id if trial else None,
            )
        detail = {"question": fp, "output": output, **audit.to_dict(), **charge.to_audit()}
        return body, detail

    def _pids(self, pseudonyms: set[str] | frozenset[str]) -> BitMap:
        """Snapshot ids of patients the stream or recruitment named (the snapshot has reached
        the stream's position, so a patient it does not know is a view behind: 503)."""
        service = self.service
        with service.lock:
            missing = sum(1 for p in pseudonyms if not service.snapshot.known(p))
            if missing:
                raise NotCurrent([f"facts: {missing} patients are not in the snapshot yet"])
            return BitMap(service.snapshot.patient_id(p) for p in pseudonyms)

    # ------------------------------------------------------------------ outputs

    def profile(
        self, org: str, question: Question | None = None, trial: SavedTrial | None = None
    ) -> tuple[Body, Body]:
        """Age bands by sex, and region, of the eligible cohort."""

        def build(base: Base, charge: Charge) -> tuple[Body, ProtectionAudit, str]:
            with self.service.lock:
                patients = self.service.snapshot.frames().patients
            day = base.question.index_instant(base.at).date()
            extra, breakdowns = profile_sets(base.sets, patients, day)
            empty = profile_structural(base.question)
            protected, audit, fp = self._protect(
                base, extra, breakdowns, org, "profile", charge, empty
            )
            body = self._head(base, protected, fp, "profile")
            body["profile"] = profile_layout(protected)
            body["age_on"] = day.isoformat()
            return body, audit, fp

        return self._run(org, "profile", question, trial, build)

    def impact(
        self, org: str, question: Question | None = None, trial: SavedTrial | None = None
    ) -> tuple[Body, Body]:
        """Per inclusion and exclusion step, the cohort with that step removed."""

        def build(base: Base, charge: Charge) -> tuple[Body, ProtectionAudit, str]:
            extra, breakdowns = impact_sets(base.question, base.steps, base.sets)
            protected, audit, fp = self._protect(base, extra, breakdowns, org, "impact", charge)
            body = self._head(base, protected, fp, "impact")
            body["impact"] = impact_layout(base.question, protected)
            return body, audit, fp

        return self._run(org, "impact", question, trial, build)

    def sites(
        self, org: str, trial: SavedTrial, recruitment: RecruitmentBySite | None
    ) -> tuple[Body, Body]:
        """Site selection: per candidate site, the eligible count, arrivals per 30 days, the
        shares lost to opt-outs and invitation limits, conversion, and the projected time to
        the trial's target; ranked by it."""

        def build(base: Base, charge: Charge) -> tuple[Body, ProtectionAudit, str]:
            site_sets, history = self._site_sets(base, recruitment)
            extra, breakdowns = site_selection_sets(base.sets, site_sets)
            protected, audit, fp = self._protect(base, extra, breakdowns, org, "sites", charge)
            body = self._head(base, protected, fp, "sites")
            body.update(self._site_layout(base, protected, site_sets, history, recruitment))
            return body, audit, fp

        return self._run(org, "sites", None, trial, build)

    def forecast(
        self, org: str, trial: SavedTrial, recruitment: RecruitmentBySite | None
    ) -> tuple[Body, Body]:
        """The accrual forecast for the trial and each site, and the live count's history as
        daily points."""

        def build(base: Base, charge: Charge) -> tuple[Body, ProtectionAudit, str]:
            site_sets, history = self._site_sets(base, recruitment)
            extra, breakdowns = site_selection_sets(base.sets, site_sets)
            days = self._series(base)
            extra = {**extra, **series_sets(days)}
            protected, audit, fp = self._protect(base, extra, breakdowns, org, "forecast", charge)
            body = self._head(base, protected, fp, "forecast")
            layout = self._site_layout(base, protected, site_sets, history, recruitment)
            body["history"] = layout["history"]
            body["target"] = layout["target"]
            body["forecast"] = layout["trial_forecast"]
            body["sites"] = [
                {k: s[k] for k in ("site", "name", "recruiting", "projection", "rank")}
                for s in layout["sites"]
            ]
            body["series"] = [
                {"day": day, **protected.extra[f"series:{day}"].to_dict()} for day in days
            ]
            body["model"] = MODEL
            return body, audit, fp

        return self._run(org, "forecast", None, trial, build)

    # ------------------------------------------------------------------ site selection

    def _history_state(self, trial: SavedTrial, now: float) -> dict[str, Any]:
        history = self.history
        if history is None:
            return {"available": False, "reason": "no cohort history is kept in this API"}
        baseline = history.baseline(trial.id)
        if baseline is None:
            return {
                "available": False,
                "reason": "the saved question's first evaluation is not complete yet",
            }
        observed = max(now - baseline, 0.0)
        needed = self.service.rate_min_history_hours * 3600.0
        if observed < needed:
            return {
                "available": False,
                "baseline": datetime.fromtimestamp(baseline, UTC).isoformat(),
                "reason": f"the cohort's history covers {observed / 3600:.1f} h; arrival rates "
                f"and forecasts need {needed / 3600:g} h "
                f"(available from {datetime.fromtimestamp(baseline + needed, UTC).isoformat()})",
            }
        window = min(observed, RATE_WINDOW_DAYS * DAY)
        state: dict[str, Any] = {
            "available": True,
            "baseline": datetime.fromtimestamp(baseline, UTC).isoformat(),
            "window_days": round(window / DAY, 4),
            "window_start": datetime.fromtimestamp(now - window, UTC).isoformat(),
            "counts": "patients who first entered the cohort after the baseline, within the "
            "window (members before the baseline were there when the question was registered)",
        }
        if history.error is not None:
            state["partial"] = True
            state["error"] = "the cohort history could not be written: it may miss changes"
        return state

    def _site_sets(
        self, base: Base, recruitment: RecruitmentBySite | None
    ) -> tuple[SiteSets, dict[str, Any]]:
        trial = base.trial
        assert trial is not None
        now = base.at.timestamp()
        state = self._history_state(trial, now)
        entries: dict[str, BitMap] = {}
        elsewhere = BitMap()
        window = 0.0
        if state["available"]:
            assert self.history is not None
            window = state["window_days"] * DAY
            start = now - window
            first = first_entries(self.history.changes(trial.id))
            baseline = self.history.baseline(trial.id) or 0.0
            arrived = {p for p, at in first.items() if at > baseline and start <= at <= now}
            ids = self._pids(arrived)
            rows = with_site_columns(
                base.steps.filter(
                    pl.col("pid").is_in(pl.Series(list(ids), dtype=pl.UInt32).implode())
                )
            )
            for pid, key, code in rows.select("pid", "site_key", "site").iter_rows():
                site = label_site(key, code, self.service.sites)
                if site is not None and site in base.sets.by_site:
                    entries.setdefault(site, BitMap()).add(pid)
                else:
                    elsewhere.add(pid)
        kinds: dict[str, dict[str, BitMap]] = {}
        if recruitment is not None:
            for kind in RECRUITMENT_KINDS:
                by_site = recruitment.patients.get(kind, {})
                kinds[kind] = {site: self._pids(p) for site, p in by_site.items()}
        return (
            SiteSets(
                window_days=window / DAY,
                entries=entries,
                entries_elsewhere=elsewhere,
                recruiting=list(trial.recruiting_sites),
                recruitment=kinds,
            ),
            state,
        )

    def _site_layout(
        self,
        base: Base,
        protected: ProtectedAnswer,
        sets: SiteSets,
        history: dict[str, Any],
        recruitment: RecruitmentBySite | None,
    ) -> dict[str, Any]:
        trial = base.trial
        assert trial is not None
        cells = protected.extra
        policy = self.service.policy
        recruiting = [s for s in trial.recruiting_sites if s in base.sets.by_site]
        has_recruitment = bool(recruiting) and recruitment is not None
        window = sets.window_days

        def cell(name: str) -> Cell | None:
            return cells.get(name)

        enrolled_total = cell("enrolled:total")
        target = trial.target
        remaining: int | None = None
        target_note = None
        if target is not None:
            if enrolled_total is not None and not enrolled_total.suppressed:
                remaining = max(target - (enrolled_total.value or 0), 0)
            else:
                remaining = target
                if enrolled_total is not None:
                    target_note = "enrolled so far is withheld: counted as none"

        def pooled() -> tuple[int | None, int | None]:
            k, m = cell("enrolled:total"), cell("candidates:total")
            if k is None or m is None or k.suppressed or m.suppressed or not m.value:
                return None, None
            return k.value, m.value

        def project(entries: Cell | None, site: str | None) -> dict[str, Any]:
            if remaining is None:
                return {"forecast": False, "reason": "the trial has no target"}
            if not history.get("available") or entries is None:
                return {"forecast": False, "reason": history.get("reason", "no history")}
            k, m = pooled()
            source = "all recruiting sites" if k is not None else "none observed"
            if site is not None and site in recruiting:
                sk, sm = cell(f"enrolled:{site}"), cell(f"candidates:{site}")
                if sk and sm and not sk.suppressed and not sm.suppressed and sm.value:
                    k, m, source = sk.value, sm.value, "this site"
            result: Forecast = forecast(
                ForecastInputs(
                    entries=None if entries.suppressed else entries.value,
                    window_days=window,
                    enrolled=k,
                    candidates=m,
                    remaining=remaining,
                    rounding=policy.rounding,
                )
            )
            return {**result.to_dict(base.at), "conversion_from": source}

        names = describe_sites(base.sets.by_site, self.service.sites)
        rows = []
        for site in sorted(base.sets.by_site):
            entries = cell(f"entries:{site}")
            row: dict[str, Any] = {
                "site": site,
                "name": names.get(site, {}).get("name"),
                "region": base.sets.site_region.get(site),
                "recruiting": site in recruiting,
                "eligible_now": protected.by_site[site].to_dict(),
                "new_eligible": entries.to_dict() if entries else None,
                "new_per_30_days": ratio(entries, Cell(1, "1", False), 30 / window)
                if entries is not None and window > 0
                else None,
            }
            if has_recruitment and site in recruiting:
                for kind in RECRUITMENT_KINDS:
                    row[kind] = cells[f"{kind}:{site}"].to_dict()
                candidates = cells[f"candidates:{site}"]
                invited = cells[f"invited:{site}"]
                row["lost_to_opt_outs"] = ratio(cells[f"opted_out:{site}"], candidates)
                row["lost_to_limits"] = ratio(cells[f"limited:{site}"], candidates)
                row["consent_rate"] = ratio(cells[f"consented:{site}"], invited)
                row["enrolment_rate"] = ratio(cells[f"enrolled:{site}"], invited)
            row["projection"] = project(entries, site)
            rows.append(row)

        def order(row: dict[str, Any]) -> tuple[int, float, str]:
            days = row["projection"].get("median_days")
            return (0 if days is not None else 1, days if days is not None else 0.0, row["site"])

        rows.sort(key=order)
        for rank, row in enumerate(rows, 1):
            row["rank"] = rank if row["projection"].get("median_days") is not None else None
        trial_entries = cell("entries:recruiting") or cell("entries:total")
        totals: dict[str, Any] = {
            "new_eligible": trial_entries.to_dict() if trial_entries else None,
            "new_per_30_days": ratio(trial_entries, Cell(1, "1", False), 30 / window)
            if trial_entries is not None and window > 0
            else None,
            "from": "recruiting sites" if recruiting else "every site (none recruiting yet)",
        }
        if has_recruitment:
            for kind in RECRUITMENT_KINDS:
                totals[kind] = cells[f"{kind}:total"].to_dict()
            totals["consent_rate"] = ratio(cells["consented:total"], cells["invited:total"])
            totals["enrolment_rate"] = ratio(cells["enrolled:total"], cells["invited:total"])
        return {
            "history": history,
            "target": {"target": target, "remaining": remaining, "note": target_note},
            "recruitment": {"available": has_recruitment}
            if has_recruitment
            else {
                "available": False,
                "reason": "no recruiting site" if not recruiting else "recruitment not running",
            },
            "ranked_by": "projected days for the site alone to reach the trial's target",
            "sites": rows,
            "totals": totals,
            "trial_forecast": {
                **project(trial_entries, None),
                "from": totals["from"],
            },
            "model": MODEL,
        }

    # ------------------------------------------------------------------ time series

    def _series(self, base: Base) -> dict[str, BitMap]:
        """Members at the end of each day since the baseline's day (at most
        :data:`SERIES_DAYS`), the last day up to now."""
        trial = base.trial
        if self.history is None or trial is None:
            return {}
        changes = self.history.changes(trial.id)
        if not changes:
            return {}
        now = base.at
        first_day = datetime.fromtimestamp(min(c.at for c in changes), UTC).date()
        first_day = max(first_day, now.date() - timedelta(days=SERIES_DAYS - 1))
        out: dict[str, BitMap] = {}
        day: date = first_day
        while day <= now.date():
            end = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
            at = min(end.timestamp() - 1e-6, now.timestamp())
            out[day.isoformat()] = self._pids(members_at(changes, at))
            day += timedelta(days=1)
        return out


__all__ = ["RATE_WINDOW_DAYS", "SERIES_DAYS", "Workspace"]
