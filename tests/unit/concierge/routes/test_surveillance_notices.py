"""The regulator's subscription routes, and a signal move reaching the outbox through the API's
wiring (monitor listener -> subscriptions -> outbox rows), over the real recruitment store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from recruitment.models import OutboxMessage
from tests.api_world import World, build_world


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with build_world(tmp_path) as built:
        yield built


def test_a_subscription_receives_the_monitors_signal_moves(world: World) -> None:
    regulator = world.headers("regulator", "MHRA")
    made = world.client.post(
        "/v1/surveillance/subscriptions",
        json={"channel": "email", "address": "signals@mhra.example", "device_class": "hip"},
        headers=regulator,
    )
    assert made.status_code == 201, made.text
    listed = world.client.get("/v1/surveillance/subscriptions", headers=regulator).json()
    assert [s["id"] for s in listed["subscriptions"]] == [made.json()["id"]]
    bad = world.client.post(
        "/v1/surveillance/subscriptions",
        json={"channel": "email", "address": "no address"},
        headers=regulator,
    )
    assert bad.status_code == 422 and "e-mail" in bad.json()["detail"]

    monitor = world.app.state.surveillance
    move = {
        "schema": "concierge.signal-event/1", "signal": "sig-1", "version": 1,
        "node": "hip/Orthomedica/Acetabulon X2", "outcome": "adverse event",
        "action": "detect", "from": "none", "to": "signalled", "actor": "system",
        "reason": "", "statistics": None, "at": "2026-01-02T00:00:00+00:00",
    }  # fmt: skip
    monitor._audit(move)  # what the monitor calls after publishing every move
    monitor._audit({**move, "node": "knee/Genuflex/GX-100", "signal": "sig-2"})  # not hips
    assert world.runtime is not None
    with world.runtime.sessions() as session:
        rows = list(session.scalars(sa.select(OutboxMessage).where(OutboxMessage.kind == "signal")))
    assert [(r.recipient, r.payload["signal"]) for r in rows] == [("signals@mhra.example", "sig-1")]
    assert monitor.status()["notify_failures"] == 0

    gone = world.client.delete(
        f"/v1/surveillance/subscriptions/{made.json()['id']}", headers=regulator
    )
    assert gone.status_code == 204
    again = world.client.delete(
        f"/v1/surveillance/subscriptions/{made.json()['id']}", headers=regulator
    )
    assert again.status_code == 404
