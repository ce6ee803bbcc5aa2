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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, Literal

from core.contracts.signals import SIGNAL_EVENT_SCHEMA, SignalEvent
from surveillance_stream.devices import EXPOSED, Counters, parse_node
from surveillance_stream.settings import DUMOUCHEL_1999_VALUES, RULES, SurveillanceSettings
from surveillance_stream.statistics import (
    CriticalValue,
    DisproportionalityResult,
    EBGMResult,
    GammaMixturePrior,
    disproportionality,
    ebgm_scores,
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

    def __post_init__(self) -> None:
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
        }


# --------------------------------------------------------------------------- assessment


def _safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class MaxSPRT:
    """The Poisson MaxSPRT of a node: observed ``a`` against ``expected`` =
    comparator outcomes per person-day x the node's person-days."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "observed": self.observed,
            "expected": _safe(self.expected),
            "person_days": self.person_days,
            "comparator_person_days": self.comparator_person_days,
            "comparator_rate": _safe(self.comparator_rate),
            "llr": _safe(self.llr),
            "cv": self.cv,
            "alpha_attained": self.alpha_attained,
            "horizon": self.horizon,
            "min_events": self.min_events,
            "alpha": self.alpha,
            "beyond_horizon": self.beyond_horizon,
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

    @property
    def fired(self) -> tuple[str, ...]:
        return tuple(r for r in RULES if self.rules.get(r))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``nan``/``inf`` become ``None``."""
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
            "rules": dict(self.rules),
            "fired": list(self.fired),
            "signal": self.signal,
            "config": self.config.to_dict(),
        }


def _day(at: date | datetime | None, counters: Counters) -> date:
    if isinstance(at, datetime):
        return at.astimezone(UTC).date() if at.tzinfo else at.date()
    if at is not None:
        return at
    return counters.latest_day or date(1970, 1, 1)


def assess(
    counters: Counters,
    node: str,
    outcome: str,
    period: str | Collection[str] | None = None,
    *,
    site: str | Collection[str] | None = None,
    at: date | datetime | None = None,
    config: SignalConfig | None = None,
) -> Assessment:
    """The statistics of ``outcome`` on ``node`` (e.g. ``"hip/Orthomedica/Acetabulon X2"``).

    The 2x2 table counts exposures (implanted in ``period``, at ``site``, when given)::

                                       with outcome   without
        this node                           a            b
        other nodes of the same class       c            d

    For a class node the comparator is every other class. Person-days are measured at ``at``
    (default: the latest date in the counters). ``config`` defaults to
    :meth:`SignalConfig.from_environment`.
    """
    config = config or SignalConfig.from_environment()
    level, parts = parse_node(node)
    device_class = parts[0]
    day = _day(at, counters)
    a = counters.count(level, node, outcome, period, site)
    exposed = counters.count(level, node, EXPOSED, period, site)
    if level == "class":
        comparators = [n for _, n in counters.nodes("class") if n != node]
        comparator = "other classes"
    else:
        comparators = [device_class]
        comparator = f"class {device_class}"
    with_outcome = sum(counters.count("class", n, outcome, period, site) for n in comparators)
    total = sum(counters.count("class", n, EXPOSED, period, site) for n in comparators)
    comparator_days = sum(counters.person_days("class", n, day, period, site) for n in comparators)
    node_days = counters.person_days(level, node, day, period, site)
    if level != "class":
        with_outcome -= a
        total -= exposed
        comparator_days -= node_days
    b, c = exposed - a, with_outcome
    d = total - with_outcome
    if min(a, b, c, d) < 0:
        raise ValueError(f"inconsistent counters for {node!r} / {outcome!r}: {(a, b, c, d)}")
    table = disproportionality(a, b, c, d, confidence=config.confidence)
    expected = table.expected
    scores = (
        ebgm_scores(a, expected, config.prior) if expected is not None and expected > 0 else None
    )
    maxsprt = _maxsprt(a, c, node_days, comparator_days, config)
    rules = {
        "maxsprt": maxsprt.signal,
        "evans": table.evans_signal,
        "prr_ci": table.prr_ci[0] is not None and table.prr_ci[0] > 1.0,
        "ror_ci": table.ror_ci[0] is not None and table.ror_ci[0] > 1.0,
        "ic025": table.ic025 is not None and table.ic025 > config.ic025_threshold,
        "eb05": scores is not None and scores.eb05 >= config.eb05_threshold,
    }
    chosen = [rules[r] for r in config.rules]
    signal = all(chosen) if config.require == "all" else any(chosen)
    period_label = period if isinstance(period, str) or period is None else ",".join(sorted(period))
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
    )


def _maxsprt(
    observed: int, comparator_events: int, days: int, comparator_days: int, config: SignalConfig
) -> MaxSPRT:
    rate = comparator_events / comparator_days if comparator_days > 0 else None
    expected = rate * days if rate is not None else None
    llr = poisson_llr(observed, expected) if expected is not None and expected > 0 else None
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
