"""The hub's combination of node answers: the federated disclosure scheme.

**Each node protects, the hub only adds what was published.** A node answers the hub exactly as
it answers a sponsor: its own disclosure control (small cells, rounding, complementary
suppression, overlap control against its global registry, budget) runs on its own exact sets,
and only the protected cells leave it. The hub holds nothing else, so everything it shows is a
function of cells already published by the nodes:

* a combined cell (the total, a region, a site named by several nodes, a funnel cell) is the sum
  of the nodes' shown values when every answering node shows its part, and ``withheld``
  otherwise (whatever the other parts are: a partial sum would bound the hidden part);
* per node, each node's own total as it published it.

Why this holds across nodes (``docs/explanation/federation.md``): the attacker's equations about
different nodes share no unknowns (a node's cells are sums over its own patients only), and a
combined cell adds no equation that the nodes' cells do not already imply. A sum of unknowns
from different nodes is therefore determined only if each of them is, and each node's own
protection already keeps its small cells from being determined, against any sequence of
questions, from any sponsors (its registry is global) and any subset of nodes (a node's answer
does not depend on which other nodes were asked). A group of 1+2+3 patients split over three
nodes is three small cells, each withheld at its node, and their sum is withheld at the hub.

The price: a combined count whose every part is small (4+4+4) is withheld although 12 would be
shown by one node; see the document for the alternatives weighed (secure aggregation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feasibility.disclosure.answer import FUNNEL_FIELDS, Cell, withheld_among
from feasibility.disclosure.policy import WITHHELD

#: A published cell as nodes send it: ``{"value": int | None, "display": str, "suppressed": bool}``.
CellDict = dict[str, Any]

#: The rules the hub adds to each node's own.
HUB_RULES = (
    "each node applies its own disclosure control before anything leaves it; the hub sees "
    "only the protected cells",
    "a combined count is the sum of the nodes' shown (rounded) counts, shown only when every "
    f'answering node shows its part, otherwise "{WITHHELD}"',
    "a node's answer does not depend on which other nodes were asked",
)


class ReplyError(ValueError):
    """A node's reply is not a protected answer of the expected shape (it is then counted as
    missing, never combined)."""


def _withheld() -> CellDict:
    return {"value": None, "display": WITHHELD, "suppressed": True}


def _checked_cell(cell: Any, where: str) -> CellDict:
    if not isinstance(cell, Mapping) or set(cell) != {"value", "display", "suppressed"}:
        raise ReplyError(f"{where}: not a published cell")
    suppressed, value = cell["suppressed"], cell["value"]
    if not isinstance(suppressed, bool):
        raise ReplyError(f"{where}: 'suppressed' is not a boolean")
    if suppressed:
        if value is not None or cell["display"] != WITHHELD:
            raise ReplyError(f"{where}: a withheld cell carries a value")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReplyError(f"{where}: a shown cell without a count")
    return {"value": value, "display": str(cell["display"]), "suppressed": suppressed}


def add_cells(cells: Sequence[CellDict]) -> CellDict:
    """The combined cell: the sum of shown parts, withheld as soon as one part is."""
    if not cells or any(c["suppressed"] for c in cells):
        return _withheld()
    total = sum(int(c["value"]) for c in cells)
    return {"value": total, "display": str(total), "suppressed": False}


@dataclass(frozen=True)
class NodeAnswer:
    """One node's protected answer, as checked by :func:`parse_reply`."""

    node: str
    total: CellDict
    by_region: dict[str, CellDict]
    by_site: dict[str, CellDict]
    funnel: list[dict[str, Any]]
    rules: list[str] = field(default_factory=list)
    as_of: dict[str, Any] = field(default_factory=dict)


