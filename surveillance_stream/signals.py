"""Signal statistics per device node, and the signal lifecycle (pure functions).

* :func:`assess` builds the 2x2 table of a node and an outcome against the other devices of the
  same class from :class:`~surveillance_stream.devices.Counters`, and computes every statistic of
  :mod:`surveillance_stream.statistics` on it: disproportionality (PRR, ROR, chi-squared, IC, the
  Evans rule), EBGM with EB05/EB95 under a fixed prior, and the Poisson MaxSPRT of the node's
  outcome count against the count expected at the comparator's rate per person-day. It says which
  rules fire and whether the configured signal rule does.
* A :class:`Signal` per (node, outcome) moves through ``none -> signalled -> under_review ->
  confirmed | dismissed -> closed``. :func:`observe` makes the statistic-driven moves (``detect``,
  ``lapse``), :func:`act` the regulator's (``review``, ``confirm``, ``dismiss``, ``close``,
  ``reopen``); each move returns the new signal and an event. Illegal moves raise
  :class:`IllegalTransition`, naming the moves the state allows.

Configuration (:class:`SignalConfig`) comes from the ``CONCIERGE_SIGNAL_*`` environment variables
through :class:`surveillance_stream.settings.SurveillanceSettings`; see
``docs/explanation/device-surveillance.md``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from core.contracts.signals import SIGNAL_EVENT_SCHEMA, SignalEvent
from surveillance_stream.devices import (
    EXPOSED,
    STRATIFIERS,
    UNKNOWN,
    Counters,
    OutcomeDefinition,
    PersonTime,
    parse_node,
    period_matches,
    window_outcome,
)
from surveillance_stream.settings import DUMOUCHEL_1999_VALUES, RULES, SurveillanceSettings
from surveillance_stream.statistics import (
    CriticalValue,
    DisproportionalityResult,
    EBGMResult,
    GammaMixturePrior,
    binomial_critical_value,
    binomial_llr,
    disproportionality,
    ebgm_scores,
    grouped_cusum,
    information_component_of,
    poisson_critical_value,
    poisson_llr,
)

__all__ = [
    "ACTIONS",
    "DUMOUCHEL_1999",
    "REGULATOR_ACTIONS",
    "RULES",
    "SYSTEM_ACTIONS",
    "Assessment",
    "IllegalTransition",
    "MaxSPRT",
    "Signal",
    "SignalConfig",
    "State",
    "act",
    "assess",
    "assess_all",
    "observe",
    "signal_id",
    "transition",
]

#: DuMouchel's (1999) hyperparameters fitted to the FDA spontaneous reporting system, in openEBGM
#: order (alpha1, beta1, alpha2, beta2, P): the default EBGM prior.
DUMOUCHEL_1999 = GammaMixturePrior(*DUMOUCHEL_1999_VALUES)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SignalConfig:
    """How statistics become signals.

    * ``alpha``, ``min_events`` (M) and ``horizon`` (T, the planned length of surveillance in
      expected events) fix the Poisson MaxSPRT critical value.
    * ``confidence``: level of the PRR/ROR intervals and the IC credibility interval.
    * ``eb05_threshold``, ``ic025_threshold``: the ``eb05`` and ``ic025`` rules.
    * ``prior``: the EBGM prior (default :data:`DUMOUCHEL_1999`).
    * ``rules`` and ``require``: the signal rule is ``any`` (or ``all``) of these rules.
    * ``strata``: what expected counts are standardised over (indirect standardisation: the
      comparator's rate in each stratum times the node's person-time in it), among ``age``
      (band at implant), ``sex``, ``region`` and ``site``; ``()`` leaves them crude.
    * ``methods``: the sequential test per outcome name (``poisson``, ``binomial``, ``cusum``)
      and, for ``binomial``, its windows (from the outcome definitions; unnamed outcomes use
      the Poisson MaxSPRT). ``binomial_max_events`` is its upper limit N on cases plus
      controls; ``cusum_odds_ratio`` and ``cusum_threshold`` the CUSUM's RA and h.
    """

    alpha: float = 0.05
    min_events: int = 3
    horizon: float = 50.0
    confidence: float = 0.95
    eb05_threshold: float = 2.0
    ic025_threshold: float = 0.0
    prior: GammaMixturePrior = DUMOUCHEL_1999
    rules: tuple[str, ...] = ("maxsprt",)
    require: Literal["any", "all"] = "any"
    strata: tuple[str, ...] = ("age", "sex")
    methods: Mapping[str, OutcomeDefinition] = field(
        default_factory=dict, compare=False, hash=False
    )
    binomial_max_events: int = 200
    cusum_odds_ratio: float = 2.0
    cusum_threshold: float = 4.5

    def __post_init__(self) -> None:
        unknown_strata = [x for x in self.strata if x not in STRATIFIERS]
        if unknown_strata:
            raise ValueError(f"strata must be among {list(STRATIFIERS)}, got {unknown_strata}")
        if self.binomial_max_events < 1:
            raise ValueError("binomial_max_events must be >= 1")
        if not (self.cusum_odds_ratio > 0 and self.cusum_odds_ratio != 1):
            raise ValueError("cusum_odds_ratio must be > 0 and not 1")
        if not self.cusum_threshold > 0:
            raise ValueError("cusum_threshold must be > 0")
        self._check()

    def method(self, outcome: str) -> str:
        """The sequential test of an outcome (``poisson`` unless its definition says)."""
        definition = self.methods.get(outcome)
        return definition.method if definition is not None else "poisson"

    def with_definitions(self, definitions: Iterable[OutcomeDefinition]) -> SignalConfig:
        """This configuration with each outcome's sequential test taken from its definition
        (definitions sharing a name must agree on it)."""
        methods: dict[str, OutcomeDefinition] = {}
        for definition in definitions:
            seen = methods.get(definition.name)
            if seen is not None and (seen.method, seen.risk_window, seen.control_window) != (
                definition.method,
                definition.risk_window,
                definition.control_window,
            ):
                raise ValueError(
                    f"definitions of {definition.name!r} disagree on the sequential method"
                )
            if definition.method != "poisson":
                methods[definition.name] = definition
        return replace(self, methods=methods)

    def binomial_design(self, outcome: str) -> CriticalValue | None:
        """The binomial MaxSPRT's critical value for an outcome with windows (``None`` when
        no critical value attains ``alpha``)."""
        definition = self.methods.get(outcome)
        if definition is None or definition.z is None:
            return None
        try:
            return binomial_critical_value(
                int(self.binomial_max_events), float(definition.z), int(self.min_events),
                self.alpha,
            )  # fmt: skip
        except ValueError:
            return None

    def _check(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if int(self.min_events) != self.min_events or self.min_events < 1:
            raise ValueError(f"min_events must be a whole number >= 1, got {self.min_events!r}")
        if not (math.isfinite(self.horizon) and self.horizon > 0):
            raise ValueError(f"horizon must be a number > 0, got {self.horizon!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        unknown = [r for r in self.rules if r not in RULES]
        if not self.rules or unknown:
            raise ValueError(f"rules must be a non-empty subset of {list(RULES)}, got {unknown}")
        if self.require not in ("any", "all"):
            raise ValueError(f"require must be 'any' or 'all', got {self.require!r}")

    @classmethod
    def from_environment(cls) -> SignalConfig:
        """The configuration the ``CONCIERGE_SIGNAL_*`` variables give (pydantic's
        ``ValidationError`` naming the variable when one is wrong)."""
        return SurveillanceSettings().signal_config()

    def critical_value(self) -> CriticalValue | None:
        """The MaxSPRT design's critical value, or ``None`` when no critical value attains
        ``alpha`` (a horizon too short for ``min_events``)."""
        try:
            return poisson_critical_value(float(self.horizon), int(self.min_events), self.alpha)
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "min_events": self.min_events,
            "horizon": self.horizon,
            "confidence": self.confidence,
            "eb05_threshold": self.eb05_threshold,
            "ic025_threshold": self.ic025_threshold,
            "prior": list(self.prior.as_tuple()),
            "rules": list(self.rules),
            "require": self.require,
            "strata": list(self.strata),
            "methods": {
                name: {
                    "method": d.method,
                    "risk_window": None if d.risk_window is None else list(d.risk_window),
                    "control_window": None if d.control_window is None else list(d.control_window),
                }
                for name, d in sorted(self.methods.items())
            },
            "binomial_max_events": self.binomial_max_events,
            "cusum_odds_ratio": self.cusum_odds_ratio,
            "cusum_threshold": self.cusum_threshold,
        }


# --------------------------------------------------------------------------- assessment


def _safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Adjustment:
    """How the expected count was standardised (indirect standardisation).

    ``expected`` = sum over strata of the comparator's outcomes per person-day in the stratum
    times the node's person-days in it; a stratum where the node has time and the comparator
    none takes the comparator's crude rate (its person-days are ``unmatched_person_days``).
    ``expected_crude`` is the comparator's crude rate times the node's person-days.
    """

    by: tuple[str, ...]
    expected: float | None
    expected_crude: float | None
    strata: tuple[dict[str, Any], ...]
    unmatched_person_days: int
    #: the disproportionality tables' expected count, (a+b)(a+c)/N, and the same standardised
    #: over strata (sum of n_node,s (a_s + c_s) / N_s, as DuMouchel's MGPS stratifies it)
    table_expected_crude: float | None
    table_expected: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": list(self.by),
            "expected": _safe(self.expected),
            "expected_crude": _safe(self.expected_crude),
            "unmatched_person_days": self.unmatched_person_days,
            "table_expected": _safe(self.table_expected),
            "table_expected_crude": _safe(self.table_expected_crude),
            "strata": [dict(s) for s in self.strata],
        }


@dataclass(frozen=True)
class MaxSPRT:
    """The Poisson MaxSPRT of a node: observed ``a`` against ``expected``, the comparator's
    outcome rate per person-day standardised to the node's strata (:class:`Adjustment`), with
    the crude expectation alongside."""

    observed: int
    expected: float | None
    person_days: int
    comparator_person_days: int
    comparator_rate: float | None  # outcomes per person-day among the comparator's exposures
    llr: float | None
    cv: float | None
    alpha_attained: float | None
    horizon: float
    min_events: int
    alpha: float
    #: the expected count has passed the planned horizon T (the nominal alpha no longer holds)
    beyond_horizon: bool
    signal: bool
    expected_crude: float | None = None
    llr_crude: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "observed": self.observed,
            "expected": _safe(self.expected),
            "expected_crude": _safe(self.expected_crude),
            "person_days": self.person_days,
            "comparator_person_days": self.comparator_person_days,
            "comparator_rate": _safe(self.comparator_rate),
            "llr": _safe(self.llr),
            "llr_crude": _safe(self.llr_crude),
            "cv": self.cv,
            "alpha_attained": self.alpha_attained,
            "horizon": self.horizon,
            "min_events": self.min_events,
            "alpha": self.alpha,
            "beyond_horizon": self.beyond_horizon,
            "signal": self.signal,
        }


@dataclass(frozen=True)
class BinomialMaxSPRT:
    """The binomial MaxSPRT of a self-controlled risk interval: among the node's exposures
    implanted early enough for both windows to have passed, events in the risk window (cases)
    against events in the control window (controls); ``z`` = control length / risk length."""

    cases: int
    controls: int
    z: float
    risk_window: tuple[int, int]
    control_window: tuple[int, int]
    periods: tuple[str, ...]  # implant quarters with complete follow-up
    llr: float | None
    cv: float | None  # as R Sequential's CV.Binomial reports it (attainable LLR at the boundary)
    cv_midpoint: float | None  # what the decision compares with (our own field)
    alpha_attained: float | None
    max_events: int
    min_events: int
    beyond_horizon: bool
    signal: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "controls": self.controls,
            "z": self.z,
            "risk_window": list(self.risk_window),
            "control_window": list(self.control_window),
            "periods": list(self.periods),
            "llr": _safe(self.llr),
            "cv": self.cv,
            "cv_midpoint": self.cv_midpoint,
            "alpha_attained": self.alpha_attained,
            "max_events": self.max_events,
            "min_events": self.min_events,
            "beyond_horizon": self.beyond_horizon,
            "signal": self.signal,
        }


@dataclass(frozen=True)
class Cusum:
    """The risk-adjusted Bernoulli CUSUM (Steiner et al. 2000) of a node's exposures, one step
    per implant quarter: each exposure's predicted risk is the comparator's risk of the outcome
    in its stratum and quarter."""

    steps: tuple[dict[str, Any], ...]
    score: float
    threshold: float
    odds_ratio: float
    signal: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [dict(s) for s in self.steps],
            "score": self.score,
            "threshold": self.threshold,
            "odds_ratio": self.odds_ratio,
            "signal": self.signal,
        }


@dataclass(frozen=True)
class Assessment:
    """Every number for one (node, outcome[, period]) and the rules that fired."""

    node: str
    level: str
    device_class: str
    outcome: str
    period: str | None
    at: date
    comparator: str  # what c and d count: "class <name>" or "other classes"
    a: int
    b: int
    c: int
    d: int
    disproportionality: DisproportionalityResult
    ebgm: EBGMResult | None
    maxsprt: MaxSPRT
    rules: dict[str, bool]
    signal: bool
    config: SignalConfig = field(repr=False)
    adjustment: Adjustment | None = None
    #: the outcome's sequential test (``poisson``, ``binomial``, ``cusum``): the ``maxsprt`` rule
    method: str = "poisson"
    binomial: BinomialMaxSPRT | None = None
    cusum: Cusum | None = None
    #: the multiplicity control the signal passed (``pair``: the per-pair rule at its own alpha;
    #: ``tree_scan``: the tree-based scan at a look of the alpha-spending plan), with its numbers
    controls: tuple[dict[str, Any], ...] = ()

    @property
    def fired(self) -> tuple[str, ...]:
        return tuple(r for r in RULES if self.rules.get(r))

    @property
    def strength(self) -> float:
        """The sequential statistic over its boundary (1 or more: at or over it)."""
        if self.method == "binomial" and self.binomial is not None:
            llr, cv = self.binomial.llr, self.binomial.cv
        elif self.method == "cusum" and self.cusum is not None:
            llr, cv = self.cusum.score, self.cusum.threshold
        else:
            llr, cv = self.maxsprt.llr, self.maxsprt.cv
        return float(llr / cv) if llr is not None and cv else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``nan``/``inf`` become ``None``."""
        adjusted_ic = self.adjusted_ic()
        return {
            "node": self.node,
            "level": self.level,
            "device_class": self.device_class,
            "outcome": self.outcome,
            "period": self.period,
            "at": self.at.isoformat(),
            "comparator": self.comparator,
            "table": {"a": self.a, "b": self.b, "c": self.c, "d": self.d},
            "disproportionality": self.disproportionality.to_dict(),
            "ebgm": None if self.ebgm is None else self.ebgm.to_dict(),
            "maxsprt": self.maxsprt.to_dict(),
            "method": self.method,
            "binomial": None if self.binomial is None else self.binomial.to_dict(),
            "cusum": None if self.cusum is None else self.cusum.to_dict(),
            "adjustment": None if self.adjustment is None else self.adjustment.to_dict(),
            "adjusted_ic": {
                "ic": _safe(adjusted_ic[0]),
                "ic025": _safe(adjusted_ic[1]),
                "ic975": _safe(adjusted_ic[2]),
            },
            "rules": dict(self.rules),
            "fired": list(self.fired),
            "signal": self.signal,
            "controls": [dict(c) for c in self.controls],
            "config": self.config.to_dict(),
        }

    def adjusted_ic(self) -> tuple[float | None, float | None, float | None]:
        """IC with IC025/IC975 against the stratified table expectation."""
        expected = self.adjustment.table_expected if self.adjustment is not None else None
        if expected is None:
            expected = self.disproportionality.expected
        return information_component_of(self.a, expected, credibility=self.config.confidence)


