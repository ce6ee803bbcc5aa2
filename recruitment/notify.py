"""Notifying clinicians: a transactional outbox, channels, and a dispatcher that retries.

* :class:`OutboxWriter` writes notifications into the ``outbox`` table in the caller's
  transaction, so a notification exists if and only if the change it announces was committed.
  Each has a dedupe key (one alert per invitation and channel, one digest per clinician a day), so
  re-running whatever enqueued it adds nothing.
* :class:`Dispatcher` delivers what is due, claiming each row first (so two dispatchers never
  send the same row at once), retrying failures with exponential backoff up to a maximum number
  of attempts, and giving up at once on permanent errors. Delivery is at least once: receivers
  can drop repeats by the notification id (the e-mail Message-ID, the webhook header).
* Channels sit behind one small interface (:class:`Channel`): :class:`SmtpChannel` (smtplib),
  :class:`WebhookChannel` (httpx, JSON, HMAC-SHA256 signature), and :class:`MemoryChannel` for
  tests.

Notifications carry no patient details, not even the pseudonym: the trial, the site, the
invitation id and a link. The clinician signs in to see who it concerns (and that read is
audited).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from .models import Invitation, OutboxMessage, Practitioner, PractitionerRole, Trial, utcnow

log = logging.getLogger(__name__)

SCHEMA = "concierge.notification/1"
SIGNATURE_HEADER = "X-Concierge-Signature"
TIMESTAMP_HEADER = "X-Concierge-Timestamp"
ID_HEADER = "X-Concierge-Notification"

EMAIL = "email"
WEBHOOK = "webhook"
#: device-signal notifications to a regulator's own webhook URL (the row's recipient)
SIGNAL_WEBHOOK = "signal-webhook"


# --------------------------------------------------------------------------- writing


class OutboxWriter:
    """Writes notifications to the outbox, in the caller's session and transaction."""

    def __init__(self, base_url: str, email: bool = True, webhook: bool = False) -> None:
        self.base_url = base_url.rstrip("/")
        self.email = email
        self.webhook = webhook

    def page_link(self) -> str:
        """The clinician page, where a clinician signs in and acts on their invitations."""
        return f"{self.base_url}/clinician"

    def invitation_link(self, invitation_id: str) -> str:
        """The invitation in the clinician API (for programs, in webhook payloads)."""
        return f"{self.base_url}/v1/clinician/invitations/{invitation_id}"

    def inbox_link(self) -> str:
        return f"{self.base_url}/v1/clinician/invitations"

    def alert(
        self,
        session: Session,
        invitation: Invitation,
        trial: Trial,
        now: datetime,
        *,
        fresh: bool = False,
    ) -> int:
        """The immediate alert for a new candidate; returns how many channels it was queued on.

        ``fresh``: the invitation is new in this transaction, so no alert of it can be queued yet;
        the dedupe look-up is skipped (the unique dedupe key still refuses a duplicate)."""
        rows = self.alert_rows(
            session, invitation.id, invitation.site, invitation.practitioner, trial, now
        )
        return self._store(session, rows, fresh)

    def alert_rows(
        self,
        session: Session,
        invitation_id: str,
        site: str,
        practitioner: str,
        trial: Trial,
        now: datetime,
    ) -> list[dict[str, Any]]:
        """The alert's outbox rows (one per channel), as column values, for a caller that writes
        many at once (the batched routing path: the invitation is new, so none exists yet)."""
        link = self.page_link()
        title = f"{trial.title} ({trial.id})" if trial.title else trial.id
        subject = f"Trial candidate to review: {trial.id}"
        body = (
            "A patient registered with you, or at a site where you recruit, may be eligible for a "
            "clinical trial.\n\n"
            f"Trial: {title}\n"
            f"Site: {site}\n"
            f"Invitation: {invitation_id}\n\n"
            f"Review it here: {link}\n\n"
            "This message contains no patient details; sign in to see who it concerns.\n"
        )
        payload = {
            "invitation": invitation_id,
            "trial": trial.id,
            "site": site,
            "link": link,
            "api": self.invitation_link(invitation_id),
        }
        return self._rows(
            session,
            kind="alert",
            practitioner=practitioner,
            subject=subject,
            body=body,
            payload=payload,
            dedupe=f"alert:{invitation_id}",
            invitation_id=invitation_id,
            now=now,
        )

    def reminder(self, session: Session, invitation: Invitation, now: datetime) -> int:
        link = self.page_link()
        waiting = (now - invitation.state_changed_at).days
        subject = f"Reminder: trial candidate awaiting your review ({invitation.trial_id})"
        body = (
            f"An invitation for trial {invitation.trial_id} has been waiting for your review for "
            f"{waiting} days.\n\n"
            f"Invitation: {invitation.id}\n"
            f"Review it here: {link}\n\n"
            "This message contains no patient details; sign in to see who it concerns.\n"
        )
        payload = {
            "invitation": invitation.id,
            "trial": invitation.trial_id,
            "link": link,
            "api": self.invitation_link(invitation.id),
        }
        return self._enqueue(
            session,
            kind="reminder",
            practitioner=invitation.practitioner,
            subject=subject,
            body=body,
            payload=payload,
            dedupe=f"reminder:{invitation.id}:{invitation.state}:"
            f"{invitation.state_changed_at.isoformat()}",
            invitation_id=invitation.id,
            now=now,
        )

    def digest(
        self,
        session: Session,
        practitioner: str,
        counts: Mapping[str, int],
        day: date,
        now: datetime,
    ) -> int:
        total = sum(counts.values())
        lines = [f"  {state.replace('_', ' ')}: {n}" for state, n in sorted(counts.items())]
        subject = f"Trial recruitment: {total} open invitation(s) ({day.isoformat()})"
        body = (
            f"Your open trial invitations on {day.isoformat()}:\n\n"
            + "\n".join(lines)
            + f"\n\nSee them here: {self.page_link()}\n\n"
            "This message contains no patient details; sign in to see who they concern.\n"
        )
        payload = {
            "day": day.isoformat(),
            "counts": dict(counts),
            "link": self.page_link(),
            "api": self.inbox_link(),
        }
        return self._enqueue(
            session,
            kind="digest",
            practitioner=practitioner,
            subject=subject,
            body=body,
            payload=payload,
            dedupe=f"digest:{practitioner}:{day.isoformat()}",
            invitation_id=None,
            now=now,
        )

    def email_for(self, session: Session, practitioner: str) -> str | None:
        person = session.get(Practitioner, practitioner)
        if person is not None and person.email and not person.retracted:
            return person.email
        role_email = session.scalars(
            sa.select(PractitionerRole.email)
            .where(
                PractitionerRole.practitioner == practitioner,
                PractitionerRole.email.is_not(None),
                PractitionerRole.retracted.is_(False),
                PractitionerRole.active.is_(True),
            )
            .order_by(PractitionerRole.trial_recruiter.desc(), PractitionerRole.key)
        ).first()
        return role_email

    def _enqueue(
        self,
        session: Session,
        *,
        kind: str,
        practitioner: str,
        subject: str,
        body: str,
        payload: dict[str, Any],
        dedupe: str,
        invitation_id: str | None,
        now: datetime,
    ) -> int:
        rows = self._rows(
            session,
            kind=kind,
            practitioner=practitioner,
            subject=subject,
            body=body,
            payload=payload,
            dedupe=dedupe,
            invitation_id=invitation_id,
            now=now,
        )
        return self._store(session, rows, fresh=False)

    @staticmethod
    def _store(session: Session, rows: list[dict[str, Any]], fresh: bool) -> int:
        """Add the rows not queued yet (by dedupe key); how many channels they cover."""
        for row in rows:
            exists = (
                None
                if fresh
                else session.scalar(
                    sa.select(OutboxMessage.id).where(OutboxMessage.dedupe_key == row["dedupe_key"])
                )
            )
            if exists is None:
                session.add(OutboxMessage(**row))
        return len(rows)

    def _rows(
        self,
        session: Session,
        *,
        kind: str,
        practitioner: str,
        subject: str,
        body: str,
        payload: dict[str, Any],
        dedupe: str,
        invitation_id: str | None,
        now: datetime,
    ) -> list[dict[str, Any]]:
        targets: list[tuple[str, str]] = []
        if self.email:
            address = self.email_for(session, practitioner)
            if address:
                targets.append((EMAIL, address))
        if self.webhook:
            targets.append((WEBHOOK, practitioner))
        rows: list[dict[str, Any]] = []
        for channel, recipient in targets:
            message_id = str(uuid.uuid4())
            rows.append(
                {
                    "id": message_id,
                    "kind": kind,
                    "channel": channel,
                    "recipient": recipient,
                    "practitioner": practitioner,
                    "subject": subject,
                    "body": body,
                    "payload": {
                        "schema": SCHEMA,
                        "id": message_id,
                        "kind": kind,
                        "practitioner": practitioner,
                        "subject": subject,
                        "text": body,
                        "created_at": now.isoformat(),
                        **payload,
                    },
                    "dedupe_key": f"{dedupe}:{channel}",
                    "invitation_id": invitation_id,
                    "created_at": now,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "delivered_at": None,
                    "failed_at": None,
                    "last_error": None,
                }
            )
        if not targets:
            log.warning("no notification channel for practitioner %s (%s)", practitioner, kind)
        return rows


