"""``concierge token`` and ``concierge audit``: API credentials and the audit log."""

from __future__ import annotations

import json

import click

from core.roles import ROLES
from core.settings import get_settings


@click.group()
def token() -> None:
    """API bearer tokens: issue, revoke, list revocations (keys: CONCIERGE_TOKEN_KEYS or
    CONCIERGE_TOKEN_KEY)."""


@token.command("create")
@click.option(
    "--role",
    required=True,
    type=click.Choice(ROLES),
)
@click.option("--org", required=True, help="Organisation the holder acts for.")
@click.option("--subject", help="Holder's id (default role:org).")
@click.option("--practitioner", help="Clinicians: their Practitioner reference key.")
@click.option("--site", "sites", multiple=True, help="Clinicians: a site (ODS code); repeatable.")
@click.option(
    "--source-system",
    help="Sources (required): the source system whose resources the holder writes and "
    "retracts, e.g. the CONCIERGE_SOURCE_SYSTEM its files are ingested under.",
)
@click.option(
    "--trial",
    "trials",
    multiple=True,
    help="Trial team roles (required): a trial the holder serves; repeatable.",
)
@click.option("--days", default=30, show_default=True, help="Validity in days.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the token with its jti, kid and expiry."
)
def create(
    role: str,
    org: str,
    subject: str | None,
    practitioner: str | None,
    sites: tuple[str, ...],
    source_system: str | None,
    trials: tuple[str, ...],
    days: int,
    as_json: bool,
) -> None:
    """Issue a token, signed with the current key (CONCIERGE_TOKEN_KEY_ID), and print it (use
    it as `Authorization: Bearer <token>`)."""
    from core.auth import ROLES, SigningKeys, TokenError, issue

    if role == "source" and not source_system:
        raise click.UsageError(
            "a source token names its source system: --source-system URI (a source writes and "
            "retracts only its own source system's resources)"
        )
    if role != "source" and source_system:
        raise click.UsageError("--source-system is for source tokens only")
    if days < 1:
        raise click.UsageError("--days must be at least 1")
    keys = SigningKeys.from_settings(get_settings())
    assert role in ROLES
    try:
        issued = issue(
            keys,
            role,  # type: ignore[arg-type]
            org,
            subject,
            practitioner,
            sites,
            days * 24 * 3600,
            source_system=source_system,
            trials=trials,
        )
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    if not as_json:
        click.echo(issued)
        return
    import jwt

    claims = jwt.decode(issued, options={"verify_signature": False})
    click.echo(
        json.dumps(
            {
                "token": issued,
                "jti": claims["jti"],
                "kid": jwt.get_unverified_header(issued)["kid"],
                "exp": claims["exp"],
            }
        )
    )


@token.command("revoke")
@click.argument("token_or_jti")
@click.option("--reason", default="", help="Why (kept with the revocation).")
def revoke(token_or_jti: str, reason: str) -> None:
    """Revoke a token by its id (jti) or the token itself: every API process refuses it from
    its next request on. Prints the revocation as JSON."""
    import getpass

    from core.revocation import MAX_JTI, RevocationList

    jti, expires = _jti_of(token_or_jti)
    if not jti or len(jti) > MAX_JTI:
        raise click.UsageError(f"a token id is 1 to {MAX_JTI} characters")
    settings = get_settings()
    revocations = RevocationList(settings.resolved_token_revocation_url())
    try:
        entry = revocations.revoke(jti, reason, f"cli:{getpass.getuser()}", expires)
    finally:
        revocations.close()
    click.echo(json.dumps(entry.__dict__))


def _jti_of(token_or_jti: str) -> tuple[str, int | None]:
    """The jti (and expiry) of a token, or the argument itself when it is a jti. A token is
    read without checking its signature: revoking it needs only its id."""
    if token_or_jti.count(".") != 2:
        return token_or_jti.strip(), None
    import jwt

    try:
        claims = jwt.decode(token_or_jti, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise click.UsageError("that is neither a token id nor a readable token") from None
    jti, exp = claims.get("jti"), claims.get("exp")
    if not isinstance(jti, str):
        raise click.UsageError("the token has no jti: it cannot be revoked by id")
    return jti, exp if isinstance(exp, int) else None


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_revoked(as_json: bool) -> None:
    """The revocation list: every revoked token id, when, by whom and why."""
    from core.revocation import RevocationList

    revocations = RevocationList(get_settings().resolved_token_revocation_url())
    try:
        entries = revocations.entries()
    finally:
        revocations.close()
    for entry in entries:
        if as_json:
            click.echo(json.dumps(entry.__dict__))
        else:
            expires = "?" if entry.expires_at is None else str(entry.expires_at)
            click.echo(
                f"{entry.jti}  revoked {entry.revoked_at} by {entry.revoked_by or '?'}  "
                f"expires {expires}  {entry.reason}"
            )
    if not entries and not as_json:
        click.echo("no token is revoked")


@token.command("prune")
def prune() -> None:
    """Forget revocations of tokens that have expired (they are refused as expired anyway)."""
    import time

    from core.revocation import RevocationList

    settings = get_settings()
    revocations = RevocationList(settings.resolved_token_revocation_url())
    try:
        # past the expiry plus the clock skew the API allows, a token is refused anyway
        forgotten = revocations.prune(int(time.time() - settings.token_leeway_seconds))
    finally:
        revocations.close()
    click.echo(json.dumps({"forgotten": forgotten}))


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