def _day(at: date | datetime | None, counters: Counters) -> date:
    if isinstance(at, datetime):
        return at.astimezone(UTC).date() if at.tzinfo else at.date()
    if at is not None:
        return at
    return counters.latest_day or date(1970, 1, 1)


Strata = dict[tuple[str, ...], float]


def _add(into: Strata, values: Mapping[tuple[str, ...], float], sign: float = 1.0) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + sign * value


def _days(times: Mapping[tuple[str, ...], PersonTime], day: date) -> Strata:
    return {key: float(t.days(day)) for key, t in times.items()}


def _comparator_nodes(counters: Counters, level: str, node: str) -> tuple[list[str], str]:
    device_class = parse_node(node)[1][0]
    if level == "class":
        return [n for _, n in counters.nodes("class") if n != node], "other classes"
    return [device_class], f"class {device_class}"


def _stratified(
    counters: Counters,
    level: str,
    node: str,
    outcome: str,
    period: str | Collection[str] | None,
    site: str | Collection[str] | None,
    day: date,
    by: tuple[str, ...],
) -> tuple[Strata, Strata, Strata, Strata, Strata, Strata]:
    """Per stratum: the node's outcomes, exposures and person-days, and the comparator's."""
    comparators, _ = _comparator_nodes(counters, level, node)
    node_events: Strata = {}
    node_exposed: Strata = {}
    node_days: Strata = {}
    _add(node_events, counters.stratified(level, node, outcome, period, site, by))
    _add(node_exposed, counters.stratified(level, node, EXPOSED, period, site, by))
    _add(node_days, _days(counters.stratified_time(level, node, period, site, by), day))
    events: Strata = {}
    exposed: Strata = {}
    days: Strata = {}
    for other in comparators:
        _add(events, counters.stratified("class", other, outcome, period, site, by))
        _add(exposed, counters.stratified("class", other, EXPOSED, period, site, by))
        _add(days, _days(counters.stratified_time("class", other, period, site, by), day))
    if level != "class":
        _add(events, node_events, -1.0)
        _add(exposed, node_exposed, -1.0)
        _add(days, node_days, -1.0)
    return node_events, node_exposed, node_days, events, exposed, days


