"""What the contract run sent and what it got back, counted per operation and caller."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Calls:
    #: (operation label, caller) -> statuses answered
    counts: defaultdict[tuple[str, str], Counter[int]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    callers: tuple[str, ...] = ()
    #: Cases generated (each sent as every caller), by schemathesis phase and mode.
    cases: Counter[str] = field(default_factory=Counter)
    #: Requests not sent: a case for a caller the operation had refused often enough already.
    skipped: int = 0
    #: What the run was: examples per operation, seed, seconds taken.
    about: dict[str, Any] = field(default_factory=dict)

    def record(self, operation: str, caller: str, status: int) -> None:
        self.counts[(operation, caller)][status] += 1

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def statuses(self) -> Counter[int]:
        out: Counter[int] = Counter()
        for counted in self.counts.values():
            out.update(counted)
        return out

    def report(self) -> list[str]:
        operations = sorted({op for op, _ in self.counts}, key=lambda op: (op.split()[1], op))
        about = ", ".join(f"{k} {v}" for k, v in self.about.items())
        lines = [
            f"{self.total} requests over {len(operations)} operations x "
            f"{len(self.callers)} callers ({about})",
            "statuses: " + " ".join(f"{s}x{n}" for s, n in sorted(self.statuses().items())),
            "cases generated: " + ", ".join(f"{k} {n}" for k, n in sorted(self.cases.items())),
            f"not sent: {self.skipped} (a case for a caller the operation had refused "
            "often enough already)",
        ]
        width = max(len(op) for op in operations)
        cell = max(9, *(len(c) for c in self.callers))
        lines.append(
            f"{'operation':<{width}}  "
            + " ".join(f"{c:>{cell}}" for c in self.callers)
            + "  statuses (all callers)"
        )
        for op in operations:
            per_op: Counter[int] = Counter()
            cells = []
            for caller in self.callers:
                counted = self.counts.get((op, caller), Counter())
                per_op.update(counted)
                cells.append(f"{sum(counted.values()):>{cell}}")
            statuses = " ".join(f"{s}x{n}" for s, n in sorted(per_op.items()))
            lines.append(f"{op:<{width}}  " + " ".join(cells) + f"  {statuses}")
        return lines

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "about": self.about,
            "total": self.total,
            "statuses": {str(s): n for s, n in sorted(self.statuses().items())},
            "cases": dict(sorted(self.cases.items())),
            "not sent (refused often enough already)": self.skipped,
            "requests": [
                {"operation": op, "caller": caller, "statuses": dict(sorted(counted.items()))}
                for (op, caller), counted in sorted(self.counts.items())
            ],
        }
        path.write_text(json.dumps(body, indent=1) + "\n")


#: The run's counts, printed at the end of the session (``conftest.py``).
CALLS = Calls()
