"""Site selection and the accrual forecast across nodes, from the nodes' protected cells only.

Each node answers the hub's site-selection question for a saved question as it answers its own
sponsors (:func:`federation.node.sites_reply`: the workspace's ``sites`` output under its
disclosure control and budget, whitelisted): per site the published counts of patients eligible
now, of new eligible patients over the node's window, and of each recruitment state at its
recruiting sites; the trial's totals; the window and the rounding. Candidates never leave the
node.

The hub then does what one node cannot, with the same combination rule as every other combined
cell (:mod:`federation.combine`: a sum of shown parts, withheld when any part is):

* **the target across nodes**: enrolments still needed are the trial's target less the shown
  enrolments at every node (a withheld count is counted as none, and the answer says so);
* **each site's projection** on its own, to that target: its arrivals (summed over the nodes
  that name it) times its own conversion where shown, else the conversion pooled over every
  node's recruiting sites (:func:`feasibility.workspace.forecast.forecast_pooled`);
* **the trial's forecast**: patients arrive at every node at once, so the rates add (each
  node's posterior from its own entries and window) and the conversion is pooled; a node whose
  arrivals are withheld or whose history is too short is left out, named, and the date is then
  later than it would be with it;
* **one ranking** of every site of every node by projected days.

Every figure is computed from published cells and the node's rounding (the forecast draws each
true count within half a rounding step of the shown one), so the hub tells nothing a sponsor
could not compute from the nodes' protected answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.contracts.invitations import RECRUITMENT_KINDS
from feasibility.workspace.forecast import MODEL, Forecast, Part, forecast_pooled

from .combine import HUB_RULES, CellDict, Missing, ReplyError, _checked_cell, add_cells

#: Rules the hub adds for site selection and the forecast.
SITES_RULES = (
    "a site's counts are the sums of the counts of the nodes that name it, shown only when "
    "every part is shown",
    "rates and projections are computed from shown (rounded) counts only, each true count "
    "drawn within half a rounding step of the shown one",
)


@dataclass(frozen=True)
class NodeSites:
    """One node's protected site selection, as checked by :func:`parse_sites_reply`."""

    node: str
    total: CellDict
    #: Days of cohort history behind ``new_eligible`` (None: not available, see ``reason``).
    window_days: float | None
    reason: str | None
    rounding: int
    recruitment: bool
    sites: list[dict[str, Any]]
    totals: dict[str, Any]
    rules: list[str] = field(default_factory=list)


def _optional_cell(cell: Any, where: str) -> CellDict | None:
    return None if cell is None else _checked_cell(cell, where)


def parse_sites_reply(node: str, trial: str, reply: Mapping[str, Any]) -> NodeSites:
    """A node's site-selection reply, every cell checked; :class:`ReplyError` otherwise."""
    if reply.get("mode") != "sites" or reply.get("node") != node:
        raise ReplyError("not a site selection of this node")
    if reply.get("trial") != trial:
        raise ReplyError("the reply is for another saved question")
    history = reply.get("history")
    if not isinstance(history, Mapping):
        raise ReplyError("history must be an object")
    window = history.get("window_days")
    if history.get("available") is True:
        if isinstance(window, bool) or not isinstance(window, int | float) or window <= 0:
            raise ReplyError("history/window_days: not a positive number of days")
        window_days: float | None = float(window)
    else:
        window_days = None
    rounding = reply.get("rounding")
    if isinstance(rounding, bool) or not isinstance(rounding, int) or rounding < 1:
        raise ReplyError("rounding: not a positive integer")
    rows = reply.get("sites")
    if not isinstance(rows, list):
        raise ReplyError("sites must be a list")
    sites: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or not isinstance(row.get("site"), str):
            raise ReplyError(f"sites/{i}: not a site")
        checked: dict[str, Any] = {
            "site": row["site"],
            "region": row.get("region") if isinstance(row.get("region"), str) else None,
            "recruiting": row.get("recruiting") is True,
            "eligible_now": _checked_cell(row.get("eligible_now"), f"sites/{i}/eligible_now"),
            "new_eligible": _optional_cell(row.get("new_eligible"), f"sites/{i}/new_eligible"),
        }
        kinds = [kind for kind in RECRUITMENT_KINDS if kind in row]
        if kinds and len(kinds) != len(RECRUITMENT_KINDS):
            raise ReplyError(f"sites/{i}: some recruitment states but not all")
        for kind in kinds:
            checked[kind] = _checked_cell(row[kind], f"sites/{i}/{kind}")
        sites.append(checked)
    raw_totals = reply.get("totals")
    if not isinstance(raw_totals, Mapping):
        raise ReplyError("totals must be an object")
    totals: dict[str, Any] = {
        "new_eligible": _optional_cell(raw_totals.get("new_eligible"), "totals/new_eligible"),
    }
    kinds = [kind for kind in RECRUITMENT_KINDS if kind in raw_totals]
    if kinds and len(kinds) != len(RECRUITMENT_KINDS):
        raise ReplyError("totals: some recruitment states but not all")
    for kind in kinds:
        totals[kind] = _checked_cell(raw_totals[kind], f"totals/{kind}")
    recruitment = reply.get("recruitment")
    rules = reply.get("rules", [])
    return NodeSites(
        node=node,
        total=_checked_cell(reply.get("total"), "total"),
        window_days=window_days,
        reason=str(history.get("reason")) if history.get("reason") is not None else None,
        rounding=rounding,
        recruitment=isinstance(recruitment, Mapping) and recruitment.get("available") is True,
        sites=sites,
        totals=totals,
        rules=[str(r) for r in rules] if isinstance(rules, list) else [],
    )