def parse_reply(node: str, reply: Mapping[str, Any]) -> NodeAnswer:
    """A node's protected reply, every cell checked; :class:`ReplyError` otherwise."""
    if reply.get("mode") != "protected":
        raise ReplyError("not a protected answer")
    if reply.get("node") != node:
        raise ReplyError(f"the reply names node {reply.get('node')!r}")
    by_region = reply.get("by_region")
    by_site = reply.get("by_site")
    funnel = reply.get("funnel")
    if not isinstance(by_region, Mapping) or not isinstance(by_site, Mapping):
        raise ReplyError("by_region and by_site must be objects")
    if not isinstance(funnel, list):
        raise ReplyError("funnel must be a list")
    steps: list[dict[str, Any]] = []
    for i, step in enumerate(funnel):
        if not isinstance(step, Mapping):
            raise ReplyError(f"funnel/{i}: not an object")
        row: dict[str, Any] = {"label": str(step.get("label")), "kind": str(step.get("kind"))}
        for f in FUNNEL_FIELDS:
            row[f] = _checked_cell(step.get(f), f"funnel/{i}/{f}")
        steps.append(row)
    rules = reply.get("rules", [])
    as_of = reply.get("as_of", {})
    return NodeAnswer(
        node=node,
        total=_checked_cell(reply.get("total"), "total"),
        by_region={str(k): _checked_cell(v, f"by_region/{k}") for k, v in by_region.items()},
        by_site={str(k): _checked_cell(v, f"by_site/{k}") for k, v in by_site.items()},
        funnel=steps,
        rules=[str(r) for r in rules] if isinstance(rules, list) else [],
        as_of=dict(as_of) if isinstance(as_of, Mapping) else {},
    )


def _by_name(answers: Sequence[NodeAnswer], attr: str) -> dict[str, CellDict]:
    parts: dict[str, list[CellDict]] = {}
    for answer in answers:
        for name, cell in getattr(answer, attr).items():
            parts.setdefault(name, []).append(cell)
    return {name: add_cells(cells) for name, cells in sorted(parts.items())}


def _funnel(answers: Sequence[NodeAnswer]) -> tuple[list[dict[str, Any]] | None, str | None]:
    if not answers:
        return [], None
    shape = [(s["label"], s["kind"]) for s in answers[0].funnel]
    if any([(s["label"], s["kind"]) for s in a.funnel] != shape for a in answers[1:]):
        # nodes answering different versions of the question: nothing to add up
        return None, "the nodes' funnels have different steps, so no combined funnel is shown"
    rows: list[dict[str, Any]] = []
    for i, (label, kind) in enumerate(shape):
        row: dict[str, Any] = {"label": label, "kind": kind}
        for f in FUNNEL_FIELDS:
            row[f] = add_cells([a.funnel[i][f] for a in answers])
        rows.append(row)
    return rows, None


@dataclass(frozen=True)
class Missing:
    """A node asked that did not give a usable answer, and why (in words, no counts)."""

    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "reason": self.reason}


def combine(
    asked: Sequence[str], answers: Sequence[NodeAnswer], missing: Sequence[Missing]
) -> dict[str, Any]:
    """The sponsor's federated answer from the nodes' protected answers."""
    answers = sorted(answers, key=lambda a: a.node)
    total = add_cells([a.total for a in answers])
    by_node = {a.node: dict(a.total) for a in answers}
    by_region = _by_name(answers, "by_region")
    by_site = _by_name(answers, "by_site")
    funnel, funnel_note = _funnel(answers)
    notes = [
        n
        for n in (
            withheld_among(_as_cells(by_node), "node", "nodes"),
            withheld_among(_as_cells(by_region), "region", "regions"),
            withheld_among(_as_cells(by_site), "site", "sites"),
            funnel_note,
        )
        if n is not None
    ]
    partial = bool(missing) or not answers
    if partial:
        names = ", ".join(m.node for m in missing)
        notes.insert(0, f"partial: counts are over the nodes that answered; missing {names}")
    node_rules = sorted({r for a in answers for r in a.rules})
    return {
        "mode": "protected",
        "partial": partial,
        "nodes_asked": list(asked),
        "nodes_answered": [a.node for a in answers],
        "nodes_missing": [m.to_dict() for m in missing],
        "total": total,
        "by_node": by_node,
        "by_region": by_region,
        "by_site": by_site,
        "funnel": funnel,
        "as_of": {a.node: a.as_of for a in answers},
        "rules": [*HUB_RULES, *node_rules],
        "notes": notes,
    }


