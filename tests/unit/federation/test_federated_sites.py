"""Site selection and the accrual forecast across nodes, without a broker: the pooled forecast
against the single-source one (hypothesis), the combination of the nodes' protected site
selections, what a node sends, and the hub's fan-out over an in-memory transport."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feasibility.workspace.forecast import (
    LEVEL,
    ForecastInputs,
    Part,
    _seed,
    forecast,
    forecast_pooled,
)
from federation.combine import Missing, ReplyError
from federation.node import sites_reply
from federation.sites import combine_sites, parse_sites_reply
from federation.tokens import REPLY_HEADER, load_private, load_public, sign_reply, verify_question

from .test_federation_unit import FakeNodes

NOW = datetime(2026, 6, 1, tzinfo=UTC)
W = {"value": None, "display": "withheld", "suppressed": True}


def shown(n: int) -> dict[str, Any]:
    return {"value": n, "display": str(n), "suppressed": False}


# ------------------------------------------------------------------ the pooled forecast


@settings(max_examples=60, deadline=None)
@given(
    entries=st.integers(0, 500),
    window=st.floats(0.5, 90),
    enrolled=st.none() | st.integers(0, 40),
    candidates=st.integers(0, 80),
    remaining=st.integers(-2, 300),
    rounding=st.sampled_from([1, 5, 10]),
)
def test_one_part_is_exactly_the_single_site_forecast(
    entries: int, window: float, enrolled: int | None, candidates: int, remaining: int,
    rounding: int,
) -> None:  # fmt: skip
    inputs = ForecastInputs(
        entries, window, enrolled, None if enrolled is None else candidates, remaining, rounding
    )
    single = forecast(inputs)
    part = Part(entries, window, inputs.enrolled, inputs.candidates, rounding)
    assert forecast_pooled([part], remaining, seed=_seed(inputs, LEVEL)) == single


@settings(max_examples=25, deadline=None)
@given(
    a=st.integers(300, 3000),
    b=st.integers(300, 3000),
    window=st.floats(20, 60),
    k=st.integers(100, 400),
    remaining=st.integers(20, 400),
)
def test_two_nodes_forecast_as_one_node_with_their_patients_together(
    a: int, b: int, window: float, k: int, remaining: int
) -> None:
    """Two nodes over the same window are, with many patients, one node with the sum of
    their arrivals (a sum of gamma rates is the gamma rate of the sum, up to the prior's half
    count each); the conversion pooled over them is their sums' conversion."""
    m = 2 * k + 50
    pooled = forecast_pooled([Part(a, window, k, m), Part(b, window, k // 2, m // 2)], remaining)
    one = forecast(ForecastInputs(a + b, window, k + k // 2, m + m // 2, remaining))
    assert pooled.median_days is not None and one.median_days is not None
    assert pooled.median_days == pytest.approx(one.median_days, rel=0.08)
    assert pooled.high_days == pytest.approx(one.high_days, rel=0.12)
    # and a second node only ever brings the target nearer (same seed-free inputs otherwise)
    alone = forecast_pooled([Part(a, window, k, m)], remaining, conversion=[Part(0, 1, k, m)])
    assert alone.median_days is not None and alone.median_days > pooled.median_days


def test_a_pooled_forecast_needs_arrivals_and_says_when_the_target_is_reached() -> None:
    assert forecast_pooled([], 10).reason == "no source with arrivals to forecast from"
    assert forecast_pooled([Part(5, 0.0, None, None)], 10).reason == "no arrivals observed yet"
    assert forecast_pooled([Part(5, 3.0, None, None)], 0).median_days == 0.0
    prior = forecast_pooled([Part(50, 30.0, None, None)], 5)
    assert prior.conversion_known is False and prior.median_days is not None


# ------------------------------------------------------------------ what a node sends


def workspace_sites_body() -> dict[str, Any]:
    """A node's workspace ``sites`` output, as :class:`feasibility.workspace.service.Workspace`
    lays it out (the fields the whitelist must drop included)."""
    return {
        "output": "sites",
        "question": "sha256:abc",
        "evaluated_at": "2026-06-01T00:00:00+00:00",
        "total": shown(120),
        "rules": ["counts under 10 suppressed"],
        "policy": {"threshold": 10, "rounding": 5},
        "notes": [],
        "history": {
            "available": True,
            "baseline": "2026-05-01T00:00:00+00:00",
            "window_days": 30.0,
            "window_start": "2026-05-02T00:00:00+00:00",
            "counts": "patients who first entered ...",
        },
        "target": {"target": 40, "remaining": 35, "note": None},
        "recruitment": {"available": True},
        "ranked_by": "projected days",
        "sites": [
            {
                "site": "RR8",
                "name": "Leeds Teaching Hospitals",
                "region": "Yorkshire",
                "recruiting": True,
                "eligible_now": shown(80),
                "new_eligible": shown(30),
                "new_per_30_days": {"value": 30.0, "display": "30.00", "suppressed": False},
                "candidates": shown(25),
                "opted_out": W,
                "limited": shown(0),
                "invited": shown(20),
                "consented": shown(10),
                "enrolled": shown(5),
                "lost_to_opt_outs": {"value": None, "display": "withheld", "suppressed": True},
                "projection": {"forecast": True, "median_days": 120.0},
                "rank": 1,
            },
            {
                "site": "RAE",
                "name": None,
                "region": "Yorkshire",
                "recruiting": False,
                "eligible_now": shown(40),
                "new_eligible": W,
                "new_per_30_days": W,
                "projection": {"forecast": False, "reason": "entries withheld"},
                "rank": None,
            },
        ],
        "totals": {
            "new_eligible": shown(30),
            "from": "recruiting sites",
            "candidates": shown(25),
            "opted_out": W,
            "limited": shown(0),
            "invited": shown(20),
            "consented": shown(10),
            "enrolled": shown(5),
            "consent_rate": {"value": 0.5},
        },
        "trial_forecast": {"forecast": True, "median_days": 120.0},
        "model": "…",
        "elapsed_ms": 12.0,
    }


def test_the_node_sends_cells_and_the_window_only() -> None:
    reply = sites_reply("north", "t1", 3, workspace_sites_body())
    text = json.dumps(reply)
    for dropped in ("baseline", "window_start", "projection", "median_days", "rate", "elapsed",
                    "Leeds Teaching"):  # fmt: skip
        assert dropped not in text, dropped
    assert reply["history"] == {"available": True, "window_days": 30.0, "reason": None}
    assert reply["rounding"] == 5 and reply["version"] == 3
    assert reply["sites"][0]["enrolled"] == shown(5)
    assert "enrolled" not in reply["sites"][1]  # not recruiting: no recruitment cells
    parsed = parse_sites_reply("north", "t1", reply)
    assert parsed.window_days == 30.0 and parsed.recruitment is True
    with pytest.raises(ReplyError):
        parse_sites_reply("south", "t1", reply)
    with pytest.raises(ReplyError):
        parse_sites_reply("north", "t2", reply)
    forged = json.loads(text)
    forged["sites"][0]["eligible_now"] = {"value": 3, "display": "withheld", "suppressed": True}
    with pytest.raises(ReplyError):
        parse_sites_reply("north", "t1", forged)
    short = json.loads(text)
    del short["sites"][0]["limited"]  # a recruiting site with a state missing: not combined
    with pytest.raises(ReplyError, match="some recruitment states but not all"):
        parse_sites_reply("north", "t1", short)


# ------------------------------------------------------------------ the combination


def node_reply(
    node: str,
    sites: list[dict[str, Any]],
    new_eligible: dict[str, Any] | None,
    window: float | None = 30.0,
    recruitment: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "node": node,
        "mode": "sites",
        "trial": "t1",
        "version": 1,
        "total": shown(100),
        "history": {
            "available": window is not None,
            "window_days": window,
            "reason": None if window else "the cohort's history covers 0.1 h",
        },
        "rounding": 5,
        "recruitment": {"available": recruitment is not None},
        "sites": sites,
        "totals": {"new_eligible": new_eligible, "from": "recruiting sites", **(recruitment or {})},
        "rules": [],
    }


def site(code: str, now: int, new: dict[str, Any] | None, **kinds: dict[str, Any]) -> dict:
    return {
        "site": code,
        "region": "North",
        "recruiting": bool(kinds),
        "eligible_now": shown(now),
        "new_eligible": new,
        **kinds,
    }


RECRUITED = {
    "candidates": shown(40),
    "opted_out": shown(0),
    "limited": shown(0),
    "invited": shown(30),
    "consented": shown(20),
    "enrolled": shown(10),
}


def test_sites_of_every_node_are_ranked_together_and_the_target_counts_every_node() -> None:
    north = node_reply(
        "north",
        [site("N1", 200, shown(60), **RECRUITED), site("SHARED", 30, shown(15))],
        shown(75),
        recruitment=RECRUITED,
    )
    south = node_reply(
        "south",
        [site("S1", 50, shown(20)), site("SHARED", 20, shown(10)), site("S2", 15, W)],
        shown(30),
    )
    answers = [parse_sites_reply(n, "t1", r) for n, r in (("north", north), ("south", south))]
    out = combine_sites(["north", "south"], answers, [], 60, NOW)
    assert out["partial"] is False
    # enrolled at north (10) counts for the whole trial: 50 still needed
    assert out["target"] == {"target": 60, "enrolled": shown(10), "remaining": 50, "note": None}
    by_code = {s["site"]: s for s in out["sites"]}
    assert by_code["SHARED"]["nodes"] == ["north", "south"]
    assert by_code["SHARED"]["eligible_now"] == shown(50)
    assert by_code["SHARED"]["new_eligible"] == shown(25)
    assert by_code["SHARED"]["new_per_30_days"]["value"] == 25.0
    assert by_code["N1"]["projection"]["conversion_from"] == "this site"
    assert by_code["S1"]["projection"]["conversion_from"] == "every recruiting site"
    # withheld arrivals: no projection, no rank, the reason named with its node
    assert by_code["S2"]["projection"]["forecast"] is False
    assert "south" in by_code["S2"]["projection"]["reason"] and by_code["S2"]["rank"] is None
    ranked = [s["site"] for s in out["sites"] if s["rank"] is not None]
    assert ranked == ["N1", "SHARED", "S1"]  # most arrivals first, all at the same conversion
    days = [s["projection"]["median_days"] for s in out["sites"] if s["rank"] is not None]
    assert days == sorted(days)
    # the trial: arrivals at both nodes add up, faster than either alone
    trial = out["forecast"]
    assert trial["from_nodes"] == ["north", "south"] and trial["left_out"] == []
    alone = forecast_pooled(
        [Part(75, 30.0, None, None, 5)], 50, conversion=[Part(0, 1.0, 10, 40, 5)]
    )
    assert alone.median_days is not None and trial["median_days"] < alone.median_days


def test_a_node_without_history_or_with_withheld_arrivals_is_left_out_and_named() -> None:
    north = node_reply("north", [site("N1", 200, shown(60))], shown(60))
    young = node_reply("young", [site("Y1", 90, None)], None, window=None)
    small = node_reply("small", [site("M1", 12, W)], W)
    answers = [
        parse_sites_reply(n, "t1", r) for n, r in (("north", north), ("young", young),
                                                   ("small", small))
    ]  # fmt: skip
    down = [Missing("east", "unreachable (ConnectError)")]
    out = combine_sites(["east", "north", "small", "young"], answers, down, 30, NOW)
    assert out["partial"] is True and out["notes"][0].startswith("partial:")
    assert out["nodes_missing"] == [{"node": "east", "reason": "unreachable (ConnectError)"}]
    trial = out["forecast"]
    assert trial["from_nodes"] == ["north"]
    assert [x["node"] for x in trial["left_out"]] == ["small", "young"]
    assert "later than it would be" in trial["note"]
    assert trial["conversion_known"] is False  # no node recruits: the prior alone
    y1 = next(s for s in out["sites"] if s["site"] == "Y1")
    assert y1["projection"] == {
        "forecast": False, "reason": "young: the cohort's history covers 0.1 h",
    }  # fmt: skip
    assert out["by_node"]["young"]["history"] == "the cohort's history covers 0.1 h"


def test_without_a_target_nothing_is_forecast() -> None:
    answers = [parse_sites_reply("north", "t1", node_reply("north", [site("N1", 9, W)], W))]
    out = combine_sites(["north"], answers, [], None, NOW)
    assert out["forecast"]["reason"] == "the trial has no target"
    assert out["sites"][0]["projection"]["reason"] == "the trial has no target"
    assert out["target"]["remaining"] is None


# ------------------------------------------------------------------ the hub's fan-out


class FakeSitesNodes(FakeNodes):
    """Nodes that register saved questions (recording what each was sent) and answer site
    selection; ``down`` refuses to connect."""

    def __init__(self, tmp_path: Path, behaviours: dict[str, str]) -> None:
        super().__init__(tmp_path, behaviours)
        self.registered: dict[str, dict[str, Any]] = {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host
        asked = verify_question(
            request.headers["Authorization"].removeprefix("Bearer "),
            load_public(self.hub_public),
            "hub",
            name,
            request.content,
        )
        if self.behaviours[name] == "down":
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content)
        if request.url.path == "/v1/federation/saved-questions":
            self.registered[name] = body
            out: dict[str, Any] = {"node": name, "trial": body["id"], "version": 1}
        else:
            assert request.url.path == f"/v1/federation/saved-questions/{body['trial']}/sites"
            out = node_reply(name, [site(f"{name}-1", 100, shown(40))], shown(40))
        content = json.dumps(out).encode()
        signature = sign_reply(load_private(self.keys[name][0]), name, "hub", content, asked.jti)
        return httpx.Response(200, content=content, headers={REPLY_HEADER: signature})


def test_the_hub_sends_each_node_its_own_recruiting_sites_and_ranks_across_nodes(
    tmp_path: Path,
) -> None:
    from federation.hub import UnknownNodes

    nodes = FakeSitesNodes(tmp_path, {"north": "ok", "south": "ok", "west": "ok"})
    hub = nodes.hub
    with pytest.raises(UnknownNodes):
        asyncio.run(
            hub.register_saved(
                "t1", "T", {"title": "q"}, "Acme", ["north"], recruiting_sites={"south": ["X"]}
            )
        )
    created = asyncio.run(
        hub.register_saved(
            "t1", "T", {"title": "q"}, "Acme", target=25,
            recruiting_sites={"north": ["RR8"], "south": ["RAE", "RWA"]},
        )
    )  # fmt: skip
    assert created["target"] == 25
    assert nodes.registered["north"]["recruiting_sites"] == ["RR8"]
    assert nodes.registered["south"]["recruiting_sites"] == ["RAE", "RWA"]
    assert "recruiting_sites" not in nodes.registered["west"]
    assert {n: b["target"] for n, b in nodes.registered.items()} == dict.fromkeys(
        ("north", "south", "west"), 25
    )

    nodes.behaviours["west"] = "down"
    out = asyncio.run(hub.sites("t1", "Acme"))
    assert out["partial"] is True and out["nodes_answered"] == ["north", "south"]
    assert out["nodes_missing"][0]["node"] == "west"
    assert [s["site"] for s in out["sites"]] == ["north-1", "south-1"]  # a tie: by code
    assert out["target"]["remaining"] == 25
    assert out["forecast"]["from_nodes"] == ["north", "south"]
