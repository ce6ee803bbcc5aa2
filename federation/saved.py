"""Saved questions registered at the hub, kept live at each node.

The hub keeps only what a sponsor registered (the id, title, criteria and which nodes) and where
it is registered (each node's version of it), in a JSON file beside the node directory: no
counts, no answers. Each node registers the question in its own registry of saved questions
(its trials topic), charged to the sponsor under the hub's name, and its own worker keeps the
cohort live; the hub's live answer is the combination of the nodes' *protected* live answers
(:func:`federation.combine.combine`), each node's ``as_of`` shown. A node that was down at
registration is named as not registered and is registered again at the next answer.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class NotTheirs(LookupError):
    """The saved question's id is another organisation's at the hub (or there is none)."""


@dataclass
class HubSavedQuestion:
    id: str
    org: str
    title: str
    criteria: dict[str, Any]
    #: The nodes it is to be live at.
    nodes: list[str]
    status: str = "active"
    #: node -> the version of the question the node registered.
    registered: dict[str, int] = field(default_factory=dict)
    #: node -> why it is not registered there yet (in words).
    pending: dict[str, str] = field(default_factory=dict)
    registered_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    #: Enrolments wanted across nodes (None: no target, no forecast).
    target: int | None = None
    #: node -> its sites that recruit for the trial (sent to that node only).
    recruiting_sites: dict[str, list[str]] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "criteria": self.criteria,
            "nodes": list(self.nodes),
            "registered": dict(sorted(self.registered.items())),
            "not_registered": [{"node": n, "reason": r} for n, r in sorted(self.pending.items())],
            "registered_at": self.registered_at,
            "target": self.target,
            "recruiting_sites": {n: list(s) for n, s in sorted(self.recruiting_sites.items())},
        }


class HubSavedQuestions:
    """The hub's saved questions, in a JSON file rewritten whole (atomically) on each change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, HubSavedQuestion]:
        if not self.path.exists():
            return {}
        raw = json.loads(self.path.read_text())
        return {k: HubSavedQuestion(**v) for k, v in raw.items()}

    def _write(self, records: Mapping[str, HubSavedQuestion]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in sorted(records.items())}, indent=2))
        os.replace(tmp, self.path)

    def get(self, trial_id: str, org: str) -> HubSavedQuestion:
        """``org``'s saved question; :class:`NotTheirs` for a missing one or another's."""
        with self._lock:
            record = self._read().get(trial_id)
        if record is None or record.org != org:
            raise NotTheirs(f"no saved question {trial_id}")
        return record

    def check_free(self, trial_id: str, org: str) -> None:
        """Raise :class:`NotTheirs` if ``trial_id`` is another organisation's."""
        with self._lock:
            record = self._read().get(trial_id)
        if record is not None and record.org != org:
            raise NotTheirs(f"the id {trial_id} is another organisation's")

    def of(self, org: str) -> list[HubSavedQuestion]:
        with self._lock:
            return [r for r in self._read().values() if r.org == org]

    def put(self, record: HubSavedQuestion) -> HubSavedQuestion:
        with self._lock:
            records = self._read()
            current = records.get(record.id)
            if current is not None and current.org != record.org:
                raise NotTheirs(f"the id {record.id} is another organisation's")
            records[record.id] = record
            self._write(records)
        return record


__all__ = ["HubSavedQuestion", "HubSavedQuestions", "NotTheirs"]
