"""Live cohorts of saved questions, kept per event.

For every registered trial the stream keeps, per patient, a membership record (``trial|patient``
-> record, see ``docs/reference/cohort-events.md``) in a table whose changelog is the public
cohort topic, so writing the record *is* publishing the cohort event: the two cannot disagree
after a crash, and a consumer that reads the topic sees every change.

Everything here is a function of the patient's state, the trial and the stream time, and every
write is a comparison with what the table holds, never an increment, so replaying any event
(after a crash, or a duplicate) writes nothing new, and any event of a patient heals whatever a
crash left half-done for that patient:

* **facts** of a patient: re-evaluate the trials the changed facts are relevant to;
* **ticks** (``{"type": "tick", "time": ...}`` on the control topic, one stream per partition):
  stream time moves on and timers that are due fire (a result leaves its window, a birthday);
* **trial changes** (``{"type": "trial", "trial": TrialRecord}``): evaluate every patient of
  the partition for a new trial or version, or close the cohort of a retired one.

This class knows nothing of Faust: it works on any mutable mappings, so the property tests can
drive it with dictionaries, simulate restarts, and compare it with the batch engines.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

from core.contracts.cohorts import (
    BOOKKEEPING_PREFIX,
    COHORT_SCHEMA,
    evaluated_key,
    record_key,
    watermark_key,
)
from core.patient_view import PatientView
from feasibility.criteria import parse_question
from feasibility.engines.incremental import ALWAYS_RELEVANT, CompiledQuestion, fact_tokens
from feasibility.terminology import prefix_covers, range_covers

from .store import Change, PatientStore

log = logging.getLogger(__name__)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


#: Fact kinds no question's answer reads (see ``CompiledQuestion.relevant``).
_NEVER_RELEVANT = frozenset({"consent", "adverse_event"})


class _TokenIndex:
    """Which of several code matchers (``CompiledQuestion``'s ``_Matcher``: exact tokens,
    prefix and range terms) a set of tokens hits, in one pass over the tokens rather than one
    pass per matcher. Exact tokens are a dictionary lookup; prefix and range terms are grouped
    by their head (``"<system>|"``), a handful of systems, and compared as the matcher does."""

    def __init__(self, matchers: list[Any]) -> None:
        self.exact: dict[str, list[int]] = {}
        prefixes: dict[str, list[tuple[str, int]]] = {}
        ranges: dict[str, list[tuple[str, str, int]]] = {}
        for i, matcher in enumerate(matchers):
            if matcher is None:
                continue
            for tok in matcher.exact:
                self.exact.setdefault(tok, []).append(i)
            for head, prefix in matcher.prefixes:
                prefixes.setdefault(head, []).append((prefix, i))
            for head, lo, hi in matcher.ranges:
                ranges.setdefault(head, []).append((lo, hi, i))
        self.prefixes = list(prefixes.items())
        self.ranges = list(ranges.items())
        self.size = len(matchers)

    def hits(self, found: Iterable[str], chosen: set[int]) -> set[int]:
        """Add to ``chosen`` the matchers any token of ``found`` hits; return it."""
        exact, prefixes, ranges, every = self.exact, self.prefixes, self.ranges, self.size
        for tok in found:
            hit = exact.get(tok)
            if hit:
                chosen.update(hit)
            if len(chosen) == every:
                return chosen
            for head, terms in prefixes:
                if tok.startswith(head):
                    value = tok[len(head) :]
                    for prefix, i in terms:
                        if i not in chosen and prefix_covers(prefix, value):
                            chosen.add(i)
            for head, spans in ranges:
                if tok.startswith(head):
                    value = tok[len(head) :]
                    for lo, hi, i in spans:
                        if i not in chosen and range_covers(lo, hi, value):
                            chosen.add(i)
        return chosen


class RelevanceIndex:
    """Which of a partition's active trials a set of changed facts can change: the same answer
    as asking every trial's ``CompiledQuestion.relevant`` about every fact, from an index; and
    which of them a patient's tokens may pass the first inclusion step of (the same answer as
    ``CompiledQuestion.may_pass_first_step``, for all trials in one pass).

    Exact code tokens (codes, concepts, expanded ECL and value sets) map to the trials that
    name them; prefix and range terms are grouped by their system. A fact of a kind every
    question reads (``ALWAYS_RELEVANT``: demographics decide the population, the site, the
    region and the age, which is why an age criterion needs no code) selects every trial; a
    device exposure selects the trials that name devices by manufacturer or model. Criteria
    that move with time alone (windows, birthdays) are the timers' business, not this index's.
    ``tests/generative/test_cohort_index.py`` checks the indexed keeper against one that
    evaluates every trial on every change."""

    def __init__(self, trials: list[tuple[str, CompiledQuestion, int]]) -> None:
        self.trials = trials
        self.codes = _TokenIndex([compiled.matcher for _, compiled, _ in trials])
        self.gates = _TokenIndex([compiled.gate for _, compiled, _ in trials])
        #: trials without a first-step gate (every patient may pass their first step)
        self.ungated = {i for i, (_, compiled, _) in enumerate(trials) if compiled.gate is None}
        self.by_device_name = [i for i, (_, c, _) in enumerate(trials) if c.devices_by_name]

    def select(self, facts: Iterable[Mapping[str, Any]]) -> list[int]:
        """The positions (in order) of the trials that any of ``facts`` is relevant to."""
        every = len(self.trials)
        chosen: set[int] = set()
        found: set[str] = set()
        for fact in facts:
            kind = fact.get("kind")
            if kind in ALWAYS_RELEVANT:
                return list(range(every))
            if kind in _NEVER_RELEVANT:
                continue
            if kind == "device_exposure":
                chosen.update(self.by_device_name)
            found |= fact_tokens(fact)
        self.codes.hits(found, chosen)
        return sorted(chosen)

    def may_pass(self, patient_tokens: set[str]) -> set[int]:
        """The positions of the trials whose first inclusion step a patient with these tokens
        may pass (``CompiledQuestion.may_pass_first_step`` of each)."""
        return self.gates.hits(patient_tokens, set(self.ungated))


class LiveCohorts:
    """Live cohort membership for every active trial, over one worker's partitions."""

    def __init__(
        self,
        store: PatientStore,
        table: MutableMapping[str, Any],
        trials: MutableMapping[str, Any],
        wall_clock: Any = None,
    ) -> None:
        self.store = store
        self.table = table
        self.trials = trials  # "<partition>|<trial id>" -> {"id", "version", "status", "criteria"}
        self.wall_clock = wall_clock or (lambda: datetime.now(UTC).timestamp())
        self.stream_time: dict[int, float] = {}
        self.facts_offset: dict[int, int] = {}
        self.timers: dict[int, list[tuple[float, str, str]]] = {}
        self._compiled: dict[tuple[str, int], CompiledQuestion] = {}
        self._tokens: dict[str, set[str]] = {}
        #: per partition, its active trials as :meth:`active_trials` gives them; dropped when
        #: a trial message is handled, and on recovery and every check after a rebalance
        #: (:meth:`invalidate`), when Faust may have restored the trials table from its changelog
        self._active: dict[int, list[tuple[str, CompiledQuestion, int]]] = {}
        #: per partition, the relevance index of its active trials (dropped with ``_active``)
        self._index: dict[int, RelevanceIndex] = {}
        self.skipped = 0
        self.evaluations = 0
        self.writes = 0

    # ------------------------------------------------------------------ state helpers

    def now(self, partition: int) -> float:
        """Stream time of a partition: the latest tick seen, or the wall clock before any."""
        return self.stream_time.get(partition) or self.wall_clock()

    def active_trials(self, partition: int) -> list[tuple[str, CompiledQuestion, int]]:
        found = self._active.get(partition)
        if found is not None:
            return found
        prefix = f"{partition}|"
        out = []
        for key, spec in list(self.trials.items()):
            if not key.startswith(prefix) or spec is None or spec.get("status") != "active":
                continue
            out.append((spec["id"], self.compiled(spec), int(spec["version"])))
        found = sorted(out, key=lambda item: item[0])
        self._active[partition] = found
        return found

    def invalidate(self, partition: int) -> None:
        """Read the partition's trials from the table again at the next event."""
        self._active.pop(partition, None)
        self._index.pop(partition, None)

    def index(self, partition: int) -> RelevanceIndex:
        found = self._index.get(partition)
        if found is None or partition not in self._active:
            found = self._index[partition] = RelevanceIndex(self.active_trials(partition))
        return found

    def relevant_trials(self, partition: int, facts: list[Mapping[str, Any]]) -> list[int]:
        """Positions in :meth:`active_trials` of the trials that any of ``facts`` (old and new
        versions of the changed resources) can change, from the partition's index."""
        return self.index(partition).select(facts)

    def may_pass(self, partition: int, patient: str) -> set[int]:
        """Positions in :meth:`active_trials` of the trials whose first inclusion step the
        patient may pass, from the partition's index (see :meth:`_gated`)."""
        return self.index(partition).may_pass(self.tokens(partition, patient))

    def compiled(self, spec: Mapping[str, Any]) -> CompiledQuestion:
        key = (spec["id"], int(spec["version"]))
        found = self._compiled.get(key)
        if found is None:
            found = CompiledQuestion(parse_question(spec["criteria"]))
            self._compiled[key] = found
        return found

    def data(self, partition: int, patient: str) -> PatientView:
        """The patient's view, as the store keeps it per event."""
        return self.store.view(partition, patient)

    def tokens(self, partition: int, patient: str) -> set[str]:
        """The match tokens of every fact of the patient's live resources, for the first-step
        gate only. Read from the facts with :func:`fact_tokens` rather than from the patient
        view: the gate needs a superset of the view's tokens (this is one: it also holds the
        codes of facts the view does not match on), and most patients the gate turns away
        would otherwise have their whole view parsed for nothing (it was a third of the
        worker's time). Every evaluation reads the view."""
        found = self._tokens.get(patient)
        if found is None:
            found = set()
            for entry in self.store.patient(partition, patient).values():
                if entry.get("retracted"):
                    continue
                for fact in entry.get("facts") or ():
                    if isinstance(fact, Mapping):
                        found |= fact_tokens(fact)
            self._tokens[patient] = found
        return found

    def _gated(self, partition: int, patient: str, trial: str, compiled: CompiledQuestion) -> bool:
        """True when evaluating would only confirm an untracked patient fails step one."""
        if compiled.gate is None or record_key(trial, patient) in self.table:
            return False
        if compiled.may_pass_first_step(self.tokens(partition, patient)):
            return False
        self.skipped += 1
        return True

    def recover(self, partition: int) -> None:
        """After the partition's state is rebuilt: stream time and timers from the table."""
        self.invalidate(partition)
        mark = self.table.get(watermark_key(partition))
        if mark:
            self.stream_time[partition] = float(mark["stream_time_epoch"])
        heap: list[tuple[float, str, str]] = []
        for key, record in list(self.table.items()):
            if (
                key.startswith(BOOKKEEPING_PREFIX)
                or not record
                or record.get("partition") != partition
            ):
                continue
            if record.get("next_check") is not None:
                heap.append((float(record["next_check"]), record["trial"], record["patient"]))
        heapq.heapify(heap)
        self.timers[partition] = heap
        # Trials evaluated before the cohort topic carried completion marks get theirs now.
        prefix = f"{partition}|"
        for key, spec in list(self.trials.items()):
            if key.startswith(prefix) and spec is not None:
                self._mark_evaluated(partition, spec)

    def _mark_evaluated(self, partition: int, spec: Mapping[str, Any]) -> None:
        key = evaluated_key(spec["id"], partition)
        mark = {
            "trial": spec["id"],
            "version": int(spec["version"]),
            "partition": partition,
            "status": spec.get("status", "active"),
        }
        if self.table.get(key) != mark:
            self.table[key] = mark

    def forget(self, partition: int) -> None:
        self.invalidate(partition)
        self.timers.pop(partition, None)
        self.stream_time.pop(partition, None)
        for patient in self.store.patients(partition):
            self._tokens.pop(patient, None)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(
        self, partition: int, patient: str, trial: str, compiled: CompiledQuestion, version: int
    ) -> None:
        t = self.now(partition)
        data = self.data(partition, patient)
        result, next_check = compiled.evaluate(data, datetime.fromtimestamp(t, UTC))
        self.evaluations += 1
        member = result.member(compiled.question)
        steps = result.letters() if result.in_population else ""
        key = record_key(trial, patient)
        old = self.table.get(key)
        tracked = member or next_check is not None or (steps[:1] not in ("F", ""))
        if old is None and not tracked:
            return
        new = {
            "schema": COHORT_SCHEMA,
            "trial": trial,
            "trial_version": version,
            "patient": patient,
            "site": result.site,
            "region": result.region,
            "member": member,
            "steps": steps,
            "next_check": next_check,
            "partition": partition,
        }
        if old is not None and all(old.get(k) == v for k, v in new.items()):
            return
        new["change"] = (int(old["change"]) + 1) if old else 1
        new["at"] = iso(t)
        self.table[key] = new
        self.writes += 1
        if next_check is not None:
            heapq.heappush(self.timers.setdefault(partition, []), (next_check, trial, patient))

    def on_changes(self, partition: int, patient: str, changes: Iterable[Change]) -> None:
        """Facts of one patient were folded (applied or not): re-evaluate what they touch."""
        changes = list(changes)
        if not changes:
            return
        known = self._tokens.get(patient)
        if known is not None and all(c.old is None and c.applied for c in changes):
            for change in changes:  # new resources only: their tokens add to the patient's
                for fact in change.new.get("facts") or ():
                    known |= fact_tokens(fact)
        else:
            self._tokens.pop(patient, None)
        trials = self.active_trials(partition)
        if not trials:
            return
        facts: list[Mapping[str, Any]] = []
        for change in changes:
            facts.extend(change.new.get("facts") or ())
            if change.old is not None:
                facts.extend(change.old.get("facts") or ())
        selected = self.relevant_trials(partition, facts)
        if not selected:
            return
        # the first-step gate of every selected trial at once (what _gated asks trial by trial)
        passing: set[int] | None = None
        for i in selected:
            trial, compiled, version = trials[i]
            if compiled.gate is not None:
                if passing is None:
                    passing = self.may_pass(partition, patient)
                if i not in passing and record_key(trial, patient) not in self.table:
                    self.skipped += 1
                    continue
            self._evaluate(partition, patient, trial, compiled, version)

    def on_tick(self, partition: int, t: float, facts_offset: int | None = None) -> None:
        current = self.stream_time.get(partition)
        if current is not None and t <= current:
            t = current
        self.stream_time[partition] = t
        heap = self.timers.setdefault(partition, [])
        due: set[tuple[str, str]] = set()
        while heap and heap[0][0] <= t:
            _, trial, patient = heapq.heappop(heap)
            due.add((trial, patient))
        if due:
            specs = {trial: (compiled, version) for trial, compiled, version in
                     self.active_trials(partition)}  # fmt: skip
            for trial, patient in sorted(due):
                record = self.table.get(record_key(trial, patient))
                spec = specs.get(trial)
                if spec is None or record is None:
                    continue
                if record.get("next_check") is None or float(record["next_check"]) > t:
                    continue  # superseded by a later evaluation
                self._evaluate(partition, patient, trial, spec[0], spec[1])
        mark = {
            "partition": partition,
            "stream_time": iso(t),
            "stream_time_epoch": t,
            "facts_offset": self.facts_offset.get(partition, 0),
        }
        if self.table.get(watermark_key(partition)) != mark:
            self.table[watermark_key(partition)] = mark

    def on_trial(self, partition: int, trial: Mapping[str, Any]) -> None:
        """A trial was registered, changed or retired. An older version is ignored; the same
        version again re-evaluates (records are compared, so nothing changes when nothing
        was lost): the trials table can be durable while the records an evaluation wrote
        were still in flight when the worker died, and the redelivered message must heal them
        (the chaos suite found a member with no record after a SIGKILL)."""
        key = f"{partition}|{trial['id']}"
        current = self.trials.get(key)
        version = int(trial["version"])
        if current is not None and int(current["version"]) > version:
            return
        spec = {
            "id": trial["id"],
            "version": version,
            "status": trial.get("status", "active"),
            "criteria": trial["criteria"],
        }
        self.trials[key] = spec
        self.invalidate(partition)
        if spec["status"] != "active":
            self._close(partition, spec["id"], version)
            self._mark_evaluated(partition, spec)
            return
        compiled = self.compiled(spec)
        for patient in sorted(self.store.patients(partition)):
            if not self._gated(partition, patient, spec["id"], compiled):
                self._evaluate(partition, patient, spec["id"], compiled, version)
        # patients tracked under an earlier version but not reached above keep a stale record
        self._close(partition, spec["id"], version, only_older=True)
        self._mark_evaluated(partition, spec)

    def _close(self, partition: int, trial: str, version: int, only_older: bool = False) -> None:
        """Mark the trial's records on this partition as not members (retired trial), or with
        ``only_older``, those still at an earlier version after a re-evaluation."""
        prefix = f"{trial}|"
        t = self.now(partition)
        for key, record in list(self.table.items()):
            if not key.startswith(prefix) or not record or record.get("partition") != partition:
                continue
            old_version = int(record.get("trial_version", 0))
            if only_older and old_version >= version:
                continue
            closed = not record.get("member") and record.get("next_check") is None
            if closed and old_version == version:
                continue
            self.table[key] = {
                **record,
                "trial_version": version,
                "member": False,
                "next_check": None,
                "change": int(record["change"]) + 1,
                "at": iso(t),
            }
            self.writes += 1

    # ------------------------------------------------------------------ views

    def members(self, trial: str) -> dict[str, dict[str, Any]]:
        return {
            r["patient"]: r
            for k, r in list(self.table.items())
            if not k.startswith(BOOKKEEPING_PREFIX)
            and r
            and r.get("trial") == trial
            and r.get("member")
        }

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for key, record in list(self.table.items()):
            # watermarks are records too (keyed "\x00watermark|p"); only membership has a trial
            if key.startswith(BOOKKEEPING_PREFIX) or not record or "trial" not in record:
                continue
            counts.setdefault(record["trial"], 0)
            if record.get("member"):
                counts[record["trial"]] += 1
        return {
            "members": counts,
            "stream_time": {p: iso(t) for p, t in sorted(self.stream_time.items())},
            "evaluations": self.evaluations,
            "skipped_by_first_step": self.skipped,
            "writes": self.writes,
        }


__all__ = ["LiveCohorts"]
