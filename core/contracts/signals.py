"""Signal lifecycle events (``concierge.signal-event/1``) on the signals topic, keyed by signal
id and kept forever: the monitor writes one per move of a signal (``surveillance_stream``), the
API serves them, the regulator dashboard reads them. See
``docs/explanation/device-surveillance.md``.
"""

from __future__ import annotations

from typing import Any, TypedDict

SIGNAL_EVENT_SCHEMA = "concierge.signal-event/1"
#: The tree-based scan's looks share the topic (key ``scan-look-<n>``); readers of lifecycle
#: events skip other schemas. Fields: ``docs/reference/topics-and-facts.md``.
SCAN_LOOK_SCHEMA = "concierge.scan-look/1"

#: One move of a signal. ``from`` is a Python keyword, hence the functional form.
SignalEvent = TypedDict(
    "SignalEvent",
    {
        "schema": str,
        "signal": str,
        "node": str,
        "outcome": str,
        "version": int,
        "action": str,
        "from": str,
        "to": str,
        "actor": str,
        "reason": str,
        "statistics": dict[str, Any] | None,
        "at": str,
    },
)

__all__ = ["SCAN_LOOK_SCHEMA", "SIGNAL_EVENT_SCHEMA", "SignalEvent"]
