"""A node's side: what of its answer may go to the hub, and the exact counts for the hub's
administrators.

:func:`protected_reply` keeps, of the node's own sponsor answer, only the published cells
(already under the node's disclosure control) and a coarse ``as_of``; everything else the
single-node answer carries for its own sponsors (the question's fingerprint is kept: it is a
digest of the criteria the hub sent) is dropped by a whitelist, so a field added to answers later
does not leak to the hub by default. The snapshot's exact patient count and topic offsets are
not sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.contracts.invitations import RECRUITMENT_KINDS
from feasibility.disclosure.answer import FUNNEL_FIELDS, AnswerSets

from .settings import NodeSettings
from .tokens import HubQuestion, load_private_file, load_public_file, verify_question

#: The keys of a cell the hub may see.
_CELL = ("value", "display", "suppressed")
#: Of ``as_of``, only how current the node's data is (for a live answer also the stream's
#: time and whether the cohort view is caught up; never topic offsets or patient counts).
_AS_OF = ("max_ingested_at", "caught_up", "ready", "stream_time", "cohort_caught_up")


def _cell(cell: Mapping[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in _CELL}


def protected_reply(node: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the node's protected answer ``body`` that goes to the hub."""
    as_of = body.get("as_of", {})
    return {
        "node": node,
        "mode": "protected",
        "question": body.get("question"),
        "evaluated_at": body.get("evaluated_at"),
        "total": _cell(body["total"]),
        "by_region": {k: _cell(v) for k, v in body["by_region"].items()},
        "by_site": {k: _cell(v) for k, v in body["by_site"].items()},
        "funnel": [
            {"label": s["label"], "kind": s["kind"], **{f: _cell(s[f]) for f in FUNNEL_FIELDS}}
            for s in body["funnel"]
        ],
        "rules": list(body.get("rules", [])),
        "policy": dict(body.get("policy", {})),
        "as_of": {k: as_of[k] for k in _AS_OF if k in as_of},
    }


def recruitment_reply(block: Mapping[str, Any]) -> dict[str, Any]:
    """Of the node's protected ``recruitment`` block (invited patients per invitation state,
    under its disclosure control), the cells only; candidates never leave the node."""
    if not block.get("available"):
        return {"available": False}
    return {
        "available": True,
        "total": _cell(block["total"]),
        "by_state": {k: _cell(v) for k, v in block["by_state"].items()},
    }


def live_reply(
    node: str,
    trial: str,
    version: int,
    body: Mapping[str, Any],
    recruitment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The part of the node's protected *live* answer to a saved question that goes to the hub:
    the same cells as :func:`protected_reply`, which saved question and version, and the
    protected cells of its recruitment funnel (:func:`recruitment_reply`)."""
    return {
        **protected_reply(node, body),
        "trial": trial,
        "version": version,
        "kind": "saved",
        "recruitment": recruitment_reply(recruitment or {"available": False}),
    }


def _cell_or_none(cell: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if cell is None else _cell(cell)


def sites_reply(node: str, trial: str, version: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """Of the node's protected site selection for a saved question (the workspace's ``sites``
    output, under its disclosure control), what the hub needs to rank sites and forecast
    across nodes: per site its code (not its name: as in :func:`protected_reply`, sites go by
    code only), region and published cells (eligible now, new eligible
    in the window, the recruitment states at recruiting sites); the trial's totals; the window
    and the rounding the cells were shown at. Rates and projections are left out (the hub
    recomputes them from these cells with the target across nodes); the cohort history's
    baseline instant and everything else are dropped by this whitelist."""
    history = body.get("history", {})
    policy = body.get("policy", {})
    sites = []
    for row in body["sites"]:
        out: dict[str, Any] = {
            "site": row["site"],
            "region": row.get("region"),
            "recruiting": bool(row.get("recruiting")),
            "eligible_now": _cell(row["eligible_now"]),
            "new_eligible": _cell_or_none(row.get("new_eligible")),
        }
        for kind in RECRUITMENT_KINDS:
            if kind in row:
                out[kind] = _cell(row[kind])
        sites.append(out)
    totals = body.get("totals", {})
    return {
        "node": node,
        "mode": "sites",
        "trial": trial,
        "version": version,
        "evaluated_at": body.get("evaluated_at"),
        "total": _cell(body["total"]),
        "history": {
            "available": bool(history.get("available")),
            "window_days": history.get("window_days") if history.get("available") else None,
            "reason": history.get("reason"),
        },
        "rounding": int(policy.get("rounding", 1)),
        "recruitment": {"available": bool(body.get("recruitment", {}).get("available"))},
        "sites": sites,
        "totals": {
            "new_eligible": _cell_or_none(totals.get("new_eligible")),
            "from": totals.get("from"),
            **{k: _cell(totals[k]) for k in RECRUITMENT_KINDS if k in totals},
        },
        "rules": list(body.get("rules", [])),
    }


def exact_reply(node: str, sets: AnswerSets, evaluated_at: str) -> dict[str, Any]:
    """Exact counts (no disclosure control) for a hub administrator: sizes of sets only."""
    return {
        "node": node,
        "mode": "exact",
        "evaluated_at": evaluated_at,
        "total": len(sets.cohort),
        "by_region": {k: len(v) for k, v in sorted(sets.by_region.items())},
        "by_site": {k: len(v) for k, v in sorted(sets.by_site.items())},
        "funnel": [
            {"label": s.label, "kind": s.kind, **{f: len(getattr(s, f)) for f in FUNNEL_FIELDS}}
            for s in sets.funnel
        ],
    }


class NodeNotConfigured(RuntimeError):
    """The node's keys are not set: it answers no hub."""


@dataclass
class Node:
    """This API as a node of one hub: its name and key, the hub's name and public key."""

    id: str
    key: Ed25519PrivateKey
    hub: str
    hub_key: Ed25519PublicKey
    allow_exact: bool = False

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> Node:
        if settings.id is None:
            raise NodeNotConfigured("CONCIERGE_NODE_ID is not set")
        if settings.key_file is None or settings.hub_public_key_file is None:
            raise NodeNotConfigured(
                "a node needs CONCIERGE_NODE_KEY_FILE and CONCIERGE_NODE_HUB_PUBLIC_KEY_FILE"
            )
        return cls(
            id=settings.id,
            key=load_private_file(Path(settings.key_file)),
            hub=settings.hub_id,
            hub_key=load_public_file(Path(settings.hub_public_key_file)),
            allow_exact=settings.allow_exact,
        )

    def verify(self, token: str, body: bytes) -> HubQuestion:
        """The hub's question, checked (:class:`~federation.tokens.SignatureError`)."""
        return verify_question(token, self.hub_key, self.hub, self.id, body)

    def org_of(self, question: HubQuestion) -> str:
        """The organisation the node charges and records for a hub question: the sponsor as the
        hub names it, under the hub's name (a hub's sponsors never share a budget with this
        node's own sponsors of the same name)."""
        return f"{question.hub}/{question.org}"


__all__ = [
    "Node",
    "NodeNotConfigured",
    "exact_reply",
    "live_reply",
    "protected_reply",
    "recruitment_reply",
    "sites_reply",
]