def _adjustment(
    by: tuple[str, ...],
    a: int,
    node_events: Strata,
    node_exposed: Strata,
    node_days: Strata,
    events: Strata,
    exposed: Strata,
    days: Strata,
) -> Adjustment:
    total_events, total_days = sum(events.values()), sum(days.values())
    crude_rate = total_events / total_days if total_days > 0 else None
    node_total = sum(node_days.values())
    expected_crude = crude_rate * node_total if crude_rate is not None else None
    expected = 0.0
    unmatched = 0
    strata = []
    for key in sorted(set(node_days) | set(node_exposed) | set(days)):
        mine, theirs = node_days.get(key, 0.0), days.get(key, 0.0)
        rate = events.get(key, 0.0) / theirs if theirs > 0 else None
        if mine > 0 and rate is None:
            unmatched += int(mine)
            rate_used = crude_rate
        else:
            rate_used = rate
        part = mine * rate_used if rate_used is not None and mine > 0 else 0.0
        expected += part
        strata.append(
            {
                "stratum": dict(zip(by, key, strict=True)),
                "observed": int(node_events.get(key, 0)),
                "person_days": int(mine),
                "exposed": int(node_exposed.get(key, 0)),
                "comparator_events": int(events.get(key, 0)),
                "comparator_person_days": int(theirs),
                "comparator_rate": rate,
                "expected": part,
            }
        )
    table_crude_n = sum(node_exposed.values()) + sum(exposed.values())
    table_expected_crude = (
        sum(node_exposed.values()) * (a + total_events) / table_crude_n if table_crude_n else None
    )
    table_expected = 0.0
    for key, n_node in node_exposed.items():
        n_all = n_node + exposed.get(key, 0.0)
        if n_all > 0:
            table_expected += n_node * (node_events.get(key, 0.0) + events.get(key, 0.0)) / n_all
    return Adjustment(
        by=by,
        expected=expected if crude_rate is not None else None,
        expected_crude=expected_crude,
        strata=tuple(strata),
        unmatched_person_days=unmatched,
        table_expected_crude=table_expected_crude,
        table_expected=table_expected if table_crude_n else None,
    )


