"""``protect()``: the sponsor's view of an exact answer under a policy, matched against and
recorded in the publication registry. The rules: ``docs/explanation/disclosure-control.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from pyroaring import BitMap

from .answer import (
    FUNNEL_FIELDS,
    AnswerSets,
    ProtectedAnswer,
    ProtectionAudit,
    withheld_among,
    withheld_parts,
)
from .policy import DisclosurePolicy
from .registry import SEEN_PER_CELL, PublicationRegistry
from .solver import ProtectionPlan


def protect(
    answer: AnswerSets,
    policy: DisclosurePolicy,
    registry: PublicationRegistry | None,
    org: str,
    fingerprint: str,
    numbering: Callable[[BitMap], BitMap] | None = None,
) -> tuple[ProtectedAnswer, ProtectionAudit]:
    """The sponsor's view of ``answer`` under ``policy``, and the audit bookkeeping.

    With ``policy.overlap_control`` a ``registry`` is required (it fails closed): the answer is
    matched against every earlier publication, and its own publications are recorded for ``org``
    and the question ``fingerprint``. Raises ``ValueError`` if the sets are inconsistent (sites
    overlapping, a funnel step not partitioned, ...), since the protection relies on the relations
    between them.
    """
    if policy.overlap_control and registry is None:
        raise ValueError("overlap control is on: protect() needs a PublicationRegistry")
    used = registry if policy.overlap_control else None
    if used is not None and numbering is not None:
        # the registry's patient numbers, shared by every process on its database
        answer = answer.renumbered(numbering)
    plan = ProtectionPlan(answer, policy)
    guard: AbstractContextManager[Any] = used.lock if used is not None else nullcontext()
    with guard:
        if used is not None:
            used.refresh()
            plan.initialise(lambda bits: used.match(bits, policy.threshold))
            plan.import_relations(used)
        else:
            plan.initialise(lambda bits: None)
        plan.solve()
        if used is None:
            audit = plan.audit()
        else:
            # the same question re-asked by the same organisation (polled live, or asked again
            # after the data drifted): what it saw before is no news (see rule 4)
            shown: dict[str, Any] = {"cells": plan.displays(), "policy": policy.to_dict()}
            last = used.last_answer(org, fingerprint)
            seen: dict[str, list[str]] = {}
            if last is not None and last.get("policy") == shown["policy"]:
                seen = {k: list(v) for k, v in last.get("seen", {}).items()}
                for name, display in last["cells"].items():
                    seen.setdefault(name, [])
                    if display not in seen[name]:
                        seen[name] = [*seen[name], display][-SEEN_PER_CELL:]
            audit = plan.audit(seen)
            rows, relations = plan.publications()
            unchanged = last is not None and {k: last.get(k) for k in shown} == shown
            shown["seen"] = seen
            if unchanged and all(row.copied_from is not None for row in rows):
                # every set is an earlier publication or a copy of one, and the reader sees
                # exactly what it saw: nothing to record, nothing learnt
                audit = replace(audit, republished=True)
            else:
                # sets published fresh (as after a restart renumbered the patients) are recorded
                # even when their displays are unchanged: later neighbours must find them
                used.record(
                    rows,
                    org,
                    fingerprint,
                    audit.overlap_hits,
                    relations,
                    answer=None if unchanged else shown,
                )

    by_site = {s: plan.cell(f"site:{s}") for s in plan.sites}
    by_region = {r: plan.cell(f"region:{r}") for r in plan.regions}
    # what cannot all be shown, in words: a withheld cell may be of any size (issue 11)
    notes = [
        note
        for note in (
            withheld_among(by_site, "site", "sites"),
            withheld_among(by_region, "region", "regions"),
        )
        if note is not None
    ]
    funnel: list[dict[str, Any]] = []
    for i, step in enumerate(answer.funnel):
        row: dict[str, Any] = {"label": step.label, "kind": step.kind}
        for f in FUNNEL_FIELDS:
            row[f] = plan.cell(f"funnel:{i}:{f}")
        row["note"] = withheld_parts([f for f in FUNNEL_FIELDS if row[f].suppressed])
        if row["note"] is not None:
            notes.append(f'funnel step "{step.label}": {row["note"]}')
        funnel.append(row)
    protected = ProtectedAnswer(
        total=plan.cell("total"),
        by_site=by_site,
        by_region=by_region,
        funnel=funnel,
        rules=policy.rules(),
        policy=policy.to_dict(),
        notes=notes,
        extra={name: plan.cell(name) for name in sorted(answer.extra)},
    )
    return protected, audit


__all__ = ["protect"]
