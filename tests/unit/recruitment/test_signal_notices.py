"""Regulators' signal notifications through the outbox: subscriptions match by class, outcome,
level and move; each event is queued once per subscription (a repeat adds nothing); the
dispatcher delivers e-mail and signed webhooks to each subscription's own URL; no patient data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from recruitment.models import OutboxMessage
from recruitment.notify import (
    EMAIL,
    SIGNAL_WEBHOOK,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AddressedWebhookChannel,
    MemoryChannel,
    verify_signature,
)
from recruitment.runtime import build_runtime
from recruitment.settings import RecruitmentSettings
from recruitment.signal_notices import SignalNotices, SubscriptionError
from tests.recruitment_helpers import BACKENDS, Clock, fresh_database

SECRET = b"w" * 32
HIP = "hip/Orthomedica/Acetabulon X2"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def event(action: str = "detect", version: int = 1, node: str = HIP) -> dict[str, Any]:
    return {
        "schema": "concierge.signal-event/1",
        "signal": "sig-abc",
        "node": node,
        "outcome": "adverse event",
        "version": version,
        "action": action,
        "from": "none",
        "to": "signalled",
        "actor": "system",
        "reason": "signal rule fired (maxsprt)",
        "statistics": {
            "maxsprt": {"observed": 16, "expected": 3.8, "llr": 13.5},
            "controls": [{"control": "pair"}],
        },
        "at": "2026-01-02T00:00:00+00:00",
    }


def test_subscriptions_match_and_each_event_is_queued_once(db_url: str) -> None:
    clock = Clock()
    webhook_posts: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        webhook_posts.append(request)
        return httpx.Response(204)

    email = MemoryChannel()
    channels = {
        EMAIL: email,
        SIGNAL_WEBHOOK: AddressedWebhookChannel(
            SECRET, client=httpx.Client(transport=httpx.MockTransport(receive))
        ),
    }
    config = RecruitmentSettings(url=db_url, app_base_url="https://api.example")
    runtime = build_runtime(config, url=db_url, channels=channels, clock=clock)  # type: ignore[arg-type]
    notices = SignalNotices(runtime.sessions, "https://api.example")
    everything = notices.subscribe("reg-1", "MHRA", "email", "signals@mhra.example", now=clock())
    hips = notices.subscribe(
        "reg-2", "MHRA", "webhook", "https://mhra.example/hook", device_class="hip",
        level="model", actions=["detect", "confirm"], now=clock(),
    )  # fmt: skip
    notices.subscribe("reg-3", "MHRA", "email", "knees@mhra.example", device_class="knee",
                      now=clock())  # fmt: skip
    assert notices.notify(event("detect"), now=clock()) == 2  # everything + hips, not knees
    assert notices.notify(event("detect"), now=clock()) == 0  # the same event again: nothing
    assert notices.notify(event("review", version=2), now=clock()) == 1  # hips wants no review
    assert notices.notify(event("detect", version=3, node="hip/Orthomedica"), now=clock()) == 1
    with runtime.sessions() as session:
        rows = list(session.scalars(sa.select(OutboxMessage).where(OutboxMessage.kind == "signal")))
    assert sorted((r.channel, r.recipient) for r in rows) == sorted(
        [(EMAIL, "signals@mhra.example")] * 3 + [(SIGNAL_WEBHOOK, "https://mhra.example/hook")]
    )
    report = runtime.dispatcher.run_once()
    assert report.delivered == 4
    assert len(email.sent) == 3 and "Device signal detect" in email.sent[0].subject
    assert "/v1/surveillance/signals/sig-abc/report" in email.sent[0].body
    (post,) = webhook_posts
    assert str(post.url) == "https://mhra.example/hook"
    assert verify_signature(
        SECRET, post.headers[TIMESTAMP_HEADER], post.content, post.headers[SIGNATURE_HEADER]
    )
    payload = json.loads(post.content)
    assert (payload["signal"], payload["action"], payload["observed"]) == ("sig-abc", "detect", 16)
    # no patient data: nothing that looks like a pseudonym or identity field
    assert not {"patient", "patients", "pseudonym", "nhs_number"} & set(payload)
    assert [s["id"] for s in notices.subscriptions("reg-2")] == [hips["id"]]
    assert notices.unsubscribe(hips["id"], "reg-1") is False  # only its own subscriber
    assert notices.unsubscribe(hips["id"], "reg-2") is True
    assert notices.notify(event("confirm", version=4), now=clock()) == 1  # only "everything"
    assert everything["channel"] == "email"


def test_a_subscription_that_cannot_be_kept_is_refused(db_url: str) -> None:
    config = RecruitmentSettings(url=db_url, app_base_url="https://api.example")
    runtime = build_runtime(config, url=db_url, channels={})
    notices = SignalNotices(runtime.sessions, "https://api.example")
    with pytest.raises(SubscriptionError, match="e-mail"):
        notices.subscribe("r", "MHRA", "email", "not an address")
    with pytest.raises(SubscriptionError, match="https"):
        notices.subscribe("r", "MHRA", "webhook", "ftp://x")
    with pytest.raises(SubscriptionError, match="actions"):
        notices.subscribe("r", "MHRA", "email", "a@b.example", actions=["explode"])
