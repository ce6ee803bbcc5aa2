"""The hub: registered nodes, the fan-out with a deadline, and the combination.

The hub holds no patient data: a directory of nodes (name, URL, public key, in a JSON file) and
what the nodes answer, which it combines (:mod:`.combine`) and does not keep. A question goes to
every node asked at once (httpx's async client); whatever has not answered by the deadline is
named in ``nodes_missing`` with the reason, as is a node that refuses (budget, policy, not
current), fails, or whose reply does not verify. Nothing waits past the deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .combine import (
    Missing,
    NodeAnswer,
    ReplyError,
    combine,
    combine_exact,
    combine_recruitment,
    parse_reply,
)
from .saved import HubSavedQuestion, HubSavedQuestions
from .sites import NodeSites, combine_sites, parse_sites_reply
from .tokens import (
    REPLY_HEADER,
    HubRole,
    SignatureError,
    load_public,
    sign_question,
    verify_reply,
)

#: What a node's refusal means, by HTTP status, in the words of ``nodes_missing``.
_REFUSALS = {
    401: "refused: the node did not accept the hub's signature",
    403: "refused by the node's policy",
    404: "not a node (federation is not enabled there)",
    422: "refused: the node could not interpret the question",
    429: "refused: the query budget at the node is spent or locked",
    503: "not current: the node's data is behind",
}


@dataclass(frozen=True)
class NodeRecord:
    """A registered node."""

    id: str
    url: str
    public_key: str  # PEM
    #: Free text for operators (the data controller's name).
    controller: str = ""


class NodeDirectory:
    """The registered nodes, in a JSON file (rewritten whole, atomically, on each change)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def all(self) -> dict[str, NodeRecord]:
        if not self.path.exists():
            return {}
        raw = json.loads(self.path.read_text())
        return {k: NodeRecord(**v) for k, v in sorted(raw.items())}

    def register(self, record: NodeRecord) -> NodeRecord:
        load_public(record.public_key.encode())  # refuse a key that is not one
        if not record.url.startswith(("http://", "https://")):
            raise ValueError("a node's URL must be http:// or https://")
        with self._lock:
            nodes = self.all()
            nodes[record.id] = record
            self._write(nodes)
        return record

    def remove(self, node: str) -> bool:
        with self._lock:
            nodes = self.all()
            found = nodes.pop(node, None) is not None
            self._write(nodes)
        return found

    def _write(self, nodes: Mapping[str, NodeRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in nodes.items()}, indent=2))
        os.replace(tmp, self.path)


class UnknownNodes(ValueError):
    """The question names nodes that are not registered."""


