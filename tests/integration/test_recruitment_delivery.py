"""Notifications delivered for real: SMTP to aiosmtpd, a webhook to a local HTTP server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller

from recruitment.models import Invitation, OutboxMessage
from recruitment.notify import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from recruitment.runtime import Runtime, build_runtime
from recruitment.settings import RecruitmentSettings
from tests.recruitment_helpers import (
    Clock,
    cohort,
    fresh_database,
    patient_facts,
    practitioner,
    practitioner_key,
    trial,
)

pytestmark = [pytest.mark.integration]

PATIENT = "p-4f1c9a0e5b2d7c3a8e6f0b1d2c3a4e5f"
SECRET = "webhook-secret-for-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mailbox:
    """An aiosmtpd handler: answers each DATA with the next scripted reply, keeps what it took."""

    def __init__(self, replies: list[str] | None = None) -> None:
        self.replies = list(replies or [])
        self.messages: list[tuple[str, list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.replies.pop(0) if self.replies else "250 Message accepted"
        if reply.startswith("250"):
            content = envelope.content
            raw = content if isinstance(content, bytes) else content.encode()
            self.messages.append(
                (envelope.mail_from, list(envelope.rcpt_tos), message_from_bytes(raw))
            )
        return reply


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def _invite(runtime: Runtime) -> str:
    with runtime.sessions.begin() as session:
        work = runtime.service.unit_of_work(session)
        work.trial("t1", trial(title="SGLT2 inhibitor study"))
        work.reference(practitioner("gp1"))
        work.facts(patient_facts(PATIENT, gps=[practitioner_key("gp1")]))
        work.cohort("t1", PATIENT, cohort("t1", PATIENT, 1))
        work.finish()
        return str(session.scalar(sa.select(Invitation.id)))


def _state(runtime: Runtime) -> tuple[str, list[tuple[int, Any, Any]]]:
    with runtime.sessions() as session:
        state = session.scalar(sa.select(Invitation.state)) or ""
        rows = session.execute(
            sa.select(OutboxMessage.attempts, OutboxMessage.delivered_at, OutboxMessage.failed_at)
        ).all()
        return state, [tuple(r) for r in rows]


def test_alert_by_smtp_after_a_temporary_refusal(
    mailbox: tuple[Mailbox, int], tmp_path: Path
) -> None:
    box, port = mailbox
    box.replies = ["451 4.3.0 Try again later"]
    clock = Clock()
    with fresh_database("sqlite", tmp_path) as url:
        settings = RecruitmentSettings(
            url=url,
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_sender="recruitment@concierge.example",
            app_base_url="https://concierge.example",
            backoff_seconds=60,
        )
        runtime = build_runtime(settings, url=url, clock=clock)  # channels from settings
        try:
            invitation = _invite(runtime)
            assert runtime.dispatcher.run_once().retrying == 1
            assert box.messages == []
            clock.advance(seconds=60)
            assert runtime.dispatcher.run_once().delivered == 1
            ((sender, recipients, message),) = box.messages
            assert sender == "recruitment@concierge.example"
            assert recipients == ["gp1@nhs.example"]
            assert message["Subject"] == "Trial candidate to review: t1"
            with runtime.sessions() as session:
                outbox_id = session.scalar(sa.select(OutboxMessage.id))
            assert message["Message-ID"] == f"<{outbox_id}@concierge.recruitment>"
            assert message[ID_HEADER] == outbox_id
            body = message.get_payload(decode=True).decode()
            assert "Review it here: https://concierge.example/clinician" in body  # the page
            assert invitation in body
            everything = message.as_string()
            assert PATIENT not in everything and PATIENT[2:12] not in everything
            state, rows = _state(runtime)
            assert state == "sent_to_clinician" and rows[0][0] == 2 and rows[0][1] is not None
        finally:
            runtime.close()


def test_a_permanent_smtp_refusal_is_not_retried(
    mailbox: tuple[Mailbox, int], tmp_path: Path
) -> None:
    box, port = mailbox
    box.replies = ["550 5.1.1 No such user"]
    clock = Clock()
    with fresh_database("sqlite", tmp_path) as url:
        settings = RecruitmentSettings(url=url, smtp_host="127.0.0.1", smtp_port=port)
        runtime = build_runtime(settings, url=url, clock=clock)
        try:
            _invite(runtime)
            assert runtime.dispatcher.run_once().failed == 1
            clock.advance(days=1)
            assert runtime.dispatcher.run_once().failed == 0
            state, rows = _state(runtime)
            assert state == "proposed" and rows[0][0] == 1 and rows[0][2] is not None
            assert box.messages == []
        finally:
            runtime.close()


class Hook:
    """What the webhook server received, and its scripted answers."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []


@pytest.fixture
def hook() -> Iterator[tuple[Hook, int]]:
    state = Hook([503])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k: v for k, v in self.headers.items()}
            signed = verify_signature(
                SECRET.encode(),
                headers.get(TIMESTAMP_HEADER, ""),
                body,
                headers.get(SIGNATURE_HEADER, ""),
            )
            status = (state.statuses.pop(0) if state.statuses else 204) if signed else 401
            if status == 204:
                state.received.append((headers, body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_alert_by_signed_webhook_after_a_server_error(
    hook: tuple[Hook, int], tmp_path: Path
) -> None:
    state, port = hook
    clock = Clock()
    with fresh_database("sqlite", tmp_path) as url:
        settings = RecruitmentSettings(
            url=url,
            email_enabled=False,
            webhook_url=f"http://127.0.0.1:{port}/recruitment",
            webhook_secret=SECRET,
            app_base_url="https://concierge.example",
            backoff_seconds=30,
        )
        runtime = build_runtime(settings, url=url, clock=clock)
        try:
            invitation = _invite(runtime)
            assert runtime.dispatcher.run_once().retrying == 1  # the server answered 503
            clock.advance(seconds=30)
            assert runtime.dispatcher.run_once().delivered == 1
            ((headers, body),) = state.received
            payload = json.loads(body)
            assert payload["schema"] == "concierge.notification/1"
            assert payload["kind"] == "alert" and payload["invitation"] == invitation
            assert payload["practitioner"] == practitioner_key("gp1")
            assert payload["link"] == "https://concierge.example/clinician"  # the page
            assert (
                payload["api"] == f"https://concierge.example/v1/clinician/invitations/{invitation}"
            )
            assert headers[ID_HEADER] == payload["id"]
            assert PATIENT not in body.decode()
            assert _state(runtime)[0] == "sent_to_clinician"
        finally:
            runtime.close()


def test_a_webhook_with_a_wrong_secret_is_refused_and_not_retried(
    hook: tuple[Hook, int], tmp_path: Path
) -> None:
    state, port = hook
    state.statuses = []
    with fresh_database("sqlite", tmp_path) as url:
        settings = RecruitmentSettings(
            url=url,
            email_enabled=False,
            webhook_url=f"http://127.0.0.1:{port}/recruitment",
            webhook_secret="not-the-secret",
        )
        runtime = build_runtime(settings, url=url, clock=Clock())
        try:
            _invite(runtime)
            assert runtime.dispatcher.run_once().failed == 1  # 401 is permanent
            assert state.received == []
        finally:
            runtime.close()