def _shown(cell: CellDict | None) -> int | None:
    if cell is None or cell["suppressed"]:
        return None
    return int(cell["value"])


def _per_30_days(parts: Sequence[tuple[CellDict | None, float | None]]) -> dict[str, Any] | None:
    """New eligible patients per 30 days over the nodes naming a site: each node's shown count
    over its own window, added; withheld when any part is withheld or has no window."""
    if not parts:
        return None
    rate = 0.0
    for cell, window in parts:
        if cell is None or window is None:
            return None
        if cell["suppressed"]:
            return {"value": None, "display": "withheld", "suppressed": True}
        rate += int(cell["value"]) * 30.0 / window
    return {"value": round(rate, 3), "display": f"{rate:.2f}", "suppressed": False}


def _projection(
    result: Forecast | None, reason: str | None, now: datetime, **extra: Any
) -> dict[str, Any]:
    if result is None:
        return {"forecast": False, "reason": reason, **extra}
    return {**result.to_dict(now), **extra}


def combine_sites(
    asked: Sequence[str],
    answers: Sequence[NodeSites],
    missing: Sequence[Missing],
    target: int | None,
    now: datetime,
) -> dict[str, Any]:
    """Sites of every node ranked by projected days to the trial's target, and the trial's
    forecast across nodes (see the module docstring)."""
    answers = sorted(answers, key=lambda a: a.node)
    notes: list[str] = []
    partial = bool(missing) or not answers
    if partial:
        names = ", ".join(m.node for m in missing) or "every node"
        notes.append(
            f"partial: sites and forecast are over the nodes that answered; missing {names}"
        )

    # enrolled so far, across nodes (nodes without recruitment have enrolled nobody here)
    recruiting_nodes = [a for a in answers if a.recruitment]
    enrolled_cells = [a.totals["enrolled"] for a in recruiting_nodes if "enrolled" in a.totals]
    enrolled = add_cells(enrolled_cells) if enrolled_cells else None
    remaining: int | None = None
    target_note: str | None = None
    if target is not None:
        withheld_at = [a.node for a in recruiting_nodes if _shown(a.totals.get("enrolled")) is None]
        shown_enrolled = sum(_shown(a.totals.get("enrolled")) or 0 for a in recruiting_nodes)
        remaining = max(target - shown_enrolled, 0)
        if withheld_at:
            target_note = (
                f"enrolled so far is withheld at {', '.join(withheld_at)}: counted as none there"
            )

    # the conversion pooled over every node's recruiting sites
    pooled = [
        Part(
            0, 1.0, _shown(a.totals.get("enrolled")), _shown(a.totals.get("candidates")), a.rounding
        )
        for a in recruiting_nodes
        if _shown(a.totals.get("enrolled")) is not None and _shown(a.totals.get("candidates"))
    ]

    # sites: one row per site code, over the nodes that name it
    named: dict[str, list[tuple[NodeSites, dict[str, Any]]]] = {}
    for answer in answers:
        for reported in answer.sites:
            named.setdefault(reported["site"], []).append((answer, reported))
    rows: list[dict[str, Any]] = []
    for site, parts in sorted(named.items()):
        row: dict[str, Any] = {
            "site": site,
            "region": next((r["region"] for _, r in parts if r["region"]), None),
            "nodes": [a.node for a, _ in parts],
            "recruiting": any(r["recruiting"] for _, r in parts),
            "eligible_now": add_cells([r["eligible_now"] for _, r in parts]),
            "new_eligible": None
            if any(r["new_eligible"] is None for _, r in parts)
            else add_cells([r["new_eligible"] for _, r in parts]),
            "new_per_30_days": _per_30_days([(r["new_eligible"], a.window_days) for a, r in parts]),
        }
        recruiting_parts = [(a, r) for a, r in parts if r["recruiting"] and "candidates" in r]
        if recruiting_parts:
            for kind in RECRUITMENT_KINDS:
                row[kind] = add_cells([r[kind] for _, r in recruiting_parts])
        row["projection"] = _site_projection(parts, remaining, pooled, now)
        rows.append(row)

    def order(row: dict[str, Any]) -> tuple[int, float, str]:
        days = row["projection"].get("median_days")
        return (0 if days is not None else 1, days if days is not None else 0.0, row["site"])

    rows.sort(key=order)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row["projection"].get("median_days") is not None else None

    trial = _trial_forecast(answers, remaining, pooled, now)
    node_rules = sorted({r for a in answers for r in a.rules})
    return {
        "mode": "sites",
        "partial": partial,
        "nodes_asked": list(asked),
        "nodes_answered": [a.node for a in answers],
        "nodes_missing": [m.to_dict() for m in missing],
        "target": {
            "target": target,
            "enrolled": enrolled,
            "remaining": remaining,
            "note": target_note,
        },
        "ranked_by": "projected days for the site alone to reach the trial's target, "
        "enrolments at every node counted",
        "sites": rows,
        "forecast": trial,
        "by_node": {
            a.node: {
                "total": a.total,
                "window_days": a.window_days,
                "history": "available" if a.window_days is not None else a.reason,
                "new_eligible": a.totals["new_eligible"],
                "rounding": a.rounding,
                "recruitment": a.recruitment,
            }
            for a in answers
        },
        "model": MODEL,
        "rules": [*HUB_RULES, *SITES_RULES, *node_rules],
        "notes": notes,
    }