def combine_recruitment(
    replies: Mapping[str, Mapping[str, Any]], answered: Sequence[str]
) -> dict[str, Any]:
    """The sponsor's funnel of invitation states across nodes: each node's protected cells per
    state (recruitment stays at the node; only these cells leave it), added as any combined
    cell is (shown only when every part is). Nodes without recruitment running are named in
    ``nodes_without``; the funnel is then over the others, and says so."""
    with_recruitment: dict[str, dict[str, Any]] = {}
    without: list[str] = []
    for node in sorted(answered):
        block = replies[node].get("recruitment")
        if not isinstance(block, Mapping) or block.get("available") is not True:
            without.append(node)
            continue
        states = block.get("by_state")
        if not isinstance(states, Mapping):
            raise ReplyError(f"{node}: recruitment/by_state must be an object")
        with_recruitment[node] = {
            "total": _checked_cell(block.get("total"), f"{node}/recruitment/total"),
            "by_state": {
                str(k): _checked_cell(v, f"{node}/recruitment/by_state/{k}")
                for k, v in states.items()
            },
        }
    if not with_recruitment:
        return {"available": False, "nodes_without": without}
    blocks = list(with_recruitment.values())
    names = sorted({k for b in blocks for k in b["by_state"]})
    by_state = {
        name: add_cells([b["by_state"].get(name, _withheld()) for b in blocks]) for name in names
    }
    notes = [
        n
        for n in (withheld_among(_as_cells(by_state), "invitation state", "invitation states"),)
        if n is not None
    ]
    if without:
        notes.insert(0, f"recruitment is not running at {', '.join(without)}: not counted")
    return {
        "available": True,
        "nodes": sorted(with_recruitment),
        "nodes_without": without,
        "total": add_cells([b["total"] for b in blocks]),
        "by_state": by_state,
        "notes": notes,
    }


def _as_cells(cells: Mapping[str, CellDict]) -> dict[str, Cell]:
    return {k: Cell(v["value"], v["display"], bool(v["suppressed"])) for k, v in cells.items()}


# ------------------------------------------------------------------------- exact (admin only)


def _exact_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReplyError(f"{where}: not a count")
    return value


def combine_exact(
    asked: Sequence[str], replies: Mapping[str, Mapping[str, Any]], missing: Sequence[Missing]
) -> dict[str, Any]:
    """The administrators' exact answer: each node's exact counts and their plain sums (no
    disclosure control: only for a hub administrator, and only from nodes that allow it)."""
    total = 0
    by_region: dict[str, int] = {}
    by_site: dict[str, int] = {}
    funnel: list[dict[str, Any]] | None = None
    by_node: dict[str, int] = {}
    for node in sorted(replies):
        reply = replies[node]
        if reply.get("mode") != "exact" or reply.get("node") != node:
            raise ReplyError(f"{node}: not an exact answer")
        n = _exact_int(reply.get("total"), f"{node}/total")
        by_node[node] = n
        total += n
        for name, v in dict(reply.get("by_region", {})).items():
            by_region[name] = by_region.get(name, 0) + _exact_int(v, f"{node}/by_region/{name}")
        for name, v in dict(reply.get("by_site", {})).items():
            by_site[name] = by_site.get(name, 0) + _exact_int(v, f"{node}/by_site/{name}")
        steps = list(reply.get("funnel", []))
        if funnel is None:
            funnel = [
                {"label": s["label"], "kind": s["kind"], **{f: 0 for f in FUNNEL_FIELDS}}
                for s in steps
            ]
        if [(s["label"], s["kind"]) for s in steps] != [(s["label"], s["kind"]) for s in funnel]:
            raise ReplyError(f"{node}: its funnel has different steps")
        for row, step in zip(funnel, steps, strict=True):
            for f in FUNNEL_FIELDS:
                row[f] += _exact_int(step.get(f), f"{node}/funnel/{f}")
    return {
        "mode": "exact",
        "partial": bool(missing),
        "nodes_asked": list(asked),
        "nodes_answered": sorted(replies),
        "nodes_missing": [m.to_dict() for m in missing],
        "total": total,
        "by_node": by_node,
        "by_region": dict(sorted(by_region.items())),
        "by_site": dict(sorted(by_site.items())),
        "funnel": funnel or [],
    }


__all__ = [
    "HUB_RULES",
    "Missing",
    "NodeAnswer",
    "ReplyError",
    "add_cells",
    "combine",
    "combine_exact",
    "combine_recruitment",
    "parse_reply",
]