def assess(
    counters: Counters,
    node: str,
    outcome: str,
    period: str | Collection[str] | None = None,
    *,
    site: str | Collection[str] | None = None,
    at: date | datetime | None = None,
    config: SignalConfig | None = None,
    tree: Mapping[str, Any] | None = None,
) -> Assessment:
    """The statistics of ``outcome`` on ``node`` (e.g. ``"hip/Orthomedica/Acetabulon X2"``).

    The 2x2 table counts exposures (implanted in ``period``, at ``site``, when given)::

                                       with outcome   without
        this node                           a            b
        other nodes of the same class       c            d

    For a class node the comparator is every other class. Person-days are measured at ``at``
    (default: the latest date in the counters). Expected counts are standardised over
    ``config.strata`` (:class:`Adjustment`); the crude ones are kept alongside. ``config``
    defaults to :meth:`SignalConfig.from_environment`. ``tree`` is what the tree-based scan
    said of this pair at the look where it signalled (the ``tree_scan`` rule), if it did.
    """
    config = config or SignalConfig.from_environment()
    level, parts = parse_node(node)
    device_class = parts[0]
    day = _day(at, counters)
    _, comparator = _comparator_nodes(counters, level, node)
    strata = _stratified(counters, level, node, outcome, period, site, day, config.strata)
    node_events, node_exposed, node_days, events, exposed, days = strata
    a = round(sum(node_events.values()))
    total_exposed = round(sum(node_exposed.values()))
    c = round(sum(events.values()))
    d = round(sum(exposed.values())) - c
    b = total_exposed - a
    if min(a, b, c, d) < 0:
        raise ValueError(f"inconsistent counters for {node!r} / {outcome!r}: {(a, b, c, d)}")
    adjustment = _adjustment(config.strata, a, *strata)
    table = disproportionality(a, b, c, d, confidence=config.confidence)
    table_expected = adjustment.table_expected
    scores = (
        ebgm_scores(a, table_expected, config.prior)
        if table_expected is not None and table_expected > 0
        else None
    )
    maxsprt = _maxsprt(
        a, c, int(sum(node_days.values())), int(sum(days.values())), adjustment, config
    )
    method = config.method(outcome)
    binomial = (
        _binomial(counters, level, node, outcome, period, site, day, config)
        if method == "binomial"
        else None
    )
    cusum = (
        _cusum(counters, level, node, outcome, period, site, config) if method == "cusum" else None
    )
    sequential = maxsprt.signal
    if method == "binomial":
        sequential = binomial is not None and binomial.signal
    elif method == "cusum":
        sequential = cusum is not None and cusum.signal
    _, ic025, _ = information_component_of(
        a, table_expected if table_expected is not None else table.expected,
        credibility=config.confidence,
    )  # fmt: skip
    rules = {
        "maxsprt": sequential,
        "evans": table.evans_signal,
        "prr_ci": table.prr_ci[0] is not None and table.prr_ci[0] > 1.0,
        "ror_ci": table.ror_ci[0] is not None and table.ror_ci[0] > 1.0,
        "ic025": ic025 is not None and ic025 > config.ic025_threshold,
        "eb05": scores is not None and scores.eb05 >= config.eb05_threshold,
        "tree_scan": tree is not None,
    }
    chosen = [rules[r] for r in config.rules]
    signal = all(chosen) if config.require == "all" else any(chosen)
    period_label = period if isinstance(period, str) or period is None else ",".join(sorted(period))
    controls: list[dict[str, Any]] = []
    pair_rules = [r for r in config.rules if r != "tree_scan" and rules[r]]
    if signal and pair_rules:
        controls.append(
            {
                "control": "pair",
                "description": "the per-pair rule at its own alpha, not adjusted for the "
                "number of (node, outcome) pairs or looks",
                "rules": pair_rules,
                "alpha": config.alpha,
            }
        )
    if signal and tree is not None and "tree_scan" in config.rules:
        controls.append({"control": "tree_scan", **dict(tree)})
    return Assessment(
        node=node,
        level=level,
        device_class=device_class,
        outcome=outcome,
        period=period_label,
        at=day,
        comparator=comparator,
        a=a,
        b=b,
        c=c,
        d=d,
        disproportionality=table,
        ebgm=scores,
        maxsprt=maxsprt,
        rules=rules,
        signal=signal,
        config=config,
        adjustment=adjustment,
        method=method,
        binomial=binomial,
        cusum=cusum,
        controls=tuple(controls),
    )


