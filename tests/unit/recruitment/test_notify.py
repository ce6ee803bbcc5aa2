"""Outbox, dispatcher (retries, backoff, give-up, claims), digests, reminders, webhook signing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from recruitment.models import Invitation, OutboxMessage
from recruitment.notify import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Backoff,
    DeliveryError,
    MemoryChannel,
    Notification,
    SmtpChannel,
    WebhookChannel,
    sign,
    verify_signature,
)
from recruitment.runtime import Runtime, build_runtime
from recruitment.scheduler import enqueue_digests, enqueue_reminders
from recruitment.settings import RecruitmentSettings
from tests.recruitment_helpers import (
    BACKENDS,
    Clock,
    cohort,
    fresh_database,
    patient_facts,
    practitioner,
    practitioner_key,
    trial,
)

GP = practitioner_key("gp1")
SECRET = b"s" * 32


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def _runtime(
    url: str, clock: Clock, channels: dict[str, MemoryChannel], **settings: object
) -> Runtime:
    config = RecruitmentSettings(
        url=url, app_base_url="https://app.example", backoff_seconds=30, **settings
    )
    return build_runtime(config, url=url, channels=channels, clock=clock)


def _invite(runtime: Runtime, *patients: str) -> None:
    with runtime.sessions.begin() as session:
        work = runtime.service.unit_of_work(session)
        work.trial("t1", trial())
        work.reference(practitioner("gp1"))
        for patient in patients:
            work.facts(patient_facts(patient, gps=[GP]))
            work.cohort("t1", patient, cohort("t1", patient, 1))
        work.finish()


def _outbox(runtime: Runtime) -> list[OutboxMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(sa.select(OutboxMessage).order_by(OutboxMessage.created_at)))


def _states(runtime: Runtime) -> list[str]:
    with runtime.sessions() as session:
        return list(session.scalars(sa.select(Invitation.state)))


def test_backoff_doubles_up_to_a_cap() -> None:
    backoff = Backoff(base_seconds=30, max_seconds=300)
    assert [backoff.delay(n).total_seconds() for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]


def test_failed_deliveries_are_retried_with_backoff_then_delivered(db_url: str) -> None:
    clock = Clock()
    email = MemoryChannel(fail=[DeliveryError("timeout"), DeliveryError("421 busy")])
    runtime = _runtime(db_url, clock, {"email": email})
    try:
        _invite(runtime, "p1")
        assert runtime.dispatcher.run_once().retrying == 1
        (row,) = _outbox(runtime)
        assert (row.attempts, row.last_error) == (1, "timeout")
        assert row.next_attempt_at == clock.now + timedelta(seconds=30)
        assert runtime.dispatcher.run_once().retrying == 0  # not due yet
        clock.advance(seconds=30)
        assert runtime.dispatcher.run_once().retrying == 1
        assert _outbox(runtime)[0].next_attempt_at == clock.now + timedelta(seconds=60)
        assert _states(runtime) == ["proposed"]  # not sent until delivered
        clock.advance(seconds=60)
        assert runtime.dispatcher.run_once().delivered == 1
        (row,) = _outbox(runtime)
        assert row.delivered_at == clock.now and row.attempts == 3 and row.last_error is None
        assert _states(runtime) == ["sent_to_clinician"]
        assert len(email.sent) == 1 and email.sent[0].recipient == "gp1@nhs.example"
        clock.advance(days=1)
        assert runtime.dispatcher.run_once().delivered == 0  # delivered once only
    finally:
        runtime.close()


def test_gives_up_after_max_attempts_or_a_permanent_error(db_url: str) -> None:
    clock = Clock()
    email = MemoryChannel(fail=[DeliveryError("down")] * 10)
    webhook = MemoryChannel(fail=[DeliveryError("HTTP 410", permanent=True)])
    runtime = _runtime(db_url, clock, {"email": email, "webhook": webhook}, max_attempts=3)
    try:
        _invite(runtime, "p1")
        assert {m.channel for m in _outbox(runtime)} == {"email", "webhook"}
        first = runtime.dispatcher.run_once()
        assert (first.failed, first.retrying) == (1, 1)  # the webhook's 410 is permanent
        for _ in range(5):
            clock.advance(hours=1)
            runtime.dispatcher.run_once()
        rows = {m.channel: m for m in _outbox(runtime)}
        assert rows["email"].attempts == 3 and rows["email"].failed_at is not None
        assert rows["webhook"].attempts == 1 and rows["webhook"].last_error == "HTTP 410"
        assert len(email.fail) == 7  # no attempt after the third
        assert _states(runtime) == ["proposed"]  # it expires later if nobody acts
    finally:
        runtime.close()


def test_a_claimed_row_is_not_delivered_twice(db_url: str) -> None:
    clock = Clock()
    runtime = _runtime(db_url, clock, {"email": MemoryChannel()})
    try:
        _invite(runtime, "p1")
        (row,) = _outbox(runtime)
        assert row.next_attempt_at is not None
        dispatcher = runtime.dispatcher
        assert dispatcher._claim(row.id, row.next_attempt_at, clock.now) is not None
        assert dispatcher._claim(row.id, row.next_attempt_at, clock.now) is None
        assert dispatcher.run_once().delivered == 0  # leased to the first claimant
        clock.advance(minutes=6)  # the lease ran out (that dispatcher died): retried
        assert dispatcher.run_once().delivered == 1
    finally:
        runtime.close()


def test_digests_once_a_day_per_clinician_and_reminders_once_per_wait(db_url: str) -> None:
    clock = Clock()
    email = MemoryChannel()
    runtime = _runtime(db_url, clock, {"email": email}, reminder_days=7)
    try:
        _invite(runtime, "p1", "p2")  # p2 is held (one open invitation per patient is p1's)
        runtime.dispatcher.run_once()
        assert enqueue_digests(runtime) == 1
        assert enqueue_digests(runtime) == 1  # same day: the same digest, not a new one
        digests = [m for m in _outbox(runtime) if m.kind == "digest"]
        assert len(digests) == 1
        assert "sent to clinician: 2" in digests[0].body
        assert "p1" not in digests[0].body and "p2" not in digests[0].body
        assert digests[0].payload["counts"] == {"sent_to_clinician": 2}
        clock.advance(days=1)
        enqueue_digests(runtime)
        assert len([m for m in _outbox(runtime) if m.kind == "digest"]) == 2

        assert enqueue_reminders(runtime) == 0
        clock.advance(days=7)
        assert enqueue_reminders(runtime) == 2
        enqueue_reminders(runtime)
        reminders = [m for m in _outbox(runtime) if m.kind == "reminder"]
        assert len(reminders) == 2
        assert all("8 days" in m.body and m.invitation_id in m.body for m in reminders)
    finally:
        runtime.close()


def test_webhook_signature_round_trip_and_tampering() -> None:
    body = b'{"id":"n1"}'
    signature = sign(SECRET, "1700000000", body)
    assert signature.startswith("sha256=")
    assert verify_signature(SECRET, "1700000000", body, signature, now=1700000100)
    assert not verify_signature(SECRET, "1700000000", body + b" ", signature, now=1700000100)
    assert not verify_signature(b"x" * 32, "1700000000", body, signature, now=1700000100)
    assert not verify_signature(SECRET, "1700000000", body, signature, now=1700009999)
    assert not verify_signature(SECRET, "soon", body, signature)


def _notification() -> Notification:
    return Notification(
        id="n-1",
        kind="alert",
        channel="webhook",
        recipient=GP,
        subject="Trial candidate to review: t1",
        body="text",
        payload={"id": "n-1", "invitation": "i-1"},
    )


def test_webhook_channel_signs_and_classifies_failures() -> None:
    seen: list[httpx.Request] = []
    answers = iter([200, 503, 429, 400])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(answers))

    channel = WebhookChannel(
        "https://hooks.example/in",
        SECRET,
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        clock=lambda: 1700000000.0,
    )
    channel.send(_notification())
    request = seen[0]
    assert json.loads(request.content) == {"id": "n-1", "invitation": "i-1"}
    assert request.headers[ID_HEADER] == "n-1"
    assert request.headers[TIMESTAMP_HEADER] == "1700000000"
    assert verify_signature(
        SECRET, "1700000000", request.content, request.headers[SIGNATURE_HEADER], now=1700000000
    )
    for permanent in (False, False, True):
        with pytest.raises(DeliveryError) as caught:
            channel.send(_notification())
        assert caught.value.permanent is permanent
    channel.close()


def test_smtp_message_carries_the_notification_id_and_no_more() -> None:
    notification = replace(_notification(), channel="email", recipient="gp1@nhs.example")
    message = SmtpChannel("127.0.0.1", 25, "recruitment@example.org").message(notification)
    assert message["Message-ID"] == "<n-1@concierge.recruitment>"
    assert message[ID_HEADER] == "n-1" and message["To"] == "gp1@nhs.example"
    assert message.get_content().strip() == "text"


def test_smtp_connection_failure_is_temporary() -> None:
    channel = SmtpChannel("127.0.0.1", 1, "recruitment@example.org", timeout=2)
    with pytest.raises(DeliveryError) as caught:
        channel.send(_notification())
    assert not caught.value.permanent


def test_the_alert_links_to_the_clinician_page_on_the_public_address(db_url: str) -> None:
    """The GP's e-mail opens the clinician page (where they sign in), not a JSON route that
    answers 401 to a browser; programs get the API route in the payload."""
    clock = Clock()
    email = MemoryChannel()
    runtime = _runtime(db_url, clock, {"email": email})
    try:
        _invite(runtime, "p1")
        (row,) = _outbox(runtime)
        assert "Review it here: https://app.example/clinician\n" in row.body
        assert "/v1/" not in row.body and row.invitation_id in row.body
        assert row.payload["link"] == "https://app.example/clinician"
        assert (
            row.payload["api"]
            == f"https://app.example/v1/clinician/invitations/{row.invitation_id}"
        )
    finally:
        runtime.close()


def test_the_public_address_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    for name in (
        "CONCIERGE_PUBLIC_URL",
        "CONCIERGE_RECRUITMENT_APP_BASE_URL",
        "CONCIERGE_API_HOST",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONCIERGE_API_PORT", "21000")
    get_settings.cache_clear()
    try:
        # by default the API's own port, not the default 8000
        assert RecruitmentSettings().app_base_url == "http://127.0.0.1:21000"
        monkeypatch.setenv("CONCIERGE_API_HOST", "0.0.0.0")
        get_settings.cache_clear()
        assert RecruitmentSettings().app_base_url == "http://127.0.0.1:21000"
        monkeypatch.setenv("CONCIERGE_PUBLIC_URL", "https://concierge.trust.nhs.example")
        assert RecruitmentSettings().app_base_url == "https://concierge.trust.nhs.example"
        assert RecruitmentSettings(app_base_url="https://x.example").app_base_url == (
            "https://x.example"
        )
    finally:
        get_settings.cache_clear()