# --------------------------------------------------------------------------- channels


@dataclass(frozen=True)
class Notification:
    id: str
    kind: str
    channel: str
    recipient: str
    subject: str
    body: str
    payload: Mapping[str, Any]


class DeliveryError(RuntimeError):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Channel(Protocol):
    def send(self, notification: Notification) -> None:
        """Deliver, or raise :class:`DeliveryError` (``permanent`` when retrying cannot help)."""
        ...


class SmtpChannel:
    """E-mail through an SMTP server (plain, or STARTTLS with optional login)."""

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.starttls = starttls
        self.username = username
        self.password = password
        self.timeout = timeout

    def message(self, notification: Notification) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = notification.recipient
        message["Subject"] = notification.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<{notification.id}@concierge.recruitment>"
        message[ID_HEADER] = notification.id
        message.set_content(notification.body)
        return message

    def send(self, notification: Notification) -> None:
        message = self.message(notification)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls()
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise DeliveryError(
                f"recipient refused ({codes})", permanent=all(c >= 500 for c in codes)
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"SMTP {exc.smtp_code}: {exc.smtp_error!r}", permanent=exc.smtp_code >= 500
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP {type(exc).__name__}: {exc}") from None


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``<timestamp>.<body>``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: bytes,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance_seconds: float = 300.0,
    now: float | None = None,
) -> bool:
    """For receivers: the signature matches and the timestamp is recent (no replays)."""
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_seconds and hmac.compare_digest(
        sign(secret, timestamp, body), signature
    )