def _maxsprt(
    observed: int,
    comparator_events: int,
    days: int,
    comparator_days: int,
    adjustment: Adjustment,
    config: SignalConfig,
) -> MaxSPRT:
    rate = comparator_events / comparator_days if comparator_days > 0 else None
    crude = rate * days if rate is not None else None
    expected = adjustment.expected if config.strata else crude
    llr = poisson_llr(observed, expected) if expected is not None and expected > 0 else None
    llr_crude = poisson_llr(observed, crude) if crude is not None and crude > 0 else None
    design = config.critical_value()
    cv = design.cv if design is not None else None
    fires = llr is not None and cv is not None and observed >= config.min_events and llr >= cv
    return MaxSPRT(
        observed=observed,
        expected=expected,
        person_days=days,
        comparator_person_days=comparator_days,
        comparator_rate=rate,
        llr=llr,
        cv=cv,
        alpha_attained=design.alpha_attained if design is not None else None,
        horizon=config.horizon,
        min_events=config.min_events,
        alpha=config.alpha,
        beyond_horizon=expected is not None and expected > config.horizon,
        signal=fires,
        expected_crude=crude,
        llr_crude=llr_crude,
    )


def _quarter_end(period: str) -> date | None:
    """The last day of a quarter such as ``2023Q1`` (``None`` for ``unknown``)."""
    if period == UNKNOWN or "Q" not in period:
        return None
    year, number = (int(x) for x in period.split("Q"))
    following = date(year + 1, 1, 1) if number == 4 else date(year, number * 3 + 1, 1)
    return following - timedelta(days=1)


