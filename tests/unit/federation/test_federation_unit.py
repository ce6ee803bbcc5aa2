"""The federation's parts without a broker: the combination, signed questions and replies, the
node directory, and the hub's fan-out over an in-memory transport (slow, refusing, forged and
good nodes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from concierge.configuration import load_configuration
from core.settings import ConfigurationError, get_settings
from federation.combine import Missing, ReplyError, add_cells, combine, parse_reply
from federation.hub import Hub, NodeDirectory, NodeRecord, UnknownNodes
from federation.node import protected_reply
from federation.tokens import (
    REPLY_HEADER,
    SignatureError,
    generate_key,
    load_private,
    load_public,
    sign_question,
    sign_reply,
    verify_question,
    verify_reply,
)

W = {"value": None, "display": "withheld", "suppressed": True}


def shown(n: int) -> dict[str, Any]:
    return {"value": n, "display": str(n), "suppressed": False}


def reply(node: str, total: dict[str, Any], region: dict[str, Any] | None = None) -> dict[str, Any]:
    cells = {f: shown(50) for f in ("entered", "passed", "remaining")}
    cells.update({"failed": shown(0), "unknown": shown(0)})
    return {
        "node": node,
        "mode": "protected",
        "total": total,
        "by_region": {"North East": region or total},
        "by_site": {f"{node}-A": total},
        "funnel": [{"label": "population", "kind": "population", **cells}],
        "rules": ["counts under 10 suppressed"],
        "as_of": {"ready": True},
    }


def test_a_combined_cell_is_shown_only_when_every_part_is() -> None:
    assert add_cells([shown(10), shown(25)]) == shown(35)
    assert add_cells([shown(10), W]) == W
    assert add_cells([]) == W
    a = parse_reply("a", reply("a", shown(20)))
    b = parse_reply("b", reply("b", W, region=shown(15)))
    answer = combine(["a", "b"], [a, b], [])
    assert answer["total"] == W  # b's total is withheld: no partial sum is shown
    assert answer["by_node"] == {"a": shown(20), "b": W}
    assert answer["by_region"]["North East"] == shown(35)
    assert answer["by_site"] == {"a-A": shown(20), "b-A": W}
    assert answer["funnel"][0]["entered"] == shown(100)
    assert answer["partial"] is False and answer["nodes_missing"] == []
    assert "1 of 2 nodes is withheld to protect small counts" in answer["notes"]


def test_a_partial_answer_names_the_missing_nodes() -> None:
    a = parse_reply("a", reply("a", shown(20)))
    answer = combine(["a", "b"], [a], [Missing("b", "no answer within the deadline")])
    assert answer["partial"] is True
    assert answer["nodes_answered"] == ["a"]
    assert answer["nodes_missing"] == [{"node": "b", "reason": "no answer within the deadline"}]
    assert answer["total"] == shown(20)
    assert answer["notes"][0] == "partial: counts are over the nodes that answered; missing b"
    nothing = combine(["a"], [], [Missing("a", "unreachable (ConnectError)")])
    assert nothing["partial"] is True and nothing["total"] == W


def test_funnels_of_different_shapes_are_not_added() -> None:
    a = reply("a", shown(20))
    b = reply("b", shown(20))
    b["funnel"][0]["label"] = "another step"
    answer = combine(["a", "b"], [parse_reply("a", a), parse_reply("b", b)], [])
    assert answer["funnel"] is None
    assert any("different steps" in n for n in answer["notes"])


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(mode="exact"),
        lambda r: r.update(node="other"),
        lambda r: r.update(total={"value": 3, "display": "withheld", "suppressed": True}),
        lambda r: r.update(total={"value": -1, "display": "-1", "suppressed": False}),
        lambda r: r.update(total={**shown(5), "patients": ["p-1"]}),
        lambda r: r["funnel"][0].update(entered={"value": "12", "display": "12", "suppressed": 0}),
        lambda r: r.update(by_site=[]),
    ],
)
def test_a_reply_that_is_not_protected_cells_is_refused(change: Any) -> None:
    r = reply("a", shown(20))
    change(r)
    with pytest.raises(ReplyError):
        parse_reply("a", r)


def test_the_node_sends_only_whitelisted_fields() -> None:
    body = {
        **reply("ignored", shown(20)),
        "question": "abc",
        "evaluated_at": "2026-01-01T00:00:00+00:00",
        "policy": {"threshold": 10},
        "sites": {"a-A": {"name": "Site A"}},
        "as_of": {"patients": 4242, "offsets": {"0": 17}, "ready": True, "caught_up": True},
        "engine": "polars",
    }
    body["total"] = {**shown(20), "extra": "x"}
    sent = protected_reply("north", body)
    assert sent["node"] == "north" and sent["total"] == shown(20)
    assert "sites" not in sent and "engine" not in sent
    assert sent["as_of"] == {"ready": True, "caught_up": True}
    assert "4242" not in json.dumps(sent)


def test_questions_and_replies_are_checked() -> None:
    hub_private, hub_public = generate_key()
    node_private, node_public = generate_key()
    hub_key, hub_pub = load_private(hub_private), load_public(hub_public)
    body = b'{"title": "x"}'
    token, jti = sign_question(hub_key, "hub", "north", "Acme", "sponsor", body)
    asked = verify_question(token, hub_pub, "hub", "north", body)
    assert (asked.org, asked.role, asked.jti) == ("Acme", "sponsor", jti)
    for args in (
        (token, hub_pub, "hub", "south", body),  # another node's question
        (token, hub_pub, "hub", "north", b"{}"),  # another body
        (token, hub_pub, "other-hub", "north", body),  # another issuer
        (token, load_public(node_public), "hub", "north", body),  # another key
    ):
        with pytest.raises(SignatureError):
            verify_question(*args)
    old, _ = sign_question(hub_key, "hub", "north", "Acme", "sponsor", body, now=1_000_000)
    with pytest.raises(SignatureError):
        verify_question(old, hub_pub, "hub", "north", body)  # expired
    signed = sign_reply(load_private(node_private), "north", "hub", b"answer", jti)
    verify_reply(signed, load_public(node_public), "north", "hub", b"answer", jti)
    with pytest.raises(SignatureError):
        verify_reply(signed, load_public(node_public), "north", "hub", b"other", jti)
    with pytest.raises(SignatureError):
        verify_reply(signed, load_public(node_public), "north", "hub", b"answer", "another")
    with pytest.raises(SignatureError):
        verify_reply(signed, load_public(hub_public), "north", "hub", b"answer", jti)


def test_the_directory_refuses_a_bad_key_or_url(tmp_path: Path) -> None:
    directory = NodeDirectory(tmp_path / "nodes.json")
    _, public = generate_key()
    directory.register(NodeRecord("north", "http://north:8000", public.decode()))
    with pytest.raises(ValueError):
        directory.register(NodeRecord("south", "http://south", "not a key"))
    with pytest.raises(ValueError):
        directory.register(NodeRecord("south", "ftp://south", public.decode()))
    assert list(NodeDirectory(tmp_path / "nodes.json").all()) == ["north"]
    assert directory.remove("north") and directory.all() == {}


class FakeNodes:
    """Nodes behind an in-memory transport: each behaves as told."""

    def __init__(self, tmp_path: Path, behaviours: dict[str, str]) -> None:
        hub_private, self.hub_public = generate_key()
        self.behaviours = behaviours
        self.keys = {name: generate_key() for name in behaviours}
        self.directory = NodeDirectory(tmp_path / "nodes.json")
        for name, (_, public) in self.keys.items():
            self.directory.register(NodeRecord(name, f"http://{name}", public.decode()))
        self.hub = Hub(
            "hub",
            load_private(hub_private),
            self.directory,
            deadline_seconds=0.5,
            received=[],
            transport=httpx.MockTransport(self.handle),
        )

    async def handle(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host
        body = request.content
        asked = verify_question(
            request.headers["Authorization"].removeprefix("Bearer "),
            load_public(self.hub_public),
            "hub",
            name,
            body,
        )
        behaviour = self.behaviours[name]
        if behaviour == "slow":
            await asyncio.sleep(5)
        if behaviour == "budget":
            return httpx.Response(429, json={"detail": "budget"})
        content = json.dumps(reply(name, shown(20))).encode()
        key = self.keys[name][0] if behaviour != "forged" else generate_key()[0]
        signature = sign_reply(load_private(key), name, "hub", content, asked.jti)
        return httpx.Response(200, content=content, headers={REPLY_HEADER: signature})


def test_the_hub_names_slow_refusing_and_forged_nodes(tmp_path: Path) -> None:
    nodes = FakeNodes(
        tmp_path, {"good": "ok", "slow": "slow", "spent": "budget", "forger": "forged"}
    )
    import time

    t0 = time.monotonic()
    answer = asyncio.run(nodes.hub.ask({"title": "q"}, "Acme"))
    assert time.monotonic() - t0 < 1.5  # the deadline is 0.5 s; the slow node takes 5
    assert answer["nodes_answered"] == ["good"]
    assert answer["partial"] is True
    assert {m["node"]: m["reason"] for m in answer["nodes_missing"]} == {
        "forger": "the reply's signature does not verify",
        "slow": "no answer within the deadline",
        "spent": "refused: the query budget at the node is spent or locked",
    }
    assert answer["total"] == shown(20)
    only = asyncio.run(nodes.hub.ask({"title": "q"}, "Acme", nodes=["good"]))
    assert only["partial"] is False and only["nodes_asked"] == ["good"]
    with pytest.raises(UnknownNodes):
        asyncio.run(nodes.hub.ask({"title": "q"}, "Acme", nodes=["nowhere"]))


def test_a_bad_federation_setting_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("CONCIERGE_HUB_DEADLINE_SECONDS", "0")
    monkeypatch.setenv("CONCIERGE_NODE_ID", "no spaces allowed")
    try:
        with pytest.raises(ConfigurationError) as caught:
            load_configuration()
    finally:
        get_settings.cache_clear()
    message = str(caught.value)
    assert "\n" not in message
    assert "CONCIERGE_HUB_DEADLINE_SECONDS" in message and "CONCIERGE_NODE_ID" in message


class FakeSavedNodes(FakeNodes):
    """Nodes that register saved questions and answer them live: ``down`` refuses to connect,
    ``behind`` answers 503, ``ok`` answers; the behaviour can change between calls."""

    def __init__(self, tmp_path: Path, behaviours: dict[str, str]) -> None:
        super().__init__(tmp_path, behaviours)
        self.versions: dict[str, int] = {}
        self.paths: list[tuple[str, str]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host
        asked = verify_question(
            request.headers["Authorization"].removeprefix("Bearer "),
            load_public(self.hub_public),
            "hub",
            name,
            request.content,
        )
        assert asked.org == "Acme"
        behaviour = self.behaviours[name]
        self.paths.append((name, request.url.path))
        if behaviour == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if behaviour == "behind":
            return httpx.Response(503, headers={"Retry-After": "2"}, json={"detail": "behind"})
        body = json.loads(request.content)
        if request.url.path == "/v1/federation/saved-questions":
            self.versions[name] = self.versions.get(name, 0) + 1
            out: dict[str, Any] = {
                "node": name,
                "trial": body["id"],
                "version": self.versions[name],
            }
        elif request.url.path.endswith("/retire"):
            out = {"node": name, "trial": body["trial"], "status": "retired"}
        else:
            assert request.url.path == f"/v1/federation/saved-questions/{body['trial']}/answer"
            out = {
                **reply(name, shown(20)),
                "trial": body["trial"],
                "version": self.versions[name],
                "as_of": {"stream_time": f"2026-01-01T00:00:0{len(name)}+00:00"},
            }
        content = json.dumps(out).encode()
        signature = sign_reply(load_private(self.keys[name][0]), name, "hub", content, asked.jti)
        return httpx.Response(200, content=content, headers={REPLY_HEADER: signature})


def test_a_hub_saved_question_is_live_at_each_node_and_partial_when_one_is_not(
    tmp_path: Path,
) -> None:
    from federation.hub import RetiredQuestion
    from federation.saved import NotTheirs

    nodes = FakeSavedNodes(tmp_path, {"north": "ok", "south": "ok", "west": "down"})
    hub = nodes.hub
    registered = asyncio.run(hub.register_saved("t2dm-fed", "T2DM", {"title": "q"}, "Acme"))
    assert registered["registered"] == {"north": 1, "south": 1}
    assert [m["node"] for m in registered["not_registered"]] == ["west"]
    with pytest.raises(NotTheirs):  # the id is Acme's at the hub
        asyncio.run(hub.register_saved("t2dm-fed", "T2DM", {"title": "q"}, "Other"))
    with pytest.raises(NotTheirs):
        asyncio.run(hub.answer_saved("t2dm-fed", "Other"))

    # west still down: the answer is partial and names it; the others are combined
    answer = asyncio.run(hub.answer_saved("t2dm-fed", "Acme"))
    assert answer["partial"] is True and answer["nodes_answered"] == ["north", "south"]
    assert [m["node"] for m in answer["nodes_missing"]] == ["west"]
    assert "not registered there" in answer["nodes_missing"][0]["reason"]
    assert answer["total"] == shown(40)
    assert set(answer["as_of"]) == {"north", "south"}
    assert answer["as_of"]["north"] == {"stream_time": "2026-01-01T00:00:05+00:00"}

    # west comes back: registered at the next answer, then answers; south falls behind
    nodes.behaviours.update(west="ok", south="behind")
    answer = asyncio.run(hub.answer_saved("t2dm-fed", "Acme"))
    assert ("west", "/v1/federation/saved-questions") in nodes.paths
    assert answer["nodes_answered"] == ["north", "west"]
    assert answer["nodes_missing"] == [
        {"node": "south", "reason": "not current: the node's data is behind"}
    ]
    assert answer["total"] == shown(40) and answer["partial"] is True
    assert hub.saved_questions.get("t2dm-fed", "Acme").registered == {
        "north": 1, "south": 1, "west": 1,
    }  # fmt: skip

    nodes.behaviours.update(south="ok")
    whole = asyncio.run(hub.answer_saved("t2dm-fed", "Acme"))
    assert whole["partial"] is False and whole["total"] == shown(60)
    assert whole["recruitment"] == {
        "available": False, "nodes_without": ["north", "south", "west"],
    }  # fmt: skip
    assert whole["versions"] == {"north": 1, "south": 1, "west": 1}

    retired = asyncio.run(hub.retire_saved("t2dm-fed", "Acme"))
    assert retired["status"] == "retired" and retired["retired_at"] == ["north", "south", "west"]
    with pytest.raises(RetiredQuestion):
        asyncio.run(hub.answer_saved("t2dm-fed", "Acme"))


def test_the_funnel_of_invitation_states_adds_only_what_every_node_shows() -> None:
    from federation.combine import combine_recruitment

    def block(invited: dict[str, Any], consented: dict[str, Any]) -> dict[str, Any]:
        total = add_cells([invited, consented])
        return {"available": True, "total": total,
                "by_state": {"invited": invited, "consented": consented}}  # fmt: skip

    replies = {
        "north": {"recruitment": block(shown(20), shown(10))},
        "south": {"recruitment": block(shown(15), W)},
        "west": {"recruitment": {"available": False}},
    }
    funnel = combine_recruitment(replies, ["north", "south", "west"])
    assert funnel["nodes"] == ["north", "south"] and funnel["nodes_without"] == ["west"]
    assert funnel["by_state"] == {"consented": W, "invited": shown(35)}
    assert funnel["total"] == W  # south's total is withheld, so the sum is
    assert funnel["notes"][0].startswith("recruitment is not running at west")
    only_north = combine_recruitment(replies, ["north"])
    assert only_north["total"] == shown(30) and only_north["nodes_without"] == []
    bad = {"north": {"recruitment": {"available": True, "total": {"value": 3}, "by_state": {}}}}
    with pytest.raises(ReplyError):
        combine_recruitment(bad, ["north"])