class WebhookChannel:
    """POSTs the notification's JSON payload, signed with HMAC-SHA256 (see :func:`sign`)."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.secret = secret
        self.client = client or httpx.Client(timeout=timeout)
        self.clock = clock

    def send(self, notification: Notification) -> None:
        self._post(self.url, notification)

    def _post(self, url: str, notification: Notification) -> None:
        body = json.dumps(notification.payload, sort_keys=True, separators=(",", ":")).encode()
        timestamp = str(int(self.clock()))
        headers = {
            "Content-Type": "application/json",
            ID_HEADER: notification.id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        try:
            response = self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in (408, 425, 429)
        raise DeliveryError(f"webhook answered HTTP {status}", permanent=not retryable)

    def close(self) -> None:
        self.client.close()


class AddressedWebhookChannel(WebhookChannel):
    """A webhook whose URL is each notification's recipient (a regulator's subscription), signed
    with the deployment's webhook secret like every webhook."""

    def __init__(self, secret: bytes, timeout: float = 10.0,
                 client: httpx.Client | None = None) -> None:  # fmt: skip
        super().__init__("", secret, timeout=timeout, client=client)

    def send(self, notification: Notification) -> None:
        self._post(notification.recipient, notification)


@dataclass
class MemoryChannel:
    """Keeps what it is sent; ``fail`` makes the next sends fail, for tests."""

    sent: list[Notification] = field(default_factory=list)
    fail: list[DeliveryError] = field(default_factory=list)

    def send(self, notification: Notification) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.sent.append(notification)


# --------------------------------------------------------------------------- dispatching


@dataclass(frozen=True)
class Backoff:
    base_seconds: float = 30.0
    max_seconds: float = 6 * 3600.0

    def delay(self, attempts: int) -> timedelta:
        """Wait after the ``attempts``-th failed attempt: base, 2 base, 4 base, ... capped."""
        seconds = self.base_seconds * (2 ** max(attempts - 1, 0))
        return timedelta(seconds=min(seconds, self.max_seconds))