@dataclass
class Hub:
    """Fans questions out to the registered nodes and combines what comes back."""

    id: str
    key: Ed25519PrivateKey
    directory: NodeDirectory
    deadline_seconds: float = 5.0
    #: Every reply body the hub received, as bytes (for tests that scan what crossed).
    received: list[bytes] | None = None
    #: The HTTP transport (None: httpx's own; unit tests pass a mock one).
    transport: httpx.AsyncBaseTransport | None = None
    #: Saved questions registered here (None: ``saved.json`` beside the node directory).
    saved: HubSavedQuestions | None = None

    def __post_init__(self) -> None:
        if self.saved is None:
            self.saved = HubSavedQuestions(self.directory.path.parent / "saved.json")

    @property
    def saved_questions(self) -> HubSavedQuestions:
        assert self.saved is not None
        return self.saved

    def _chosen(self, nodes: Sequence[str] | None) -> dict[str, NodeRecord]:
        registered = self.directory.all()
        if nodes is None:
            return registered
        unknown = sorted(set(nodes) - set(registered))
        if unknown:
            raise UnknownNodes(f"not registered: {', '.join(unknown)}")
        return {n: registered[n] for n in sorted(set(nodes))}

    async def _ask_one(
        self,
        client: httpx.AsyncClient,
        record: NodeRecord,
        path: str,
        body: bytes,
        org: str,
        role: HubRole,
        reasons: Mapping[int, str],
    ) -> dict[str, Any]:
        token, jti = sign_question(self.key, self.id, record.id, org, role, body)
        response = await client.post(
            record.url.rstrip("/") + path,
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        if self.received is not None:
            self.received.append(response.content)
        if response.status_code != 200:
            reason = reasons.get(response.status_code) or _REFUSALS.get(
                response.status_code, f"failed (HTTP {response.status_code})"
            )
            raise _NodeFailed(reason)
        signature = response.headers.get(REPLY_HEADER)
        if signature is None:
            raise _NodeFailed("the reply is not signed")
        try:
            verify_reply(
                signature,
                load_public(record.public_key.encode()),
                record.id,
                self.id,
                response.content,
                jti,
            )
        except SignatureError:
            raise _NodeFailed("the reply's signature does not verify") from None
        reply: dict[str, Any] = response.json()
        return reply

    async def _fan_out(
        self, path: str, question: Mapping[str, Any], org: str, role: HubRole,
        nodes: Sequence[str] | None, reasons: Mapping[int, str] | None = None,
        per_node: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[list[str], dict[str, dict[str, Any]], list[Missing], float]:  # fmt: skip
        """``per_node``: fields added to the question for one node only (what concerns that
        node alone, such as its recruiting sites)."""
        chosen = self._chosen(nodes)
        reasons = reasons or {}
        per_node = per_node or {}

        def body(name: str) -> bytes:
            return json.dumps({**question, **per_node.get(name, {})}, sort_keys=True).encode()

        started = time.perf_counter()
        replies: dict[str, dict[str, Any]] = {}
        missing: list[Missing] = []
        timeout = httpx.Timeout(self.deadline_seconds)
        async with httpx.AsyncClient(timeout=timeout, transport=self.transport) as client:
            tasks = {
                asyncio.create_task(
                    self._ask_one(client, r, path, body(name), org, role, reasons)
                ): name
                for name, r in chosen.items()
            }
            done, pending = (
                await asyncio.wait(tasks, timeout=self.deadline_seconds)
                if tasks
                else (set(), set())
            )
            for task in pending:
                task.cancel()
                missing.append(Missing(tasks[task], "no answer within the deadline"))
            for task in done:
                name = tasks[task]
                exc = task.exception()
                if exc is None:
                    replies[name] = task.result()
                elif isinstance(exc, _NodeFailed):
                    missing.append(Missing(name, str(exc)))
                elif isinstance(exc, httpx.TimeoutException):
                    missing.append(Missing(name, "no answer within the deadline"))
                elif isinstance(exc, httpx.HTTPError):
                    missing.append(Missing(name, f"unreachable ({type(exc).__name__})"))
                else:
                    missing.append(Missing(name, f"failed ({type(exc).__name__})"))
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - started
        return list(chosen), replies, sorted(missing, key=lambda m: m.node), elapsed

    async def ask(
        self, question: Mapping[str, Any], org: str, nodes: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The sponsor ``org``'s federated, protected answer to ``question`` (criteria JSON)."""
        asked, replies, missing, elapsed = await self._fan_out(
            "/v1/federation/ask", question, org, "sponsor", nodes
        )
        answers: list[NodeAnswer] = []
        for name, reply in replies.items():
            try:
                answers.append(parse_reply(name, reply))
            except ReplyError as exc:
                missing.append(Missing(name, f"unusable reply ({exc})"))
        missing.sort(key=lambda m: m.node)
        return {
            "hub": self.id,
            **combine(asked, answers, missing),
            "elapsed_ms": round(elapsed * 1000, 1),
        }

    async def ask_exact(
        self, question: Mapping[str, Any], admin: str, nodes: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Exact counts from every node that allows them (administrators only)."""
        asked, replies, missing, elapsed = await self._fan_out(
            "/v1/federation/exact", question, admin, "admin", nodes
        )
        usable: dict[str, dict[str, Any]] = {}
        for name, reply in replies.items():
            try:
                combine_exact([name], {name: reply}, [])
            except (ReplyError, KeyError, TypeError, ValueError) as exc:
                missing.append(Missing(name, f"unusable reply ({exc})"))
            else:
                usable[name] = reply
        missing.sort(key=lambda m: m.node)
        return {
            "hub": self.id,
            **combine_exact(asked, usable, missing),
            "elapsed_ms": round(elapsed * 1000, 1),
        }

    # ------------------------------------------------------------ saved questions, live

    async def _register_at(
        self, record: HubSavedQuestion, nodes: Sequence[str]
    ) -> tuple[dict[str, int], list[Missing]]:
        """Register ``record`` at ``nodes``: each node's version, and the nodes that did not."""
        registered: dict[str, int] = {}
        if not nodes:
            return registered, []
        body: dict[str, Any] = {"id": record.id, "title": record.title, "criteria": record.criteria}
        if record.target is not None:
            body["target"] = record.target
        # each node is told its own recruiting sites only (recruitment stays at the node)
        per_node = {n: {"recruiting_sites": s} for n, s in record.recruiting_sites.items() if s}
        _, replies, missing, _ = await self._fan_out(
            "/v1/federation/saved-questions", body, record.org, "sponsor", nodes,
            _SAVED_REFUSALS, per_node,
        )  # fmt: skip
        for name, reply in replies.items():
            version = reply.get("version")
            if (
                reply.get("node") != name
                or reply.get("trial") != record.id
                or not (isinstance(version, int) and not isinstance(version, bool) and version > 0)
            ):
                missing.append(Missing(name, "unusable reply to the registration"))
            else:
                registered[name] = version
        return registered, sorted(missing, key=lambda m: m.node)

    async def register_saved(
        self,
        trial_id: str,
        title: str,
        criteria: Mapping[str, Any],
        org: str,
        nodes: Sequence[str] | None = None,
        target: int | None = None,
        recruiting_sites: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, Any]:
        """Register ``org``'s saved question at every node (or those named): it is then live at
        each; a node that did not take it is named and tried again at the next answer.
        ``target``: enrolments wanted across nodes; ``recruiting_sites``: per node, its sites
        that recruit (each node is sent its own only)."""
        store = self.saved_questions
        store.check_free(trial_id, org)
        chosen = list(self._chosen(nodes))
        sites = {n: list(s) for n, s in sorted((recruiting_sites or {}).items())}
        strays = sorted(set(sites) - set(chosen))
        if strays:
            raise UnknownNodes(f"recruiting sites for nodes not asked: {', '.join(strays)}")
        record = HubSavedQuestion(
            trial_id, org, title, dict(criteria), chosen, target=target, recruiting_sites=sites
        )
        registered, missing = await self._register_at(record, chosen)
        record.registered = registered
        record.pending = {m.node: m.reason for m in missing}
        store.put(record)
        return {"hub": self.id, **record.public()}

    async def retire_saved(self, trial_id: str, org: str) -> dict[str, Any]:
        """Retire ``org``'s saved question at the hub and at every node it is registered at."""
        store = self.saved_questions
        record = store.get(trial_id, org)
        record.status = "retired"
        store.put(record)
        nodes = [n for n in record.registered if n in self.directory.all()]
        _, replies, missing, _ = await self._fan_out(
            f"/v1/federation/saved-questions/{trial_id}/retire",
            {"trial": trial_id},
            org,
            "sponsor",
            nodes,
            _SAVED_REFUSALS,
        )
        return {
            "hub": self.id,
            **record.public(),
            "retired_at": sorted(replies),
            "nodes_missing": [m.to_dict() for m in missing],
        }

    async def _ask_saved(
        self, trial_id: str, org: str, action: str, retry_registration: bool
    ) -> tuple[HubSavedQuestion, dict[str, dict[str, Any]], list[Missing], list[Missing], float]:
        """Ask every node where ``org``'s active saved question is registered for ``action``
        (``answer``, ``sites``): the record, the replies, the nodes that did not answer, the
        nodes not asked (gone from the directory, or where it is not registered) and the time
        taken. With ``retry_registration``, nodes where it is not registered yet are tried
        first."""
        store = self.saved_questions
        record = store.get(trial_id, org)
        if record.status != "active":
            raise RetiredQuestion(f"saved question {trial_id} is retired")
        directory = self.directory.all()
        retry = [n for n in record.nodes if n not in record.registered and n in directory]
        if retry_registration and retry:
            registered, still = await self._register_at(record, retry)
            record.registered.update(registered)
            record.pending = {m.node: m.reason for m in still}
            store.put(record)
        live = [n for n in record.nodes if n in record.registered and n in directory]
        _, replies, missing, elapsed = await self._fan_out(
            f"/v1/federation/saved-questions/{trial_id}/{action}",
            {"trial": trial_id},
            org,
            "sponsor",
            live,
            _SAVED_REFUSALS,
        )
        absent = [Missing(n, "no longer registered at the hub") for n in record.nodes
                  if n not in directory]  # fmt: skip
        absent += [
            Missing(n, f"the saved question is not registered there ({record.pending.get(n)})")
            for n in record.nodes
            if n not in record.registered and n in directory
        ]
        return record, replies, missing, absent, elapsed

    async def answer_saved(self, trial_id: str, org: str) -> dict[str, Any]:
        """The live answer to ``org``'s saved question: the combination of each node's protected
        live answer, each node's ``as_of`` shown. Nodes where it is not registered (tried again
        first), behind, down or refusing are named in ``nodes_missing`` and the answer is
        ``partial``."""
        record, replies, missing, absent, elapsed = await self._ask_saved(
            trial_id, org, "answer", retry_registration=True
        )
        answers: list[NodeAnswer] = []
        for name, reply in replies.items():
            try:
                if reply.get("trial") != trial_id:
                    raise ReplyError("the reply is for another saved question")
                answer = parse_reply(name, reply)
                combine_recruitment(replies, [name])  # its recruitment cells are checked too
                answers.append(answer)
            except ReplyError as exc:
                missing.append(Missing(name, f"unusable reply ({exc})"))
        missing = sorted([*missing, *absent], key=lambda m: m.node)
        combined = combine(record.nodes, answers, missing)
        return {
            "hub": self.id,
            "trial": trial_id,
            "kind": "saved (live at each node)",
            "versions": {a.node: replies[a.node].get("version") for a in answers},
            **combined,
            "recruitment": combine_recruitment(replies, [a.node for a in answers]),
            "elapsed_ms": round(elapsed * 1000, 1),
        }

    async def sites(self, trial_id: str, org: str) -> dict[str, Any]:
        """Site selection and the accrual forecast for ``org``'s saved question across nodes:
        each node's protected site selection (charged to the sponsor there), combined by
        :func:`federation.sites.combine_sites` with the target kept at the hub. Nodes behind,
        down, refusing or where the question is not registered are named and the answer is
        ``partial``."""
        record, replies, missing, absent, elapsed = await self._ask_saved(
            trial_id, org, "sites", retry_registration=False
        )
        answers: list[NodeSites] = []
        for name, reply in replies.items():
            try:
                answers.append(parse_sites_reply(name, trial_id, reply))
            except ReplyError as exc:
                missing.append(Missing(name, f"unusable reply ({exc})"))
        missing = sorted([*missing, *absent], key=lambda m: m.node)
        combined = combine_sites(record.nodes, answers, missing, record.target, datetime.now(UTC))
        return {
            "hub": self.id,
            "trial": trial_id,
            "title": record.title,
            **combined,
            "elapsed_ms": round(elapsed * 1000, 1),
        }


class RetiredQuestion(RuntimeError):
    """The saved question is retired: no answer."""


#: What a node's refusal means for a saved question (beside :data:`_REFUSALS`).
_SAVED_REFUSALS = {
    404: "the saved question is not registered at the node, or the node is no federation node",
    409: "refused: the id is another organisation's at the node, or the question is retired there",
}


class _NodeFailed(RuntimeError):
    """A node answered, but not with a usable answer: the reason, in words."""


__all__ = ["Hub", "NodeDirectory", "NodeRecord", "RetiredQuestion", "UnknownNodes"]
