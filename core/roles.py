"""The roles a bearer token can carry, in a module of their own: the API's authorisation
(:mod:`core.auth`, which loads FastAPI) and the CLI's ``concierge token create`` (which should
not) read the one list."""

from __future__ import annotations

from typing import Literal, get_args

Role = Literal[
    "sponsor",
    "clinician",
    "regulator",
    "source",
    "admin",
    "trial_data_manager",
    "statistician",
    "safety_contact",
]
ROLES: tuple[str, ...] = get_args(Role)  # the one list, in the Literal above
#: The trial team's roles: each token names the trials it serves (``trials``).
TRIAL_ROLES: tuple[str, ...] = ("trial_data_manager", "statistician", "safety_contact")

__all__ = ["ROLES", "TRIAL_ROLES", "Role"]
