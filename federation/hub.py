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
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .combine import Missing, NodeAnswer, ReplyError, combine, combine_exact, parse_reply
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
            reason = _REFUSALS.get(response.status_code, f"failed (HTTP {response.status_code})")
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
        nodes: Sequence[str] | None,
    ) -> tuple[list[str], dict[str, dict[str, Any]], list[Missing], float]:  # fmt: skip
        chosen = self._chosen(nodes)
        body = json.dumps(question, sort_keys=True).encode()
        started = time.perf_counter()
        replies: dict[str, dict[str, Any]] = {}
        missing: list[Missing] = []
        timeout = httpx.Timeout(self.deadline_seconds)
        async with httpx.AsyncClient(timeout=timeout, transport=self.transport) as client:
            tasks = {
                asyncio.create_task(self._ask_one(client, r, path, body, org, role)): name
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


class _NodeFailed(RuntimeError):
    """A node answered, but not with a usable answer: the reason, in words."""


__all__ = ["Hub", "NodeDirectory", "NodeRecord", "UnknownNodes"]
