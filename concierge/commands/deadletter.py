"""``concierge deadletter list|show|replay``: the dead-letter topic, read back and replayed.

See ``docs/how-to/replay-dead-letters.md`` and :mod:`fhir_adapters.deadletters`.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import Any

import click

from core.settings import get_settings


def _letters(reason: str | None, since: str | None) -> list[Any]:
    from confluent_kafka import KafkaException

    from fhir_adapters.deadletters import parse_since, read_letters
    from infra.topics import DEADLETTER

    try:
        moment: datetime | None = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    settings = get_settings()
    try:
        found = list(read_letters(settings.kafka_bootstrap_servers, settings.topic(DEADLETTER)))
    except KafkaException as exc:
        click.echo(f"concierge: cannot read the dead-letter topic: {exc}", err=True)
        raise SystemExit(3) from None
    return [letter for letter in found if letter.matches(reason, moment)]


def _audit(action: str, detail: dict[str, Any]) -> None:
    """Dead letters hold payloads with patient data: reading or replaying them is audited."""
    from core.audit import AuditLog

    AuditLog(get_settings().resolved_audit_url()).append(
        actor=getpass.getuser(), role="operator", org="", action=action, detail=detail
    )


REASON = click.option(
    "--reason",
    default=None,
    help="Only letters with an issue whose code or text contains this (case-insensitive).",
)
SINCE = click.option(
    "--since",
    default=None,
    help="Only letters received since: an ISO 8601 date or date-time, or 30m, 6h, 2d.",
)
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def deadletter() -> None:
    """Dead letters: list them, show one, replay them once the cause is fixed."""


@deadletter.command("list")
@REASON
@SINCE
@AS_JSON
def list_(reason: str | None, since: str | None, as_json: bool) -> None:
    """One line per letter: id (partition:offset), time, resource and the first reason.
    Payloads are not shown (use `show`)."""
    letters = _letters(reason, since)
    if as_json:
        click.echo(json.dumps([letter.summary() for letter in letters], indent=2))
        return
    for letter in letters:
        resource = f"{letter.resource_type}/{letter.resource_id or '?'}"
        click.echo(f"{letter.id:>10}  {letter.received_at}  {resource}  {letter.reason}")
    click.echo(f"{len(letters)} dead letters", err=True)


@deadletter.command()
@click.argument("letter_id")
def show(letter_id: str) -> None:
    """One letter in full, payload included (identifiable: the read is audited)."""
    letters = [letter for letter in _letters(None, None) if letter.id == letter_id]
    if not letters:
        click.echo(f"concierge: no dead letter {letter_id!r} (ids are partition:offset)", err=True)
        raise SystemExit(1)
    _audit("deadletter show", {"letter": letter_id})
    click.echo(json.dumps(letters[0].to_dict(), indent=2))


@deadletter.command()
@REASON
@SINCE
@AS_JSON
def replay(reason: str | None, since: str | None, as_json: bool) -> None:
    """Ingest the letters' payloads again (after fixing the cause), as the source that sent
    them. Idempotent: what is already in the facts is reported 'already present' and not
    published again; what still fails is reported with its reason and not dead-lettered again.

    \b
    Exit status: 0 every letter replayed or already present; 1 some still fail or cannot be
    replayed; 3 the topic could not be read; 2 bad configuration.
    """
    from fhir_adapters.deadletters import replay as replay_letters
    from fhir_adapters.service import build_ingestor

    letters = _letters(reason, since)
    settings = get_settings()
    ingestor = build_ingestor(settings)
    try:
        report = replay_letters(letters, ingestor)
    finally:
        ingestor.vault.close()
    _audit(
        "deadletter replay",
        {"letters": len(letters), "reason": reason, "since": since, **report.counts},
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for row in report.rows:
            resource = f"{row.resource_type}/{row.resource_id or '?'}"
            why = f"  ({row.reason})" if row.reason else ""
            click.echo(f"{row.letter:>10}  {resource}  {row.result}{why}")
        click.echo(", ".join(f"{n} {result}" for result, n in report.counts.items()), err=True)
    failing = report.counts["still failing"] + report.counts["not replayable"]
    if failing:
        raise SystemExit(1)
