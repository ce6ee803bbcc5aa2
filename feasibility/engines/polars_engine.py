"""The polars engine: vectorised evaluation of the criteria model over a columnar snapshot.

Every criterion becomes one Boolean column over all patients (row *i* is pid *i*; null is
UNKNOWN), built from a few joins and group-bys over the snapshot's tables
(:mod:`feasibility.snapshot`), and the connectives combine columns with polars' Kleene ``&``,
``|`` and ``~``. The semantics are the reference engine's (:mod:`.reference`), rule for rule:

* codes resolve, through :mod:`feasibility.terminology`, to the token ids present in the
  snapshot's dictionary (code, prefix, range, concept), then to the codesets holding any of
  them; a table is sliced by codeset (its main frame is sorted by it);
* dates are compared as the reference compares them, in float epoch seconds (the snapshot's
  ``when_s``, exactly ``datetime.timestamp()``), with window bounds ``anchor + days *
  86400.0`` computed in the same float arithmetic;
* unit conversion asks :func:`feasibility.units.affine` once per distinct (unit, analyte) pair
  and applies ``value * scale + offset`` to the column;
* "latest" is the greatest (date, resource key, component index), the first fact of a resource
  winning a complete tie, as Python's ``max`` picks it.

:meth:`PolarsEngine.evaluate_frames` returns a *step frame*: ``pid``, ``patient``,
``in_population``, ``s0``..``sN`` (Int8: 1 TRUE, 0 FALSE, null UNKNOWN; inclusion steps then
exclusion steps), ``u0``..``uN`` (UInt32: results each step skipped as unconvertible),
``site``, ``region`` and ``member``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, date, datetime
from fractions import Fraction
from functools import reduce
from typing import Any

import polars as pl

from .. import units
from ..criteria import (
    EVENT_TYPES,
    AgeCriterion,
    AllOf,
    AnyCriterion,
    AnyOf,
    CancerStageCriterion,
    Code,
    ConditionCriterion,
    DeviceCriterion,
    EventCriterion,
    InclusionStep,
    MedicationCriterion,
    MolecularMarkerCriterion,
    Not,
    ObservationCriterion,
    ProcedureCriterion,
    Question,
    RegionCriterion,
    SexCriterion,
    SiteCriterion,
    ValueTest,
    Window,
    iter_criteria,
)
from ..snapshot import ColumnarSnapshot, SnapshotFrames, TableView
from ..terminology import (
    AJCC,
    CONCEPTS,
    LOINC,
    MARKERS,
    canonical_system,
    normalise_code,
    stage_matches,
    system_of_data,
)
from ..terminology import token as make_token
from .base import FrameEngine, Population
from .reference import (
    CONDITION_EXCLUDED_VERIFICATION,
    DEVICE_EXCLUDED,
    MEDICATION_EXCLUDED,
    OBSERVATION_STATUSES,
    PROCEDURE_EXCLUDED,
    walk_criterion,
)
from .results import PatientResult, Tri

DAY = 86400.0
US = 1_000_000


def _when() -> pl.Expr:
    """The event date in float epoch seconds, exactly as the reference computes it (the
    snapshot's ``when_s``: a correctly rounded ``us / 1e6``)."""
    return pl.col("when_s")


def _last_us_at_or_before(seconds: float) -> int:
    """The greatest epoch microsecond ``us`` whose float seconds (``us / 10**6``, correctly
    rounded) is ``<= seconds``: integer comparisons equivalent to the reference's float ones."""
    us = math.floor(Fraction(seconds) * US)
    while (us + 1) / US <= seconds:
        us += 1
    while us / US > seconds:
        us -= 1
    return us


def _value_passes(test: ValueTest, value: pl.Expr) -> pl.Expr:
    conditions = [
        op(value, bound)
        for bound, op in (
            (test.gt, pl.Expr.__gt__),
            (test.ge, pl.Expr.__ge__),
            (test.lt, pl.Expr.__lt__),
            (test.le, pl.Expr.__le__),
            (test.eq, pl.Expr.__eq__),
        )
        if bound is not None
    ]
    return reduce(lambda a, b: a & b, conditions)


class _Evaluation:
    """One question over one :class:`SnapshotFrames` at one index instant.

    Evaluation runs in two passes: every event criterion first becomes a lazy query over the
    snapshot's tables (:meth:`_plan`), and all of them are collected together (polars runs them
    in parallel); then the criterion tree is folded into Boolean columns (:meth:`criterion`).
    """

    def __init__(self, question: Question, frames: SnapshotFrames, at: datetime) -> None:
        self.question = question
        self.frames = frames
        self.t = question.index_instant(at).timestamp()
        self.day = datetime.fromtimestamp(self.t, UTC).date()
        self.n = frames.patients.height
        # window anchors name event criteria (the criteria model checks it)
        self.ids: dict[str, EventCriterion] = {
            c.id: c
            for c in iter_criteria(question)
            if c.id is not None and isinstance(c, EVENT_TYPES)
        }
        # lookups that depend on the frames only, kept with them across questions
        cache = frames.cache
        if "label_ids" not in cache:
            cache["label_ids"] = {label: i for i, label in frames.labels.iter_rows()}
        self.label_ids: dict[str, int] = cache["label_ids"]
        self._analytes: dict[int, str | None] = cache.setdefault("analytes", {})
        self._codeset_cache: dict[tuple[Code, ...], list[int]] = cache.setdefault("codesets", {})
        self._anchors: dict[str, pl.DataFrame] = {}
        self._collected: dict[int, pl.DataFrame] = {}

    # ------------------------------------------------------------------ columns

    def _constant(self, value: Tri) -> pl.Series:
        return pl.repeat(value, self.n, dtype=pl.Boolean, eager=True)

    def _spread(self, default: Tri, pids: pl.Series, values: pl.Series | None = None) -> pl.Series:
        """A column over all patients: ``values`` (default TRUE) at ``pids``, ``default``
        elsewhere."""
        column = self._constant(default)
        if pids.len():
            column.scatter(
                pids,
                pl.repeat(True, pids.len(), eager=True)
                if values is None
                else values.cast(pl.Boolean),
            )
        return column

    # ------------------------------------------------------------------ labels and codes

    def _labels(self, values: Sequence[str]) -> list[int]:
        return [self.label_ids[v] for v in values if v in self.label_ids]

    def _in(self, column: str, values: Sequence[str]) -> pl.Expr:
        """``column in values`` with a missing value counting as not in (Python semantics)."""
        return pl.col(column).is_in(self._labels(values)).fill_null(False)

    def _not_in(self, column: str, values: Sequence[str]) -> pl.Expr:
        return pl.col(column).is_null() | ~pl.col(column).is_in(self._labels(values))

    def _token_ids(self, codes: Sequence[Code]) -> pl.Series:
        conditions: list[pl.Expr] = []
        token = pl.col("token")
        for code in codes:
            if code.needs_expansion:  # ECL or ValueSet: its expansion, fixed when compiled
                conditions.append(token.is_in(sorted(code.expanded_tokens())))
                continue
            if code.concept is not None:
                wanted = [make_token(s, c) for s, c in CONCEPTS[code.concept].codes]
                conditions.append(token.is_in(wanted))
                continue
            system = canonical_system(code.system or "")
            if code.code is not None:
                conditions.append(token == make_token(system, code.code))
            elif code.prefix is not None:
                conditions.append(
                    token.str.starts_with(f"{system}|{normalise_code(system, code.prefix)}")
                )
            elif code.range is not None:
                head = f"{system}|"
                low, _, high = code.range.partition("-")
                lo, hi = normalise_code(system, low), normalise_code(system, high)
                value = token.str.slice(len(head))
                lead = value.str.slice(0, len(lo))
                conditions.append(
                    token.str.starts_with(head)
                    & (value.str.len_chars() >= len(lo))
                    & (lead >= lo)
                    & (lead <= hi)
                )
        if not conditions:
            return pl.Series("token_id", [], dtype=pl.UInt32)
        either = reduce(lambda a, b: a | b, conditions)
        return self.frames.tokens.filter(either).get_column("token_id")

    def _codesets(self, codes: Sequence[Code]) -> list[int]:
        """The codesets holding any token the coded terms cover."""
        key = tuple(codes)
        found = self._codeset_cache.get(key)
        if found is None:
            tokens = self._token_ids(codes)
            found = (
                self.frames.codesets.filter(pl.col("token_id").is_in(tokens.implode()))
                .get_column("codeset")
                .unique()
                .to_list()
                if tokens.len()
                else []
            )
            self._codeset_cache[key] = found
        return found

    def _value_sets(self, codes: Sequence[Code]) -> list[int]:
        tokens = self._token_ids(codes)
        if tokens.len() == 0:
            return []
        found = self.frames.value_sets.filter(pl.col("token_id").is_in(tokens.implode()))
        return found.get_column("value_set").unique().to_list()

    def _interp_sets(self, codes: Sequence[str]) -> list[int]:
        found = self.frames.interp_sets.filter(pl.col("code").is_in(list(codes)))
        return found.get_column("interp_set").unique().to_list()

    def _analyte(self, codesets: Sequence[int]) -> dict[int, str | None]:
        """The analyte of each codeset: the first LOINC token (sorted) that has one."""
        missing = [cs for cs in codesets if cs not in self._analytes]
        if missing:
            members = (
                self.frames.codesets.filter(pl.col("codeset").is_in(missing))
                .join(self.frames.tokens, on="token_id")
                .group_by("codeset")
                .agg(pl.col("token"))
            )
            found: dict[int, list[str]] = dict(members.iter_rows())
            head = f"{LOINC}|"
            for cs in missing:
                analyte = None
                for tok in sorted(found.get(cs, ())):
                    if tok.startswith(head):
                        analyte = units.analyte_for_loinc(tok[len(head) :])
                        if analyte is not None:
                            break
                self._analytes[cs] = analyte
        return {cs: self._analytes[cs] for cs in codesets}

    # ------------------------------------------------------------------ time

    def _window(self, rows: pl.LazyFrame, window: Window | None) -> pl.LazyFrame:
        when = _when()
        dated = when.is_not_null() & (when <= self.t)
        if window is None:
            return rows.filter(when.is_null() | (when <= self.t))
        if window.anchor == "index":
            condition = dated
            if window.start is not None:
                condition = condition & (when >= self.t + window.start * DAY)
            if window.end is not None:
                condition = condition & (when <= self.t + window.end * DAY)
            return rows.filter(condition)
        anchored = rows.join(self._anchor(window.anchor).lazy(), on="pid", how="inner")
        anchor = pl.col("_anchor")
        condition = dated
        if window.start is not None:
            condition = condition & (when >= anchor + window.start * DAY)
        if window.end is not None:
            condition = condition & (when <= anchor + window.end * DAY)
        return anchored.filter(condition).drop("_anchor")

    def _anchor(self, criterion_id: str) -> pl.DataFrame:
        """``pid``, ``_anchor``: the earliest qualifying event of a criterion, in seconds."""
        if criterion_id not in self._anchors:
            rows = self._qualifying(self.ids[criterion_id])
            self._anchors[criterion_id] = (
                rows.filter(_when().is_not_null())
                .group_by("pid")
                .agg(_when().min().alias("_anchor"))
                .collect()
            )
        return self._anchors[criterion_id]

    # ------------------------------------------------------------------ records

    def _candidates(self, criterion: EventCriterion) -> pl.LazyFrame:
        """Records of the criterion's kind matching its codes and statuses, before windows."""
        tables = self.frames.tables
        if isinstance(criterion, ConditionCriterion):
            rows = tables["conditions"].rows(self._codesets(criterion.codes)).lazy()
            keep = self._not_in("verification_status", sorted(CONDITION_EXCLUDED_VERIFICATION))
            if criterion.clinical_status is not None:
                keep = keep & self._in("clinical_status", criterion.clinical_status)
            return rows.filter(keep).select("pid", "rid", "when_s")
        if isinstance(criterion, MedicationCriterion | ProcedureCriterion):
            medication = isinstance(criterion, MedicationCriterion)
            table = tables["medications" if medication else "procedures"]
            rows = table.rows(self._codesets(criterion.codes)).lazy()
            excluded = MEDICATION_EXCLUDED if medication else PROCEDURE_EXCLUDED
            keep = (
                self._in("status", criterion.status)
                if criterion.status is not None
                else self._not_in("status", sorted(excluded))
            )
            return rows.filter(keep).select("pid", "rid", "when_s")
        if isinstance(criterion, DeviceCriterion):
            table = tables["devices"]
            rows = table.rows(
                self._codesets(criterion.device_types) if criterion.device_types else None
            ).lazy()
            keep = self._not_in("status", sorted(DEVICE_EXCLUDED))
            if criterion.manufacturer:
                names = [m.casefold() for m in criterion.manufacturer]
                keep = keep & self._in("manufacturer_cf", names)
            if criterion.model:
                keep = keep & self._in("model_cf", [m.casefold() for m in criterion.model])
            return rows.filter(keep).select("pid", "rid", "when_s")
        if isinstance(criterion, ObservationCriterion):
            return self._readings(criterion.codes, criterion.component)
        if isinstance(criterion, CancerStageCriterion):
            return self._readings([Code(concept="stage_group")], None)
        if isinstance(criterion, MolecularMarkerCriterion):
            marker = MARKERS[criterion.marker.upper()]
            return self._readings([Code(system=LOINC, code=c) for c in marker.tests], None)
        raise TypeError(f"not an event criterion: {type(criterion).__name__}")

    def _reading_table(self, component: Sequence[Code] | None) -> tuple[TableView, str]:
        """The table of the readings a criterion reads, and its codeset column for analytes."""
        if component:
            return self.frames.tables["components"], "comp_codeset"
        return self.frames.tables["observations"], "codeset"

    def _readings(self, codes: Sequence[Code], component: Sequence[Code] | None) -> pl.LazyFrame:
        """Readings: an observation's own value, or each matching component (``acs``: the
        codeset the analyte is read from)."""
        row_codesets = self._codesets(codes)
        status = self._in("status", sorted(OBSERVATION_STATUSES))
        table, acs = self._reading_table(component)
        if component:
            rows = table.rows(self._codesets(component)).lazy()
            rows = rows.filter(status & pl.col("codeset").is_in(row_codesets))
            comp = pl.col("comp").cast(pl.Int64)
        else:
            rows = table.rows(row_codesets).lazy().filter(status)
            comp = pl.lit(-1, dtype=pl.Int64).alias("comp")
        return rows.select(
            "pid",
            "rid",
            "fact",
            comp,
            "when_s",
            "value",
            "unit",
            pl.col(acs).alias("acs"),
            "value_set",
            "interp_set",
        )

    def _qualifying(self, criterion: EventCriterion) -> pl.LazyFrame:
        """Records that qualify for an event criterion (in its window, passing its tests)."""
        rows = self._window(self._candidates(criterion), criterion.window)
        if isinstance(criterion, ObservationCriterion) and criterion.has_test:
            rows = self._tested(criterion, rows).filter(pl.col("_testable") & pl.col("_passes"))
        return rows

    # ------------------------------------------------------------------ observations

    def _scale(self, criterion: ObservationCriterion) -> tuple[pl.Expr, pl.Expr]:
        """Per reading, the (scale, offset) into the criterion's unit (null: not convertible),
        from :func:`feasibility.units.affine` once per distinct (unit, analyte)."""
        test = criterion.value
        assert test is not None and test.unit is not None
        table, _ = self._reading_table(criterion.component)
        codesets = self._codesets(criterion.component or criterion.codes)
        pairs = table.units_of(codesets).drop_nulls()
        code_column = table.code_column
        assert code_column is not None
        analytes = self._analyte(pairs.get_column(code_column).unique().to_list())
        labels = dict(
            self.frames.labels.filter(
                pl.col("label_id").is_in(pairs.get_column("unit").unique().implode())
            ).iter_rows()
        )
        factors: dict[tuple[str, str | None], tuple[float, float] | None] = {}
        scale: Any = pl
        offset: Any = pl
        for acs, unit_id in pairs.iter_rows():
            unit, analyte = labels[unit_id], analytes[acs]
            if (unit, analyte) not in factors:
                factors[unit, analyte] = units.affine(unit, test.unit, analyte)
            factor = factors[unit, analyte]
            if factor is None:
                continue
            match = (pl.col("acs") == acs) & (pl.col("unit") == unit_id)
            scale = scale.when(match).then(pl.lit(factor[0], dtype=pl.Float64))
            offset = offset.when(match).then(pl.lit(factor[1], dtype=pl.Float64))
        if scale is pl:
            none = pl.lit(None, dtype=pl.Float64)
            return none, none
        return scale.otherwise(None), offset.otherwise(None)

    def _tested(self, criterion: ObservationCriterion, rows: pl.LazyFrame) -> pl.LazyFrame:
        """Adds ``_testable`` and ``_passes`` (and ``_value``, the value in the criterion's
        unit, with a value test)."""
        testable: list[pl.Expr] = []
        passes: list[pl.Expr] = []
        if criterion.value is not None:
            if criterion.value.unit is None:
                converted = pl.col("value")
            else:
                scale, offset = self._scale(criterion)
                converted = pl.col("value") * scale + offset
            rows = rows.with_columns(converted.alias("_value"))
            testable.append(pl.col("_value").is_not_null())
            passes.append(_value_passes(criterion.value, pl.col("_value")))
        if criterion.value_codes:
            testable.append(pl.col("value_set") != 0)
            passes.append(pl.col("value_set").is_in(self._value_sets(criterion.value_codes)))
        if criterion.interpretation:
            testable.append(pl.col("interp_set") != 0)
            passes.append(pl.col("interp_set").is_in(self._interp_sets(criterion.interpretation)))
        return rows.with_columns(
            reduce(lambda a, b: a & b, testable).alias("_testable"),
            reduce(lambda a, b: a & b, passes).fill_null(False).alias("_passes"),
        )

    @staticmethod
    def _top(rows: pl.LazyFrame, *payload: str) -> pl.LazyFrame:
        """Per pid, every reading at the greatest date (undated ones count as oldest), and
        ``_tied`` when there are several."""
        when = _when().fill_null(float("-inf"))
        return (
            rows.filter(when == when.max().over("pid"))
            .select("pid", "rid", "comp", "fact", *payload)
            .with_columns((pl.len().over("pid") > 1).alias("_tied"))
        )

    def _latest(self, top: pl.DataFrame) -> pl.DataFrame:
        """Per pid, of the readings at its greatest date, the greatest (resource key,
        component index); in a complete tie the first fact of the resource, as Python's
        ``max`` keeps the first."""
        tied = pl.col("_tied")
        multi = top.filter(tied)
        if multi.height == 0:
            return top
        keys = self.frames.key_of(multi.get_column("rid").to_list())
        resolved = (
            multi.with_columns(pl.Series("_key", keys, dtype=pl.String))
            .sort(["pid", "_key", "comp", "fact"], descending=[False, True, True, False])
            .unique(subset="pid", keep="first", maintain_order=True)
            .drop("_key")
        )
        return pl.concat([top.filter(~tied), resolved])

    # ------------------------------------------------------------------ event plans

    def _plan(self, criterion: EventCriterion) -> pl.LazyFrame:
        """The lazy query of an event criterion; :meth:`_finish` turns its result into a
        column."""
        rows = self._window(self._candidates(criterion), criterion.window)
        if isinstance(criterion, CancerStageCriterion | MolecularMarkerCriterion):
            return self._top(rows.filter(pl.col("value_set") != 0), "value_set")
        if isinstance(criterion, ObservationCriterion) and criterion.has_test:
            rows = self._tested(criterion, rows).filter(pl.col("_testable"))
            if criterion.select == "any":
                return rows.group_by("pid").agg(
                    (
                        pl.col("rid").filter(pl.col("_passes")).n_unique() >= criterion.min_count
                    ).alias("_result")
                )
            if criterion.select in ("min", "max"):
                value = pl.col("_value")
                extreme = value.min() if criterion.select == "min" else value.max()
                rows = rows.filter(value == extreme.over("pid"))
            return self._top(rows, "_passes")
        # closed world: at least min_count distinct resources
        if criterion.min_count == 1:
            return rows.select("pid").unique()
        return (
            rows.group_by("pid")
            .agg(pl.col("rid").n_unique().alias("_n"))
            .filter(pl.col("_n") >= criterion.min_count)
            .select("pid")
        )

    def _finish(self, criterion: EventCriterion, result: pl.DataFrame) -> pl.Series:
        if isinstance(criterion, CancerStageCriterion | MolecularMarkerCriterion):
            chosen = self._latest(result)
            verdicts = (
                self._stage_verdicts(criterion)
                if isinstance(criterion, CancerStageCriterion)
                else self._marker_verdicts(criterion)
            )
            verdict = pl.DataFrame(
                {"value_set": list(verdicts), "_verdict": list(verdicts.values())},
                schema={"value_set": pl.UInt32, "_verdict": pl.Boolean},
            )
            chosen = chosen.join(verdict, on="value_set", how="left")
            return self._spread(None, chosen.get_column("pid"), chosen.get_column("_verdict"))
        if isinstance(criterion, ObservationCriterion) and criterion.has_test:
            if criterion.select == "any":
                return self._spread(None, result.get_column("pid"), result.get_column("_result"))
            chosen = self._latest(result)
            return self._spread(None, chosen.get_column("pid"), chosen.get_column("_passes"))
        return self._spread(False, result.get_column("pid"))

    def _value_set_members(self) -> dict[int, list[tuple[str, str, str]]]:
        """value set -> its (system, code, token) members."""
        cached: dict[int, list[tuple[str, str, str]]] | None = self.frames.cache.get("value_sets")
        if cached is not None:
            return cached
        members = self.frames.value_sets.join(self.frames.tokens, on="token_id", how="left")
        out: dict[int, list[tuple[str, str, str]]] = {}
        for value_set, system, code, tok in members.select(
            "value_set", "system", "code", "token"
        ).iter_rows():
            out.setdefault(value_set, []).append((system, code, tok))
        self.frames.cache["value_sets"] = out
        return out

    def _stage_verdicts(self, criterion: CancerStageCriterion) -> dict[int, Tri]:
        verdicts: dict[int, Tri] = {}
        for value_set, members in self._value_set_members().items():
            stages = [code for system, code, _ in members if system_of_data(system) == AJCC]
            verdicts[value_set] = (
                any(stage_matches(w, s) for w in criterion.stages for s in stages)
                if stages
                else None
            )
        return verdicts

    def _marker_verdicts(self, criterion: MolecularMarkerCriterion) -> dict[int, Tri]:
        marker = MARKERS[criterion.marker.upper()]
        answers = {
            make_token(LOINC, a): status for status, codes in marker.answers.items() for a in codes
        }
        verdicts: dict[int, Tri] = {}
        for value_set, members in self._value_set_members().items():
            statuses = {answers[tok] for _, _, tok in members if tok in answers}
            verdicts[value_set] = (
                True if criterion.status in statuses else (False if statuses else None)
            )
        return verdicts

    # ------------------------------------------------------------------ demographics

    def _demographic(self, expr: pl.Expr) -> pl.Series:
        return self.frames.patients.select(expr.alias("_c")).to_series()

    def _birth_cutoff(self, years: int) -> date | None:
        """The latest birth date with an age of at least ``years`` at T (None: no date is that
        early). ``age_on(b, day) >= years`` iff ``(b.year, b.month, b.day) <= (day.year -
        years, day.month, day.day)``, so the test is one date comparison."""
        year = self.day.year - years
        if year < 1:
            return None
        try:
            return self.day.replace(year=year)
        except ValueError:  # 29 February in a common year: no date between 28 Feb and 1 Mar
            return date(year, 2, 28)

    def _age(self, criterion: AgeCriterion) -> pl.Series:
        birth = pl.col("birth_date")
        conditions = [pl.lit(True)]
        if criterion.min is not None:
            cutoff = self._birth_cutoff(criterion.min)
            conditions.append(birth <= cutoff if cutoff is not None else pl.lit(False))
        if criterion.max is not None:
            cutoff = self._birth_cutoff(criterion.max + 1)
            conditions.append(birth > cutoff if cutoff is not None else pl.lit(True))
        ok = reduce(lambda a, b: a & b, conditions)
        return self._demographic(pl.when(birth.is_null()).then(None).otherwise(ok))

    def _one_of(self, column: str, values: Sequence[str], unknown: pl.Expr) -> pl.Series:
        return self._demographic(
            pl.when(unknown).then(None).otherwise(pl.col(column).is_in(list(values)))
        )

    # ------------------------------------------------------------------ criteria

    def collect(self) -> None:
        """Plan every event criterion of the question and collect them all at once."""
        events = [c for c in iter_criteria(self.question) if isinstance(c, EVENT_TYPES)]
        plans = [self._plan(c) for c in events]
        for criterion, frame in zip(events, pl.collect_all(plans), strict=True):
            self._collected[id(criterion)] = frame

    def criterion(self, criterion: AnyCriterion) -> pl.Series:
        if isinstance(criterion, AllOf):
            return reduce(lambda a, b: a & b, [self.criterion(c) for c in criterion.criteria])
        if isinstance(criterion, AnyOf):
            return reduce(lambda a, b: a | b, [self.criterion(c) for c in criterion.criteria])
        if isinstance(criterion, Not):
            return ~self.criterion(criterion.criterion)
        if isinstance(criterion, AgeCriterion):
            return self._age(criterion)
        if isinstance(criterion, SexCriterion):
            sex = pl.col("sex")
            return self._one_of("sex", criterion.values, sex.is_null() | (sex == "unknown"))
        if isinstance(criterion, SiteCriterion):
            return self._one_of("site", criterion.sites, pl.col("site").is_null())
        if isinstance(criterion, RegionCriterion):
            return self._one_of("region", criterion.regions, pl.col("region").is_null())
        result = self._collected.get(id(criterion))
        if result is None:
            result = self._plan(criterion).collect()
        return self._finish(criterion, result)

    def steps(self) -> list[pl.Series]:
        question = self.question
        self.collect()
        out = [
            reduce(lambda a, b: a | b, [self.criterion(c) for c in step.any_of])
            for step in question.inclusion
        ]
        out += [
            reduce(lambda a, b: a & b, [self.criterion(c) for c in step.all_of])
            for step in question.exclusion
        ]
        return out

    def _unconvertible_rows(self, criterion: AnyCriterion) -> pl.LazyFrame | None:
        """``pid``, ``rid``, ``comp`` of the readings an observation criterion with a unit
        could not test because their unit does not convert (reference: ``unconvertible``)."""
        if not isinstance(criterion, ObservationCriterion) or criterion.value is None:
            return None
        if criterion.value.unit is None:
            return None
        rows = self._window(self._candidates(criterion), criterion.window)
        scale, offset = self._scale(criterion)
        value = pl.col("value")
        return rows.filter(value.is_not_null() & (value * scale + offset).is_null()).select(
            "pid", "rid", "comp"
        )

    def unconvertible(self) -> list[pl.Series]:
        """Per step, each patient's count of results skipped as unconvertible (UInt32)."""
        plans: dict[int, pl.LazyFrame] = {}
        for i, step in enumerate(self.question.steps):
            tops = step.any_of if isinstance(step, InclusionStep) else step.all_of
            rows = [
                plan
                for top in tops
                for c in walk_criterion(top)
                if (plan := self._unconvertible_rows(c)) is not None
            ]
            if rows:
                plans[i] = pl.concat(rows).unique().group_by("pid").agg(pl.len().alias("_n"))
        counted = dict(zip(plans, pl.collect_all(list(plans.values())), strict=True))
        out = []
        for i in range(len(self.question.steps)):
            column = pl.repeat(0, self.n, dtype=pl.UInt32, eager=True)
            counts = counted.get(i)
            if counts is not None and counts.height:
                column.scatter(counts.get_column("pid"), counts.get_column("_n"))
            out.append(column)
        return out

    def in_population(self) -> pl.Series:
        deceased_us = pl.col("deceased_us")
        alive = (
            pl.when(deceased_us.is_not_null())
            .then(deceased_us > _last_us_at_or_before(self.t))
            .otherwise(~pl.col("deceased").fill_null(False))
        )
        # the patient view's rule (:meth:`core.patient_view.PatientView.in_population`): a
        # patient born after T's day is not born yet
        birth = pl.col("birth_date")
        born = birth.is_null() | (birth <= pl.lit(self.day, dtype=pl.Date))
        return self._demographic(pl.col("has_demographics") & alive & born).fill_null(False)

    def step_frame(self) -> pl.DataFrame:
        question = self.question
        steps = self.steps()
        population = self.in_population()
        n_inclusion = len(question.inclusion)
        member = population
        for i, step in enumerate(steps):
            if i < n_inclusion:
                member = member & step.fill_null(False)
            elif question.exclusion_unknown == "exclude":
                member = member & (step == False).fill_null(False)  # noqa: E712
            else:
                member = member & ~step.fill_null(False)
        patients = self.frames.patients
        return pl.DataFrame(
            [
                patients.get_column("pid"),
                patients.get_column("patient"),
                population.alias("in_population"),
                *[s.cast(pl.Int8).alias(f"s{i}") for i, s in enumerate(steps)],
                *[u.alias(f"u{i}") for i, u in enumerate(self.unconvertible())],
                patients.get_column("site"),
                patients.get_column("region"),
                member.alias("member"),
            ]
        )


class PolarsEngine:
    """Vectorised evaluation over a :class:`~feasibility.snapshot.ColumnarSnapshot`."""

    name = "polars"

    def evaluate_frames(
        self, question: Question, frames: SnapshotFrames, at: datetime
    ) -> pl.DataFrame:
        """The step frame of every patient in ``frames`` (see the module docstring)."""
        return _Evaluation(question, frames, at).step_frame()

    def evaluate_snapshot(
        self, question: Question, snapshot: ColumnarSnapshot, at: datetime
    ) -> pl.DataFrame:
        return self.evaluate_frames(question, snapshot.frames(), at)

    def evaluate(
        self,
        question: Question,
        population: Population,
        at: datetime,
    ) -> dict[str, PatientResult]:
        """Evaluate every patient of ``population`` (patient -> resource key -> entry), like
        :meth:`feasibility.engines.reference.ReferenceEngine.evaluate`."""
        snapshot = ColumnarSnapshot()
        snapshot.apply_entries(population)
        frame = self.evaluate_snapshot(question, snapshot, at)
        return results_of(frame, len(question.steps))


def results_of(frame: pl.DataFrame, n_steps: int) -> dict[str, PatientResult]:
    """Per-patient results from a step frame."""
    columns = [f"s{i}" for i in range(n_steps)]
    skipped = [f"u{i}" for i in range(n_steps)]
    out: dict[str, PatientResult] = {}
    for row in frame.select(
        "patient", "in_population", *columns, "site", "region", *skipped
    ).iter_rows():
        patient, population, *rest = row
        steps, (site, region), counts = rest[:n_steps], rest[n_steps : n_steps + 2], rest[-n_steps:]
        out[patient] = PatientResult(
            bool(population),
            tuple(None if s is None else bool(s) for s in steps),
            site,
            region,
            tuple(counts) if n_steps else (),
        )
    return out


#: Checked by mypy: the polars engine is a :class:`~.base.FrameEngine`.
_engine: type[FrameEngine] = PolarsEngine

__all__ = ["PolarsEngine", "results_of"]
