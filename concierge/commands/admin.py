"""``concierge token`` and ``concierge audit``: API credentials and the audit log."""

from __future__ import annotations

import json

import click

from core.settings import get_settings


@click.group()
def token() -> None:
    """API bearer tokens (OAuth2-style, signed with CONCIERGE_TOKEN_KEY)."""


@token.command("create")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["sponsor", "clinician", "regulator", "source", "admin"]),
)
@click.option("--org", required=True, help="Organisation the holder acts for.")
@click.option("--subject", help="Holder's id (default role:org).")
@click.option("--practitioner", help="Clinicians: their Practitioner reference key.")
@click.option("--site", "sites", multiple=True, help="Clinicians: a site (ODS code); repeatable.")
@click.option("--days", default=30, show_default=True, help="Validity in days.")
def create(
    role: str,
    org: str,
    subject: str | None,
    practitioner: str | None,
    sites: tuple[str, ...],
    days: int,
) -> None:
    """Issue a token and print it (use it as `Authorization: Bearer <token>`)."""
    from core.auth import ROLES, issue

    settings = get_settings()
    key = settings.token_key.get_secret_value().encode()
    assert role in ROLES
    click.echo(issue(key, role, org, subject, practitioner, sites, days * 24 * 3600))  # type: ignore[arg-type]


@click.group()
def audit() -> None:
    """The append-only, hash-chained audit log."""


@audit.command("verify")
def verify() -> None:
    """Walk the hash chain; exit 1 if any record was removed, reordered or altered."""
    from core.audit import AuditLog

    result = AuditLog(get_settings().resolved_audit_url()).verify()
    click.echo(json.dumps(result.__dict__))
    raise SystemExit(0 if result.ok else 1)


@audit.command("tail")
@click.option("-n", default=20, show_default=True)
def tail(n: int) -> None:
    """Print the latest audit records as JSON lines."""
    from core.audit import AuditLog

    records = list(AuditLog(get_settings().resolved_audit_url()).records())[-n:]
    for record in records:
        click.echo(json.dumps(record))