def _site_projection(
    parts: Sequence[tuple[NodeSites, dict[str, Any]]],
    remaining: int | None,
    pooled: Sequence[Part],
    now: datetime,
) -> dict[str, Any]:
    if remaining is None:
        return _projection(None, "the trial has no target", now)
    for answer, row in parts:
        if answer.window_days is None:
            return _projection(None, f"{answer.node}: {answer.reason or 'no history'}", now)
        if row["new_eligible"] is None or row["new_eligible"]["suppressed"]:
            return _projection(
                None, f"{answer.node}: entries are withheld to protect small counts", now
            )
    arrivals = []
    own: list[Part] = []
    for answer, row in parts:
        window = answer.window_days
        assert window is not None
        arrivals.append(
            Part(int(row["new_eligible"]["value"]), window, None, None, answer.rounding)
        )
        k, m = _shown(row.get("enrolled")), _shown(row.get("candidates"))
        if row["recruiting"] and k is not None and m:
            own.append(Part(0, 1.0, k, m, answer.rounding))
    if own and len(own) == len(parts):
        conversion, source = own, "this site"
    else:
        conversion, source = list(pooled), "every recruiting site" if pooled else "none observed"
    result = forecast_pooled(arrivals, remaining, conversion=conversion)
    return _projection(result, None, now, conversion_from=source)


def _trial_forecast(
    answers: Sequence[NodeSites], remaining: int | None, pooled: Sequence[Part], now: datetime
) -> dict[str, Any]:
    if remaining is None:
        return _projection(None, "the trial has no target", now, from_nodes=[], left_out=[])
    arrivals: list[Part] = []
    used: list[str] = []
    left_out: list[dict[str, str]] = []
    for answer in answers:
        entries = answer.totals["new_eligible"]
        if answer.window_days is None:
            left_out.append({"node": answer.node, "reason": answer.reason or "no history"})
        elif entries is None or entries["suppressed"]:
            left_out.append(
                {"node": answer.node, "reason": "entries are withheld to protect small counts"}
            )
        else:
            arrivals.append(
                Part(int(entries["value"]), answer.window_days, None, None, answer.rounding)
            )
            used.append(answer.node)
    extra: dict[str, Any] = {
        "from_nodes": used,
        "left_out": left_out,
        "conversion_from": "every recruiting site" if pooled else "none observed",
    }
    if not arrivals:
        return _projection(None, "no node's arrivals can be used", now, **extra)
    result = forecast_pooled(arrivals, remaining, conversion=list(pooled))
    if left_out:
        extra["note"] = (
            "arrivals at " + ", ".join(x["node"] for x in left_out) + " are not counted: the "
            "projected date is later than it would be with them"
        )
    return _projection(result, None, now, **extra)


__all__ = ["SITES_RULES", "NodeSites", "combine_sites", "parse_sites_reply"]