def _binomial(
    counters: Counters,
    level: str,
    node: str,
    outcome: str,
    period: str | Collection[str] | None,
    site: str | Collection[str] | None,
    day: date,
    config: SignalConfig,
) -> BinomialMaxSPRT | None:
    definition = config.methods.get(outcome)
    if definition is None or definition.z is None:
        return None
    assert definition.risk_window is not None and definition.control_window is not None
    last = max(definition.risk_window[1], definition.control_window[1])
    # only implant quarters whose every exposure has had both windows pass by ``day``
    complete = []
    for quarter in counters.periods(level, node):
        end = _quarter_end(quarter)
        if end is None or not period_matches(period, quarter):
            continue
        if end.toordinal() + last <= day.toordinal():
            complete.append(quarter)
    cases = counters.count(level, node, window_outcome(outcome, "risk"), complete, site)
    controls = counters.count(level, node, window_outcome(outcome, "control"), complete, site)
    design = config.binomial_design(outcome)
    llr = binomial_llr(cases, controls, float(definition.z))
    fires = (
        design is not None
        and cases >= config.min_events
        and cases + controls <= config.binomial_max_events
        and llr >= design.threshold
    )
    return BinomialMaxSPRT(
        cases=cases,
        controls=controls,
        z=float(definition.z),
        risk_window=definition.risk_window,
        control_window=definition.control_window,
        periods=tuple(complete),
        llr=llr,
        cv=design.cv if design is not None else None,
        cv_midpoint=design.cv_midpoint if design is not None else None,
        alpha_attained=design.alpha_attained if design is not None else None,
        max_events=config.binomial_max_events,
        min_events=config.min_events,
        beyond_horizon=cases + controls > config.binomial_max_events,
        signal=fires,
    )


