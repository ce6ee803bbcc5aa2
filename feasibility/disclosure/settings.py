"""Disclosure-control settings: the ``CONCIERGE_DC_*`` environment variables as one
pydantic-settings section, checked when a process starts so a bad value is one clear line, not a
traceback from the first answer. The variables are listed in README.md (Configuration); what they
mean is in ``docs/explanation/disclosure-control.md`` (Parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .policy import DisclosurePolicy

ENV_PREFIX = "CONCIERGE_DC_"


class DisclosureSettingsError(ValueError):
    """One or more ``CONCIERGE_DC_*`` variables are invalid; the message is one line naming each
    variable, what it must be and what it was."""


class DisclosureSettings(BaseSettings):
    """The ``CONCIERGE_DC_*`` variables (unset or empty ones keep their defaults)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    #: Counts under this are withheld (rule 1).
    threshold: int = Field(default=10, ge=1)
    #: Shown counts are rounded to a multiple of this (rule 2; 1: not rounded).
    rounding: int = Field(default=5, ge=1)
    #: Zero counts are withheld too.
    suppress_zero: bool = True
    #: Overlap control against differencing, with the publication registry (rule 4).
    overlap_control: bool = True
    #: Answered questions per sponsor organisation per 24 h (rule 7).
    query_budget: int = Field(default=200, ge=1)
    #: Answers in which overlap control fired, per window, before a sponsor is locked out.
    lockout_after: int = Field(default=20, ge=0)
    #: Arrival rates and accrual forecasts need a cohort history at least this long: a rate
    #: from minutes of history reads as a fact (one arrival in 90 s is "28,800 per 30 days")
    #: and tells when single patients arrived. 0: any history.
    rate_min_history_hours: float = Field(default=24.0, ge=0)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> DisclosureSettings:
        """The settings from ``environ`` (default: the process environment), or
        :class:`DisclosureSettingsError` with one line saying what is wrong."""
        try:
            if environ is None:
                return cls()
            # every field given (the default where ``environ`` has none): the process
            # environment is not read
            values: dict[str, Any] = {}
            for name, field in cls.model_fields.items():
                raw = environ.get(env_name(name))
                values[name] = raw if raw is not None and raw.strip() else field.default
            return cls(**values)
        except ValidationError as exc:
            raise DisclosureSettingsError(_one_line(exc)) from None

    def policy(self) -> DisclosurePolicy:
        return DisclosurePolicy(
            threshold=self.threshold,
            rounding=self.rounding,
            suppress_zero=self.suppress_zero,
            overlap_control=self.overlap_control,
        )


def env_name(field: str) -> str:
    """The environment variable of a :class:`DisclosureSettings` field."""
    return f"{ENV_PREFIX}{field.upper()}"


def _one_line(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        kind = error["type"]
        if kind == "greater_than_equal":
            must = f"must be at least {error['ctx']['ge']}"
        elif kind.startswith("int"):
            must = "must be an integer"
        elif kind.startswith("bool"):
            must = "must be a boolean (true/false, 1/0, yes/no, on/off)"
        else:
            must = str(error["msg"]).lower()
        problems.append(f"{env_name(field)} {must}, not {error['input']!r}")
    return "invalid disclosure-control setting: " + "; ".join(problems)


__all__ = ["DisclosureSettings", "DisclosureSettingsError", "env_name"]
