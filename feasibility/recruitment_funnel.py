"""The ``recruitment`` block of a saved question's answer: how far the trial's invited patients
have got, per invitation state, under the sponsor's disclosure control.

The exact counts come from recruitment through the
:class:`core.contracts.invitations.InvitedByState` contract (``recruitment.funnel``); only what
:func:`protect_recruitment` lets through reaches the sponsor. Each invited patient is counted
once, in the state of their latest invitation for the trial, so the states partition the
invited patients and the threshold is about people, not invitations.

Protection reuses :func:`feasibility.disclosure.protection.protect` with the relation *total =
sum of the states*: small cells are withheld, shown counts are rounded, and complementary
suppression makes sure no withheld state can be recovered by subtracting the shown ones from the
total (nor a group of withheld states add up to fewer than the threshold). The sets handed to
``protect`` are stand-ins with the exact sizes and the same partition structure, not patient
ids, so overlap control against earlier publications (rule 4) does not apply to this block.

There is no per-site breakdown: a state-by-site table is mostly small (and, under
``suppress_zero``, zero) cells, and protecting it would withhold the per-state counts too. See
``docs/reference/recruitment.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pyroaring import BitMap

from core.contracts.invitations import INVITATION_STATES

from .disclosure.answer import AnswerSets, ProtectionAudit, withheld_among
from .disclosure.policy import DisclosurePolicy
from .disclosure.protection import protect

#: Invitation states in lifecycle order (the order of the block's ``by_state``).
STATES: tuple[str, ...] = INVITATION_STATES

_ALL = "all"
COUNTED = "patients invited to this trial, each in the state of their latest invitation"


def rules(policy: DisclosurePolicy) -> list[str]:
    """The rules in force for this block, in words."""
    small = f"counts under {policy.threshold} suppressed" + (
        " (zero counts too)" if policy.suppress_zero else " (zero counts shown)"
    )
    out = [small]
    if policy.rounding > 1:
        out.append(f"rounded to the nearest {policy.rounding}")
    out += [
        "complementary suppression across the states and the total",
        f'every withheld cell reads "{policy.withheld_display}", whatever its size',
    ]
    return out


def protect_recruitment(
    counts: Mapping[str, int], policy: DisclosurePolicy
) -> tuple[dict[str, Any], ProtectionAudit]:
    """The sponsor's view of exact ``state -> patients`` counts, and the audit bookkeeping."""
    unknown = set(counts) - set(STATES)
    if unknown:
        raise ValueError(f"unknown invitation states: {sorted(unknown)}")
    by_state: dict[str, BitMap] = {}
    start = 0
    for state in STATES:
        n = int(counts.get(state, 0))
        if n < 0:
            raise ValueError(f"negative count for {state}")
        by_state[state] = BitMap(range(start, start + n))
        start += n
    total = BitMap(range(start))
    # The states play the part of sites in one region (the total): protect() then relates
    # total = sum of the states, exactly the relation a reader could difference.
    answer = AnswerSets(
        cohort=total,
        by_site=by_state,
        site_region=dict.fromkeys(STATES, _ALL),
        by_region={_ALL: total},
        funnel=(),
    )
    # The stand-in sets mean nothing to the publication registry: no overlap control here.
    local = dataclasses.replace(policy, overlap_control=False)
    protected, audit = protect(answer, local, None, "", "")
    block: dict[str, Any] = {
        "available": True,
        "counts": COUNTED,
        "total": protected.total.to_dict(),
        "by_state": {state: protected.by_site[state].to_dict() for state in STATES},
        "rules": rules(policy),
    }
    note = withheld_among(
        {state: protected.by_site[state] for state in STATES},
        "invitation state",
        "invitation states",
    )
    block["notes"] = [] if note is None else [note]
    return block, audit


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


__all__ = [
    "COUNTED",
    "STATES",
    "protect_recruitment",
    "rules",
    "unavailable",
]