@dataclass(frozen=True)
class DispatchReport:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0


OnDelivered = Callable[[Session, OutboxMessage], None]


class Dispatcher:
    """Delivers due outbox rows through their channels; safe to run in several processes."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        channels: Mapping[str, Channel],
        max_attempts: int = 8,
        backoff: Backoff | None = None,
        on_delivered: OnDelivered | None = None,
        clock: Callable[[], datetime] = utcnow,
        lease: timedelta = timedelta(minutes=5),
        batch: int = 100,
    ) -> None:
        self.sessions = sessions
        self.channels = dict(channels)
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.on_delivered = on_delivered
        self.clock = clock
        self.lease = lease
        self.batch = batch

    def run_once(self) -> DispatchReport:
        now = self.clock()
        with self.sessions() as session:
            due = session.execute(
                sa.select(OutboxMessage.id, OutboxMessage.next_attempt_at)
                .where(
                    OutboxMessage.delivered_at.is_(None),
                    OutboxMessage.failed_at.is_(None),
                    OutboxMessage.next_attempt_at <= now,
                )
                .order_by(OutboxMessage.next_attempt_at, OutboxMessage.created_at)
                .limit(self.batch)
            ).all()
        delivered = retrying = failed = 0
        for message_id, seen in due:
            if seen is None:  # pragma: no cover - the query selects due rows only
                continue
            notification = self._claim(message_id, seen, now)
            if notification is None:
                continue  # another dispatcher has it
            outcome = self._deliver(notification)
            if outcome == "delivered":
                delivered += 1
            elif outcome == "retrying":
                retrying += 1
            else:
                failed += 1
        return DispatchReport(delivered, retrying, failed)

    def _claim(self, message_id: str, seen: datetime, now: datetime) -> Notification | None:
        """Take the row for ``lease`` (counting the attempt) unless someone else did first."""
        with self.sessions.begin() as session:
            claimed = session.execute(
                sa.update(OutboxMessage)
                .where(
                    OutboxMessage.id == message_id,
                    OutboxMessage.next_attempt_at == seen,
                    OutboxMessage.delivered_at.is_(None),
                    OutboxMessage.failed_at.is_(None),
                )
                .values(next_attempt_at=now + self.lease, attempts=OutboxMessage.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                return None
            row = session.get(OutboxMessage, message_id)
            assert row is not None
            return Notification(
                id=row.id,
                kind=row.kind,
                channel=row.channel,
                recipient=row.recipient,
                subject=row.subject,
                body=row.body,
                payload=dict(row.payload),
            )

    def _deliver(self, notification: Notification) -> str:
        channel = self.channels.get(notification.channel)
        error: DeliveryError | None = None
        if channel is None:
            error = DeliveryError(f"no {notification.channel} channel configured")
        else:
            try:
                channel.send(notification)
            except DeliveryError as exc:
                error = exc
            except Exception as exc:  # a channel bug must not stop the other deliveries
                log.exception("notification %s: channel raised", notification.id)
                error = DeliveryError(f"{type(exc).__name__}: {exc}")
        now = self.clock()
        with self.sessions.begin() as session:
            row = session.get(OutboxMessage, notification.id, with_for_update=True)
            assert row is not None
            if error is None:
                row.delivered_at = now
                row.last_error = None
                row.next_attempt_at = None
                if self.on_delivered is not None:
                    self.on_delivered(session, row)
                return "delivered"
            row.last_error = str(error)[:2000]
            if error.permanent or row.attempts >= self.max_attempts:
                row.failed_at = now
                row.next_attempt_at = None
                log.warning(
                    "notification %s (%s) failed for good after %d attempt(s): %s",
                    row.id,
                    row.kind,
                    row.attempts,
                    error,
                )
                return "failed"
            row.next_attempt_at = now + self.backoff.delay(row.attempts)
            return "retrying"


__all__ = [
    "EMAIL",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WEBHOOK",
    "Backoff",
    "Channel",
    "DeliveryError",
    "DispatchReport",
    "Dispatcher",
    "MemoryChannel",
    "Notification",
    "OutboxWriter",
    "SmtpChannel",
    "WebhookChannel",
    "sign",
    "verify_signature",
]
