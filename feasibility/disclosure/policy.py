"""The disclosure-control policy: threshold, rounding, zeros and overlap control, and what a
rule means for one count (rules 1 and 2). Read from ``CONCIERGE_DC_*`` variables.

The rules and the reasons for them: ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: What every withheld cell reads, whatever its size and whatever the reason it is withheld: a
#: small count and a count withheld so that a small one cannot be worked out look alike (marking
#: them apart would bound the small one; rule 3 of the threat model).
WITHHELD = "withheld"


@dataclass(frozen=True)
class DisclosurePolicy:
    """The disclosure-control parameters. ``threshold`` and ``rounding`` are at least 1."""

    threshold: int = 10
    rounding: int = 5
    suppress_zero: bool = True
    overlap_control: bool = True

    def __post_init__(self) -> None:
        for name in ("threshold", "rounding"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        for name in ("suppress_zero", "overlap_control"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DisclosurePolicy:
        """The policy from ``CONCIERGE_DC_*`` variables (unset ones keep their defaults), read
        through :class:`~feasibility.disclosure.settings.DisclosureSettings`: a bad value raises
        its one-line ``DisclosureSettingsError``."""
        from .settings import DisclosureSettings  # settings build policies: imported late

        return DisclosureSettings.load(environ).policy()

    @property
    def floor(self) -> int:
        """The smallest value a shown non-zero count can have: the threshold rounded up to a
        multiple of ``rounding``."""
        return -(-self.threshold // self.rounding) * self.rounding

    @property
    def withheld_display(self) -> str:
        """What a withheld cell of :func:`~feasibility.disclosure.protection.protect` reads."""
        return WITHHELD

    @property
    def small_display(self) -> str:
        """``<threshold``: only for an output whose every withheld count is a small cell (rule 1
        alone, as the regulator's breakdowns), where it is true; never for ``protect()``'s
        cells, some of which are withheld to protect others and may be of any size."""
        return f"<{self.threshold}"

    def is_small(self, n: int) -> bool:
        """Rule 1: would a count of ``n`` be withheld as a small cell?"""
        return n < self.threshold and (n > 0 or self.suppress_zero)

    def rounded(self, n: int) -> int:
        """Rule 2: the shown value of a count ``n`` that is not a small cell."""
        if n == 0:
            return 0
        r = self.rounding
        return max((2 * n + r) // (2 * r) * r, self.floor)

    def rules(self) -> list[str]:
        """Human-readable statements of the rules in force (not of which ones fired)."""
        t = self.threshold
        small = f"counts under {t} suppressed"
        small += " (zero counts too)" if self.suppress_zero else " (zero counts shown)"
        rules = [small]
        if self.rounding > 1:
            rounding = f"rounded to the nearest {self.rounding}"
            if self.floor != t:
                rounding += f" (a shown count is never below {self.floor})"
            rules.append(rounding)
        rules += [
            "complementary suppression across site, region and total",
            "funnel cells protected alike",
            f'every withheld cell reads "{WITHHELD}", whatever its size: a small count, or one '
            "withheld so that a small count cannot be worked out from the others",
        ]
        if self.overlap_control:
            rules.append(
                f"overlap control: answers to questions whose cohorts differ by fewer than {t} "
                "patients are not both exact"
            )
        rules.append("no random noise: the same question gets the same answer")
        return rules

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "rounding": self.rounding,
            "suppress_zero": self.suppress_zero,
            "overlap_control": self.overlap_control,
        }


__all__ = ["WITHHELD", "DisclosurePolicy"]
