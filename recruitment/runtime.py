"""Everything recruitment needs at run time, assembled once from settings.

The consumer, the scheduler, the CLI and the API share one :class:`Runtime`: the database engine
and sessions, the service with its rules, the outbox writer and the dispatcher with its channels.
Tests build one with their own URL, clock and in-memory channels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from .db import check_schema, make_engine, make_read_sessionmaker, make_sessionmaker
from .models import OutboxMessage, utcnow
from .notify import (
    EMAIL,
    SIGNAL_WEBHOOK,
    WEBHOOK,
    AddressedWebhookChannel,
    Backoff,
    Channel,
    Dispatcher,
    OutboxWriter,
    SmtpChannel,
    WebhookChannel,
)
from .rules import Policy
from .service import EligibilityCheck, RecruitmentService
from .settings import RecruitmentSettings, get_recruitment_settings

if TYPE_CHECKING:
    from infra.mirror import ReaderStatus

    from .consumer import RecruitmentConsumer


def policy_from_settings(settings: RecruitmentSettings) -> Policy:
    return Policy(
        cooldown=settings.cooldown, yearly_cap=settings.yearly_cap, cap_window=settings.cap_window
    )


def channels_from_settings(settings: RecruitmentSettings) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    if settings.email_enabled:
        channels[EMAIL] = SmtpChannel(
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_sender,
            starttls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            timeout=settings.smtp_timeout_seconds,
        )
    # regulators' signal webhooks: each to its subscription's URL, signed with the same secret
    channels[SIGNAL_WEBHOOK] = AddressedWebhookChannel(
        settings.webhook_secret.get_secret_value().encode(),
        timeout=settings.webhook_timeout_seconds,
    )
    if settings.webhook_url:
        channels[WEBHOOK] = WebhookChannel(
            settings.webhook_url,
            settings.webhook_secret.get_secret_value().encode(),
            timeout=settings.webhook_timeout_seconds,
        )
    return channels


@dataclass
class Runtime:
    settings: RecruitmentSettings
    engine: sa.Engine
    sessions: sessionmaker[Session]
    service: RecruitmentService
    writer: OutboxWriter
    dispatcher: Dispatcher
    #: the topic consumer, where this process runs one (``concierge recruitment run``)
    consumer: RecruitmentConsumer | None = None

    def readiness(self) -> list[ReaderStatus]:
        """The status of this process's topic readers (none when it runs no consumer)."""
        return [] if self.consumer is None else [self.consumer.readiness()]

    def close(self) -> None:
        for channel in self.dispatcher.channels.values():
            close = getattr(channel, "close", None)
            if callable(close):
                close()
        self.engine.dispose()


def build_runtime(
    settings: RecruitmentSettings | None = None,
    url: str | None = None,
    channels: Mapping[str, Channel] | None = None,
    clock: Callable[[], datetime] = utcnow,
    eligibility: EligibilityCheck | None = None,
    check: bool = True,
) -> Runtime:
    """Assemble the runtime; with ``check``, fail unless the database is migrated."""
    settings = settings or get_recruitment_settings()
    engine = make_engine(url or settings.resolved_url())
    if check:
        check_schema(engine)
    sessions = make_sessionmaker(engine)
    channels = dict(channels) if channels is not None else channels_from_settings(settings)
    writer = OutboxWriter(
        settings.app_base_url, email=EMAIL in channels, webhook=WEBHOOK in channels
    )
    service = RecruitmentService(
        sessions,
        policy=policy_from_settings(settings),
        alerts=writer,
        clock=clock,
        eligibility=eligibility,
        read_sessions=make_read_sessionmaker(engine),
    )

    def on_delivered(session: Session, message: OutboxMessage) -> None:
        if message.kind == "alert" and message.invitation_id:
            service.on_alert_delivered(session, message.invitation_id, message.channel)

    dispatcher = Dispatcher(
        sessions,
        channels,
        max_attempts=settings.max_attempts,
        backoff=Backoff(settings.backoff_seconds, settings.backoff_max_seconds),
        on_delivered=on_delivered,
        clock=clock,
    )
    return Runtime(settings, engine, sessions, service, writer, dispatcher)


__all__ = ["Runtime", "build_runtime", "channels_from_settings", "policy_from_settings"]
