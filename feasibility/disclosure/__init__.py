"""Disclosure control: what a trial sponsor may see of a feasibility answer.

Exact sets of patients go in (:mod:`.answer`), the policy says how small is too small
(:mod:`.policy`), :func:`.protection.protect` decides cell by cell what is shown, rounded or
withheld (:mod:`.solver`), against every earlier publication (:mod:`.registry`), within each
sponsor's query budget (:mod:`.budget`); the SQL tables are in :mod:`.tables`, the
``CONCIERGE_DC_*`` settings in :mod:`.settings`. The threat model
and the rules: ``docs/explanation/disclosure-control.md``.

The names below are re-exported for the transition from the single ``disclosure.py`` module:
import from the module that defines a name (``feasibility.disclosure.policy`` ...) in new code.
"""

from .answer import (
    FUNNEL_FIELDS,
    AnswerSets,
    Cell,
    FunnelStepSets,
    ProtectedAnswer,
    ProtectionAudit,
)
from .budget import BudgetExceeded, BudgetStatus, LockedOut, QueryBudget
from .policy import DisclosurePolicy
from .protection import protect
from .registry import PublicationRegistry
from .settings import DisclosureSettings, DisclosureSettingsError

__all__ = [
    "FUNNEL_FIELDS",
    "AnswerSets",
    "BudgetExceeded",
    "BudgetStatus",
    "Cell",
    "DisclosurePolicy",
    "DisclosureSettings",
    "DisclosureSettingsError",
    "FunnelStepSets",
    "LockedOut",
    "ProtectedAnswer",
    "ProtectionAudit",
    "PublicationRegistry",
    "QueryBudget",
    "protect",
]
