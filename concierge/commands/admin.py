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
    """The append-only audit log: an HMAC chain in its database, anchored on Kafka."""


@audit.command("verify")
@click.option(
    "--against-anchors",
    is_flag=True,
    help="Also compare the database with every anchor on the anchors topic "
    "(concierge.audit-anchors.v1, with CONCIERGE_TOPIC_PREFIX, at KAFKA_BOOTSTRAP_SERVERS).",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for the broker when reading the anchors.",
)
def verify(against_anchors: bool, timeout: float) -> None:
    """Check the audit log and print what was found (one JSON object on stdout, a summary on
    stderr).

    \b
    The chain: every record present from 1 on, each linked to its predecessor and carrying
    its HMAC under CONCIERGE_AUDIT_KEY (or a key in CONCIERGE_AUDIT_RETIRED_KEYS; records from
    before the chain was keyed: their SHA-256), and the head row naming the last record. This
    finds any change made without the key.

    \b
    With --against-anchors, also each anchor the API published (the chain's head every
    CONCIERGE_AUDIT_ANCHOR_SECONDS): a record whose HMAC is not the anchored one was rewritten
    (even by someone holding the key who rebuilt the chain); an anchored record the database
    no longer has was removed (the newest records cut off). Records after the latest anchor
    are covered by their HMACs only.

    \b
    Exit status: 0 all holds; 1 a problem was found (or there is no anchor to check against);
    3 the anchors could not be read (broker down); 2 bad configuration.
    See docs/explanation/security.md (Audit trail and anchors).
    """
    from core.audit import AuditLog

    settings = get_settings()
    log = AuditLog(settings.resolved_audit_url())
    chain = log.verify()
    out = chain.to_dict()
    ok = chain.ok
    click.echo(
        f"audit chain {chain.chain}: "
        + (
            f"OK, {chain.records} records ({chain.legacy_records} legacy, unkeyed)"
            if chain.ok
            else f"FAILED at record {chain.first_bad_seq}: {chain.reason}"
        ),
        err=True,
    )
    if against_anchors:
        from infra.audit_anchors import (
            AnchorsUnavailable,
            AnchorTopicMissing,
            read_anchors,
            topic_problems,
        )
        from infra.topics import AUDIT_ANCHORS

        topic = settings.topic(AUDIT_ANCHORS)
        bootstrap = settings.kafka_bootstrap_servers
        try:
            try:
                problems = topic_problems(bootstrap, topic, timeout)
                check = log.check_anchors(read_anchors(bootstrap, topic, timeout))
            except AnchorTopicMissing as exc:
                problems = [str(exc)]
                check = log.check_anchors([])
        except AnchorsUnavailable as exc:
            out["anchors"] = {"ok": False, "topic": topic, "error": str(exc)}
            click.echo(json.dumps(out))
            click.echo(f"anchors on {topic}: NOT CHECKED: {exc}", err=True)
            raise SystemExit(3) from None
        anchors = check.to_dict()
        anchors["problems"] = problems + anchors["problems"]
        anchors["ok"] = check.ok and not problems
        anchors["topic"] = topic
        out["anchors"] = anchors
        ok = ok and anchors["ok"]
        if anchors["ok"]:
            latest = check.latest or {}
            click.echo(
                f"anchors on {topic}: OK, {check.anchors} anchors, the latest names record "
                f"{latest.get('seq')} (published {latest.get('published_at')}); "
                f"{check.unanchored_records} records after it",
                err=True,
            )
        else:
            click.echo(f"anchors on {topic}: FAILED", err=True)
            for problem in anchors["problems"]:
                click.echo(f"  - {problem}", err=True)
    out["ok"] = ok
    click.echo(json.dumps(out))
    raise SystemExit(0 if ok else 1)


@audit.command("tail")
@click.option("-n", default=20, show_default=True)
def tail(n: int) -> None:
    """Print the latest audit records as JSON lines."""
    from collections import deque

    from core.audit import AuditLog

    for record in deque(AuditLog(get_settings().resolved_audit_url()).records(), maxlen=n):
        click.echo(json.dumps(record))
