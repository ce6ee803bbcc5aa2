"""FHIR Subscription notifications: R5 ``subscription-notification`` Bundles and the R4/R4B
backport's ``history`` Bundles whose first entry is a SubscriptionStatus (R4B) or a Parameters
resource (R4 backport).

Each notification carries event numbers. We remember, per subscription, the highest event number
seen, and report a gap whenever a notification (an event or a heartbeat) shows events we never
received, so an operator can re-query the source for them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .vault import Vault

log = logging.getLogger(__name__)


def _int64(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", value):
        value = int(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    return None


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass
class Notification:
    subscription: str
    kind: str
    events_since_start: int | None
    event_numbers: list[int] = field(default_factory=list)

    def check_gap(self, vault: Vault) -> dict[str, Any] | None:
        last = vault.subscription_event(self.subscription)
        highest = max(self.event_numbers, default=None)
        if highest is None and self.events_since_start is not None:
            highest = self.events_since_start
        gap = None
        if last is not None and highest is not None:
            first_new = min(self.event_numbers) if self.event_numbers else highest
            if self.event_numbers and first_new > last + 1:
                gap = {
                    "subscription": self.subscription,
                    "expected_event": last + 1,
                    "received_event": first_new,
                    "missing": first_new - last - 1,
                }
            elif not self.event_numbers and highest > last:
                gap = {
                    "subscription": self.subscription,
                    "expected_event": last + 1,
                    "received_event": None,
                    "missing": highest - last,
                }
        if gap is not None:
            log.warning("subscription %s: %d events missing", self.subscription, gap["missing"])
        if highest is not None and (last is None or highest > last):
            vault.set_subscription_event(self.subscription, highest)
        return gap


def _reference(value: object) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None


def _from_status(status: Mapping[str, Any]) -> Notification:
    numbers = []
    events = status.get("notificationEvent")
    if isinstance(events, list):
        for event in events:
            if isinstance(event, dict):
                number = _int64(event.get("eventNumber"))
                if number is not None:
                    numbers.append(number)
    return Notification(
        subscription=_reference(status.get("subscription")) or "(unknown subscription)",
        kind=str(status.get("type", "event-notification")),
        events_since_start=_int64(status.get("eventsSinceSubscriptionStart")),
        event_numbers=numbers,
    )


def _from_parameters(parameters: Mapping[str, Any]) -> Notification:
    subscription = "(unknown subscription)"
    kind = "event-notification"
    since = None
    numbers: list[int] = []
    for param in _list(parameters.get("parameter")):
        if not isinstance(param, dict):
            continue
        name = param.get("name")
        if name == "subscription":
            subscription = _reference(param.get("valueReference")) or subscription
        elif name == "type":
            kind = str(param.get("valueCode", kind))
        elif name == "events-since-subscription-start":
            since = _int64(
                param.get("valueString", param.get("valueInteger64", param.get("valueUnsignedInt")))
            )
        elif name == "notification-event":
            for part in _list(param.get("part")):
                if isinstance(part, dict) and part.get("name") == "event-number":
                    number = _int64(
                        part.get(
                            "valueString", part.get("valueInteger64", part.get("valueUnsignedInt"))
                        )
                    )
                    if number is not None:
                        numbers.append(number)
    return Notification(subscription, kind, since, numbers)


def notification_of(bundle: Mapping[str, Any]) -> Notification | None:
    """The notification a Bundle carries, or None when it is not a notification."""
    btype = bundle.get("type")
    if btype not in ("subscription-notification", "history"):
        return None
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None
    first = entries[0].get("resource")
    if not isinstance(first, dict):
        return None
    if first.get("resourceType") == "SubscriptionStatus":
        return _from_status(first)
    if first.get("resourceType") == "Parameters" and btype == "history":
        names = [p.get("name") for p in _list(first.get("parameter")) if isinstance(p, dict)]
        if "subscription" in names:
            return _from_parameters(first)
    return None