def _cusum(
    counters: Counters,
    level: str,
    node: str,
    outcome: str,
    period: str | Collection[str] | None,
    site: str | Collection[str] | None,
    config: SignalConfig,
) -> Cusum:
    by = config.strata
    comparators, _ = _comparator_nodes(counters, level, node)
    groups = []
    labels = []
    for quarter in counters.periods(level, node):
        if quarter == UNKNOWN or not period_matches(period, quarter):
            continue
        mine = counters.stratified(level, node, EXPOSED, quarter, site, by)
        observed = counters.count(level, node, outcome, quarter, site)
        events: Strata = {}
        exposed: Strata = {}
        for other in comparators:
            _add(events, counters.stratified("class", other, outcome, quarter, site, by))
            _add(exposed, counters.stratified("class", other, EXPOSED, quarter, site, by))
        if level != "class":
            _add(events, counters.stratified(level, node, outcome, quarter, site, by), -1.0)
            _add(exposed, mine, -1.0)
        total_events, total_exposed = sum(events.values()), sum(exposed.values())
        crude = total_events / total_exposed if total_exposed > 0 else None
        risks = []
        for key, n in mine.items():
            base = exposed.get(key, 0.0)
            risk = events.get(key, 0.0) / base if base > 0 else crude
            if risk is not None:
                risks.append((int(n), risk))
        groups.append((observed, risks))
        labels.append((quarter, observed, sum(n * r for n, r in risks)))
    steps = grouped_cusum(
        groups, odds_ratio=config.cusum_odds_ratio, threshold=config.cusum_threshold
    )
    rows = tuple(
        {"period": q, "observed": o, "expected": e, "weight": s.weight, "score": s.score}
        for (q, o, e), s in zip(labels, steps, strict=True)
    )
    score = steps[-1].score if steps else 0.0
    return Cusum(
        steps=rows,
        score=score,
        threshold=config.cusum_threshold,
        odds_ratio=config.cusum_odds_ratio,
        signal=score >= config.cusum_threshold,
    )


def assess_all(
    counters: Counters,
    level: str = "model",
    outcomes: Collection[str] | None = None,
    period: str | Collection[str] | None = None,
    *,
    at: date | datetime | None = None,
    config: SignalConfig | None = None,
) -> list[Assessment]:
    """:func:`assess` for every node of a level and every outcome counted on it (or the given
    outcomes), sorted by node then outcome."""
    config = config or SignalConfig.from_environment()
    found = []
    for _, node in counters.nodes(level):
        names = counters.outcome_names(level, node) if outcomes is None else sorted(outcomes)
        for name in names:
            found.append(assess(counters, node, name, period, at=at, config=config))
    return found


# --------------------------------------------------------------------------- lifecycle


class State(StrEnum):
    NONE = "none"
    SIGNALLED = "signalled"
    UNDER_REVIEW = "under_review"
    CONFIRMED = "confirmed"
    DISMISSED = "dismissed"
    CLOSED = "closed"


#: Moves the statistics make: ``detect`` when the signal rule fires, ``lapse`` when it stops
#: firing before anyone reviewed the signal (e.g. after a retraction).
SYSTEM_ACTIONS: dict[str, dict[State, State]] = {
    "detect": {State.NONE: State.SIGNALLED},
    "lapse": {State.SIGNALLED: State.NONE},
}
#: Moves a regulator makes.
REGULATOR_ACTIONS: dict[str, dict[State, State]] = {
    "review": {State.SIGNALLED: State.UNDER_REVIEW},
    "confirm": {State.UNDER_REVIEW: State.CONFIRMED},
    "dismiss": {State.UNDER_REVIEW: State.DISMISSED},
    "close": {State.CONFIRMED: State.CLOSED, State.DISMISSED: State.CLOSED},
    "reopen": {State.DISMISSED: State.UNDER_REVIEW, State.CLOSED: State.UNDER_REVIEW},
}
ACTIONS: dict[str, dict[State, State]] = {**SYSTEM_ACTIONS, **REGULATOR_ACTIONS}


def signal_id(node: str, outcome: str) -> str:
    """A stable id per (node, outcome)."""
    digest = hashlib.sha256(f"{node}\x1f{outcome}".encode()).hexdigest()
    return f"sig-{digest[:20]}"


def _allowed(state: State, actions: Mapping[str, Mapping[State, State]]) -> list[str]:
    return [name for name, moves in actions.items() if state in moves]


