"""Device-safety surveillance's section of the configuration: how statistics become signals
(``CONCIERGE_SIGNAL_*``), the levels with live signals, and the files of outcome definitions and
device classes (``CONCIERGE_DEVICE_OUTCOMES`` / ``_CLASSES``).

See ``docs/explanation/device-surveillance.md`` for what each value does; the tree that validates
every section at start-up is :mod:`concierge.configuration`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, FilePath, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from surveillance_stream.scan import ScanPlan
    from surveillance_stream.signals import SignalConfig

#: Every rule :func:`surveillance_stream.signals.assess` evaluates.
RULES: tuple[str, ...] = (
    "maxsprt",
    "evans",
    "prr_ci",
    "ror_ci",
    "ic025",
    "eb05",
    "tree_scan",
)
#: Levels of the device hierarchy with live signals unless ``CONCIERGE_SIGNAL_LEVELS`` says.
DEFAULT_LEVELS: tuple[str, ...] = ("manufacturer", "model", "lot")
#: DuMouchel's (1999) hyperparameters fitted to the FDA spontaneous reporting system, in openEBGM
#: order (alpha1, beta1, alpha2, beta2, P): the default EBGM prior.
DUMOUCHEL_1999_VALUES = (0.2041, 0.05816, 1.415, 1.838, 0.0969)

#: A comma-separated list in the environment (``evans, maxsprt``).
CommaList = Annotated[tuple[str, ...], NoDecode]


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class SurveillanceSettings(BaseSettings):
    """How statistics become signals.

    * ``alpha``, ``min_events`` (M) and ``horizon`` (T, the planned length of surveillance in
      expected events) fix the Poisson MaxSPRT critical value.
    * ``confidence``: level of the PRR/ROR intervals and the IC credibility interval.
    * ``eb05_threshold``, ``ic025_threshold``: the ``eb05`` and ``ic025`` rules.
    * ``ebgm_prior``: the EBGM prior ``a1,b1,a2,b2,p`` (default DuMouchel 1999).
    * ``rules`` and ``require``: the signal rule is ``any`` (or ``all``) of these rules.
    * ``levels``: the levels of the device hierarchy the monitor keeps live signals for.
    * ``strata``: what expected counts are standardised over (``age``, ``sex``, ``region``,
      ``site``; ``none`` for crude expectations).
    * ``binomial_max_events``, ``cusum_odds_ratio``, ``cusum_threshold``: the binomial MaxSPRT's
      N and the CUSUM's RA and h, for outcomes whose definitions choose those tests.
    """

    model_config = SettingsConfigDict(
        env_prefix="CONCIERGE_SIGNAL_",
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
    )

    alpha: float = Field(default=0.05, gt=0, lt=1)
    min_events: int = Field(default=3, ge=1)
    horizon: float = Field(default=50.0, gt=0, allow_inf_nan=False)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    eb05_threshold: float = Field(default=2.0, allow_inf_nan=False)
    ic025_threshold: float = Field(default=0.0, allow_inf_nan=False)
    ebgm_prior: Annotated[tuple[float, ...], NoDecode] = DUMOUCHEL_1999_VALUES
    rules: CommaList = ("maxsprt",)
    require: Literal["any", "all"] = "any"
    levels: CommaList = DEFAULT_LEVELS
    #: what expected counts are standardised over (``none``: crude)
    strata: CommaList = ("age", "sex")
    #: the tree-based scan's looks: alpha over every look, planned looks, rho of the spending
    #: function, days of data between scheduled looks, least Monte Carlo replications
    scan: bool = Field(default=True, validation_alias="CONCIERGE_SCAN")
    scan_alpha: float = Field(default=0.05, gt=0, lt=1, validation_alias="CONCIERGE_SCAN_ALPHA")
    scan_looks: int = Field(default=104, ge=1, validation_alias="CONCIERGE_SCAN_LOOKS")
    scan_rho: float = Field(default=1.0, gt=0, le=10, validation_alias="CONCIERGE_SCAN_RHO")
    scan_every_days: int = Field(default=7, ge=1, validation_alias="CONCIERGE_SCAN_EVERY_DAYS")
    scan_min_seconds: float = Field(
        default=60.0, ge=0, allow_inf_nan=False, validation_alias="CONCIERGE_SCAN_MIN_SECONDS"
    )
    scan_replications: int = Field(
        default=999, ge=19, le=1_000_000, validation_alias="CONCIERGE_SCAN_REPLICATIONS"
    )
    binomial_max_events: int = Field(default=200, ge=1, le=5000)
    cusum_odds_ratio: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    cusum_threshold: float = Field(default=4.5, gt=0, allow_inf_nan=False)
    #: JSON files of outcome definitions and device classes (built-in ones when unset).
    device_outcomes: FilePath | None = Field(
        default=None, validation_alias="CONCIERGE_DEVICE_OUTCOMES"
    )
    device_classes: FilePath | None = Field(
        default=None, validation_alias="CONCIERGE_DEVICE_CLASSES"
    )

    @field_validator("strata", mode="before")
    @classmethod
    def _strata_list(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("none", ""):
            return ()
        return _split(value)

    @field_validator("strata")
    @classmethod
    def _known_strata(cls, strata: tuple[str, ...]) -> tuple[str, ...]:
        from surveillance_stream.devices import STRATIFIERS

        unknown = [x for x in strata if x not in STRATIFIERS]
        if unknown:
            raise ValueError(f"unknown strata {unknown}; any of {', '.join(STRATIFIERS)} or none")
        return strata

    @field_validator("cusum_odds_ratio")
    @classmethod
    def _not_one(cls, value: float) -> float:
        if value == 1.0:
            raise ValueError("the CUSUM's odds ratio under the alternative must not be 1")
        return value

    @field_validator("rules", "levels", "ebgm_prior", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value)

    @field_validator("device_outcomes", "device_classes", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, rules: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [r for r in rules if r not in RULES]
        if not rules or unknown:
            raise ValueError(f"must be a non-empty subset of {', '.join(RULES)}; not {unknown}")
        return rules

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, levels: tuple[str, ...]) -> tuple[str, ...]:
        from surveillance_stream.devices import LEVELS

        unknown = [x for x in levels if x not in LEVELS]
        if unknown:
            raise ValueError(f"unknown levels {unknown}; one of {', '.join(LEVELS)}")
        return levels or DEFAULT_LEVELS

    @field_validator("ebgm_prior")
    @classmethod
    def _a_prior(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        from surveillance_stream.statistics.ebgm import GammaMixturePrior

        return GammaMixturePrior.from_sequence(values).as_tuple()

    def scan_plan(self) -> ScanPlan:
        """The tree scan's looks (:class:`surveillance_stream.scan.ScanPlan`)."""
        from surveillance_stream.scan import ScanPlan
        from surveillance_stream.statistics.treescan import AlphaSpending

        return ScanPlan(
            spending=AlphaSpending(self.scan_alpha, self.scan_looks, self.scan_rho),
            every_days=self.scan_every_days,
            replications=self.scan_replications,
            min_seconds=self.scan_min_seconds,
        )

    def signal_config(self) -> SignalConfig:
        """The value the statistics read (:class:`surveillance_stream.signals.SignalConfig`),
        with the sequential test of each outcome from the outcome definitions."""
        from surveillance_stream.device_stream import load_definitions
        from surveillance_stream.signals import SignalConfig
        from surveillance_stream.statistics.ebgm import GammaMixturePrior

        config = SignalConfig(
            alpha=self.alpha,
            min_events=self.min_events,
            horizon=self.horizon,
            confidence=self.confidence,
            eb05_threshold=self.eb05_threshold,
            ic025_threshold=self.ic025_threshold,
            prior=GammaMixturePrior.from_sequence(self.ebgm_prior),
            rules=self.rules,
            require=self.require,
            strata=self.strata,
            binomial_max_events=self.binomial_max_events,
            cusum_odds_ratio=self.cusum_odds_ratio,
            cusum_threshold=self.cusum_threshold,
        )
        # each outcome's sequential test comes from its definition
        return config.with_definitions(load_definitions(self)[0])
