"""Regulators' notifications of device signals, delivered through the recruitment outbox.

A regulator subscribes (:class:`~.models.SignalSubscription`: device class, outcome, level and
which moves, any of them left open) to an e-mail address or a webhook URL. Every move of a signal
(``detect``, ``lapse`` and each regulator action; the event the signal monitor publishes on the
signals topic, :data:`core.contracts.signals.SignalEvent`) is matched against the active
subscriptions, and one outbox row per match is written in one transaction, deduplicated by
subscription, signal and version (so re-notifying the same event adds nothing). The outbox's
dispatcher (``concierge recruitment run``) delivers them with its retries: e-mail through the SMTP
channel, webhooks through :class:`~.notify.AddressedWebhookChannel` to the subscription's own URL,
signed like every webhook.

Notifications carry no patient data: the signal, its node and outcome, the move, and links to the
signal and its report in the regulator API.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from .models import OutboxMessage, SignalSubscription, utcnow
from .notify import EMAIL, SCHEMA, SIGNAL_WEBHOOK

__all__ = ["SIGNAL_ACTIONS", "SignalNotices", "SubscriptionError"]

#: Every move a subscription can ask for.
SIGNAL_ACTIONS: tuple[str, ...] = ("detect", "lapse", "review", "confirm", "dismiss", "close",
                                   "reopen")  # fmt: skip
_LEVELS = ("class", "manufacturer", "model", "lot")


class SubscriptionError(ValueError):
    """A subscription that cannot be kept (bad channel, address, level or action)."""


def _level_of(node: str) -> str:
    depth = node.count("/") + 1
    return _LEVELS[min(depth, len(_LEVELS)) - 1]


def _class_of(node: str) -> str:
    return node.split("/", 1)[0]


class SignalNotices:
    """Subscriptions and the outbox rows for signal events, on the recruitment database."""

    def __init__(self, sessions: sessionmaker[Session], base_url: str) -> None:
        self.sessions = sessions
        self.base_url = base_url.rstrip("/")

    # ------------------------------------------------------------------ subscriptions

    def subscribe(
        self,
        subscriber: str,
        org: str,
        channel: str,
        address: str,
        *,
        device_class: str | None = None,
        outcome: str | None = None,
        level: str | None = None,
        actions: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        if channel not in ("email", "webhook"):
            raise SubscriptionError("channel must be 'email' or 'webhook'")
        if channel == "email" and ("@" not in address or any(c.isspace() for c in address)):
            raise SubscriptionError(f"{address!r} is not an e-mail address")
        if channel == "webhook" and not address.startswith(("https://", "http://127.0.0.1",
                                                             "http://localhost")):  # fmt: skip
            raise SubscriptionError("a webhook address must be an https URL")
        if level is not None and level not in _LEVELS:
            raise SubscriptionError(f"level must be one of {', '.join(_LEVELS)}")
        unknown = [a for a in actions or () if a not in SIGNAL_ACTIONS]
        if unknown:
            raise SubscriptionError(f"unknown actions {unknown}; of {', '.join(SIGNAL_ACTIONS)}")
        row = SignalSubscription(
            id=str(uuid.uuid4()),
            subscriber=subscriber,
            org=org,
            channel=channel,
            address=address,
            device_class=device_class,
            outcome=outcome,
            level=level,
            actions=list(actions) if actions else None,
            created_at=now or utcnow(),
            active=True,
        )
        with self.sessions.begin() as session:
            session.add(row)
            session.flush()
            return _public(row)

    def subscriptions(self, subscriber: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(SignalSubscription).where(SignalSubscription.active.is_(True))
        if subscriber is not None:
            query = query.where(SignalSubscription.subscriber == subscriber)
        with self.sessions() as session:
            rows = session.scalars(query.order_by(SignalSubscription.created_at)).all()
            return [_public(r) for r in rows]

    def unsubscribe(self, identifier: str, subscriber: str) -> bool:
        """End a subscription of this subscriber; False when there is none."""
        with self.sessions.begin() as session:
            row = session.get(SignalSubscription, identifier)
            if row is None or not row.active or row.subscriber != subscriber:
                return False
            row.active = False
            return True

    # ------------------------------------------------------------------ events

    def notify(self, event: Mapping[str, Any], now: datetime | None = None) -> int:
        """Queue the event for every matching subscription; returns the rows queued (a repeat
        of the same event queues nothing new)."""
        now = now or utcnow()
        node, outcome, action = str(event["node"]), str(event["outcome"]), str(event["action"])
        queued = 0
        with self.sessions.begin() as session:
            rows = session.scalars(
                sa.select(SignalSubscription).where(SignalSubscription.active.is_(True))
            ).all()
            for row in rows:
                if not _matches(row, node, outcome, action):
                    continue
                key = f"signal:{row.id}:{event['signal']}:{event['version']}"
                if session.scalar(sa.select(OutboxMessage.id).where(
                        OutboxMessage.dedupe_key == key)) is not None:  # fmt: skip
                    continue
                session.add(self._message(row, event, key, now))
                queued += 1
        return queued

    def _message(
        self, row: SignalSubscription, event: Mapping[str, Any], key: str, now: datetime
    ) -> OutboxMessage:
        identifier = str(event["signal"])
        link = f"{self.base_url}/v1/surveillance/signals/{identifier}"
        subject = f"Device signal {event['action']}: {event['node']} · {event['outcome']}"
        body = (
            f"The device-safety signal {event['node']} · {event['outcome']} moved "
            f"{event['from']} -> {event['to']} ({event['action']} by {event['actor']}) at "
            f"{event['at']}.\n{('Reason: ' + str(event['reason'])) if event.get('reason') else ''}"
            f"\nSignal: {link}\nReport: {link}/report (PDF: {link}/report?format=pdf)\n"
            "Sign in to the regulator API or dashboard to see it."
        )
        message_id = str(uuid.uuid4())
        channel = EMAIL if row.channel == "email" else SIGNAL_WEBHOOK
        statistics = event.get("statistics") or {}
        maxsprt = statistics.get("maxsprt") or {}
        return OutboxMessage(
            id=message_id,
            kind="signal",
            channel=channel,
            recipient=row.address,
            practitioner=f"subscription:{row.id}",
            subject=subject,
            body=body,
            payload={
                "schema": SCHEMA,
                "id": message_id,
                "kind": "signal",
                "subscription": row.id,
                "subject": subject,
                "text": body,
                "created_at": now.isoformat(),
                "signal": identifier,
                "node": event["node"],
                "outcome": event["outcome"],
                "action": event["action"],
                "from": event["from"],
                "to": event["to"],
                "version": event["version"],
                "at": event["at"],
                "observed": maxsprt.get("observed"),
                "expected": maxsprt.get("expected"),
                "llr": maxsprt.get("llr"),
                "controls": [c.get("control") for c in statistics.get("controls", [])],
                "link": link,
                "report": f"{link}/report",
            },
            dedupe_key=key,
            invitation_id=None,
            created_at=now,
            attempts=0,
            next_attempt_at=now,
        )


def _matches(row: SignalSubscription, node: str, outcome: str, action: str) -> bool:
    return (
        (row.device_class is None or row.device_class == _class_of(node))
        and (row.outcome is None or row.outcome == outcome)
        and (row.level is None or row.level == _level_of(node))
        and (not row.actions or action in row.actions)
    )


def _public(row: SignalSubscription) -> dict[str, Any]:
    return {
        "id": row.id,
        "subscriber": row.subscriber,
        "org": row.org,
        "channel": row.channel,
        "address": row.address,
        "device_class": row.device_class,
        "outcome": row.outcome,
        "level": row.level,
        "actions": row.actions,
        "created_at": row.created_at.isoformat(),
    }