class IllegalTransition(ValueError):
    """An action the signal's state does not allow."""

    def __init__(self, signal: Signal, action: str, allowed: list[str]) -> None:
        self.signal_id = signal.id
        self.state = signal.state
        self.action = action
        self.allowed = allowed
        options = ", ".join(allowed) if allowed else "none"
        super().__init__(
            f"cannot {action} signal {signal.id} ({signal.node} / {signal.outcome}) in state "
            f"{signal.state.value!r}; allowed actions: {options}"
        )


@dataclass(frozen=True)
class Signal:
    """A (node, outcome) pair's place in the lifecycle; ``version`` counts its transitions."""

    id: str
    node: str
    outcome: str
    state: State = State.NONE
    version: int = 0
    #: the statistics snapshot of the latest transition
    statistics: dict[str, Any] | None = field(default=None, compare=False)
    updated_at: str | None = None

    @classmethod
    def new(cls, node: str, outcome: str) -> Signal:
        parse_node(node)
        return cls(id=signal_id(node, outcome), node=node, outcome=outcome)

    def allowed_actions(self) -> list[str]:
        """The regulator actions this state allows."""
        return _allowed(self.state, REGULATOR_ACTIONS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "outcome": self.outcome,
            "state": self.state.value,
            "version": self.version,
            "statistics": self.statistics,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signal:
        return cls(
            id=str(data["id"]),
            node=str(data["node"]),
            outcome=str(data["outcome"]),
            state=State(data.get("state", State.NONE.value)),
            version=int(data.get("version", 0)),
            statistics=data.get("statistics"),
            updated_at=data.get("updated_at"),
        )


def _iso(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat()


def transition(
    signal: Signal,
    action: str,
    *,
    actor: str,
    at: datetime,
    reason: str = "",
    statistics: Mapping[str, Any] | None = None,
) -> tuple[Signal, SignalEvent]:
    """Apply any action (system or regulator) and return ``(new signal, event)``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; actions: {', '.join(ACTIONS)}")
    moves = ACTIONS[action]
    if signal.state not in moves:
        raise IllegalTransition(signal, action, _allowed(signal.state, ACTIONS))
    target = moves[signal.state]
    snapshot = dict(statistics) if statistics is not None else signal.statistics
    when = _iso(at)
    new = replace(
        signal, state=target, version=signal.version + 1, statistics=snapshot, updated_at=when
    )
    event: SignalEvent = {
        "schema": SIGNAL_EVENT_SCHEMA,
        "signal": signal.id,
        "node": signal.node,
        "outcome": signal.outcome,
        "version": new.version,
        "action": action,
        "from": signal.state.value,
        "to": target.value,
        "actor": actor,
        "reason": reason,
        "statistics": snapshot,
        "at": when,
    }
    return new, event


def act(
    signal: Signal,
    action: str,
    *,
    actor: str,
    at: datetime,
    reason: str = "",
    assessment: Assessment | None = None,
) -> tuple[Signal, SignalEvent]:
    """A regulator's action (``review``, ``confirm``, ``dismiss``, ``close``, ``reopen``).
    Raises :class:`IllegalTransition` naming the allowed actions when the state forbids it."""
    if action not in REGULATOR_ACTIONS:
        raise ValueError(
            f"{action!r} is not a regulator action; actions: {', '.join(REGULATOR_ACTIONS)}"
        )
    if signal.state not in REGULATOR_ACTIONS[action]:
        raise IllegalTransition(signal, action, signal.allowed_actions())
    return transition(
        signal,
        action,
        actor=actor,
        at=at,
        reason=reason,
        statistics=None if assessment is None else assessment.to_dict(),
    )


def observe(
    signal: Signal, assessment: Assessment, *, at: datetime, actor: str = "system"
) -> tuple[Signal, SignalEvent | None]:
    """The statistic-driven move for a fresh assessment of the signal's node and outcome:
    ``detect`` (none -> signalled) when the signal rule fires, ``lapse`` (signalled -> none) when
    it no longer does; otherwise nothing (reviewed signals move only by regulator action)."""
    if (assessment.node, assessment.outcome) != (signal.node, signal.outcome):
        raise ValueError(
            f"assessment of {assessment.node!r} / {assessment.outcome!r} does not belong to "
            f"signal {signal.id} ({signal.node!r} / {signal.outcome!r})"
        )
    if signal.state is State.NONE and assessment.signal:
        fired = ", ".join(r for r in assessment.config.rules if assessment.rules.get(r))
        reason = f"signal rule fired ({fired})"
        return transition(
            signal, "detect", actor=actor, at=at, reason=reason, statistics=assessment.to_dict()
        )
    if signal.state is State.SIGNALLED and not assessment.signal:
        return transition(
            signal,
            "lapse",
            actor=actor,
            at=at,
            reason="signal rule no longer fires",
            statistics=assessment.to_dict(),
        )
    return signal, None
