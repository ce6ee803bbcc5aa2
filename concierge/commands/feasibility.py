"""``concierge feasibility``: ask the running service, check criteria, manage saved questions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import httpx


def _token(token: str | None, org: str) -> str:
    if token:
        return token
    if os.environ.get("CONCIERGE_TOKEN"):
        return os.environ["CONCIERGE_TOKEN"]
    # On the site itself the token key is at hand: issue a short-lived sponsor token.
    from core.auth import SigningKeys, issue
    from core.settings import get_settings

    return issue(SigningKeys.from_settings(get_settings()), "sponsor", org, ttl_seconds=600)


def _api(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    from core.settings import get_settings

    settings = get_settings()
    return f"http://{settings.api_host}:{settings.api_port}"


def _call(method: str, url: str, token: str, body: Any = None) -> Any:
    try:
        response = httpx.request(
            method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(
            f"cannot reach {url}: {exc} (is `concierge api` running?)"
        ) from None
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.text}
        detail = problem.get("detail")
        if isinstance(detail, list):
            detail = "\n  " + "\n  ".join(
                f"{d.get('pointer') or d.get('loc')}: {d.get('msg')}" for d in detail
            )
        raise click.ClickException(
            f"{response.status_code} {problem.get('title', '')}: {detail or ''}".strip()
        )
    return response.json()


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path} is not JSON: {exc}") from None


def _cell(cell: dict[str, Any]) -> str:
    return str(cell.get("display", cell.get("value")))


def render_answer(answer: dict[str, Any], top: int = 15) -> str:
    lines = [answer.get("title") or "Feasibility answer"]
    as_of = answer.get("as_of", {})
    lines.append(
        f"evaluated {answer.get('evaluated_at')} (index {answer.get('index_instant')}); "
        f"data: {as_of.get('envelopes', as_of.get('facts_messages', '?'))} facts, "
        f"lag {as_of.get('lag_messages', 0)}; {answer.get('elapsed_ms')} ms"
    )
    lines.append("")
    lines.append(f"Eligible patients: {_cell(answer['total'])}")
    lines.append("")
    lines.append(f"{'Funnel step':58} {'entered':>8} {'passed':>8} {'failed':>8} {'unknown':>8}")
    skipped = []
    for step in answer.get("funnel", []):
        lines.append(
            f"{step['label'][:58]:58} {_cell(step['entered']):>8} {_cell(step['passed']):>8} "
            f"{_cell(step['failed']):>8} {_cell(step['unknown']):>8}"
        )
        if "unconvertible_results" in step:
            skipped.append(f"{step['label']}: {_cell(step['unconvertible_results'])}")
    if skipped:
        lines.append("")
        lines.append("Results not tested because their unit does not convert to the criterion's:")
        lines += [f"  {line}" for line in skipped]
    lines.append("")
    lines.append(f"{'Region':40} {'eligible':>9}")
    for region, cell in sorted(answer.get("by_region", {}).items()):
        lines.append(f"{region[:40]:40} {_cell(cell):>9}")
    sites = sorted(answer.get("by_site", {}).items(), key=lambda kv: -(kv[1].get("value") or 0))
    lines.append("")
    lines.append(f"{'Site':40} {'eligible':>9}   (top {min(top, len(sites))} of {len(sites)})")
    for site, cell in sites[:top]:
        lines.append(f"{site[:40]:40} {_cell(cell):>9}")
    if answer.get("notes"):  # what cannot all be shown, in words
        lines.append("")
        lines += [f"Withheld: {note}" for note in answer["notes"]]
    lines.append("")
    lines.append("Disclosure control: " + "; ".join(answer.get("rules", [])))
    return "\n".join(lines)


@click.group()
def feasibility() -> None:
    """Feasibility questions for trial sponsors (aggregate counts under disclosure control)."""


_url = click.option("--api", "api", help="API base URL (default from CONCIERGE_API_HOST/PORT).")
_tok = click.option("--token", help="Sponsor bearer token (default $CONCIERGE_TOKEN).")
_org = click.option(
    "--org",
    default="demo-sponsor",
    show_default=True,
    help="Without a token, issue a local sponsor token for this organisation (site key).",
)


@feasibility.command()
@click.argument("criteria", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@_url
@_tok
@_org
def ask(criteria: Path, as_json: bool, api: str | None, token: str | None, org: str) -> None:
    """Ask the running service a question from a criteria JSON file (or a definitional FHIR R5
    Group)."""
    body = _read(criteria)
    route = "ask-group" if body.get("resourceType") == "Group" else "ask"
    answer = _call("POST", f"{_api(api)}/v1/feasibility/{route}", _token(token, org), body)
    click.echo(json.dumps(answer, indent=2) if as_json else render_answer(answer))


@feasibility.command()
@click.argument("criteria", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check(criteria: Path) -> None:
    """Validate a criteria file locally and print it readably (exit 1 when invalid)."""
    from feasibility.criteria import CriteriaError, parse_question
    from feasibility.fhir_group import GroupError, question_from_group
    from feasibility.render import render

    try:
        body = _read(criteria)
        if isinstance(body, dict) and body.get("resourceType") == "Group":
            question = question_from_group(body)
        else:
            question = parse_question(criteria.read_bytes())
    except (CriteriaError, GroupError) as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(render(question))


@feasibility.command()
def schema() -> None:
    """Print the JSON schema of criteria."""
    from feasibility.criteria import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@feasibility.command()
@click.argument("criteria", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--id", "trial_id", required=True, help="Trial slug, e.g. t2dm-sglt2-001.")
@click.option("--title", help="Default: the criteria's title.")
@click.option("--site", "sites", multiple=True, help="Recruiting site (ODS code); repeatable.")
@click.option("--target", type=int, help="Recruitment target.")
@_url
@_tok
@_org
def register(
    criteria: Path,
    trial_id: str,
    title: str | None,
    sites: tuple[str, ...],
    target: int | None,
    api: str | None,
    token: str | None,
    org: str,
) -> None:
    """Register a trial: a saved question kept live."""
    body = _read(criteria)
    trial = {
        "id": trial_id,
        "title": title or body.get("title") or trial_id,
        "criteria": body,
        "recruiting_sites": list(sites),
        "target": target,
    }
    record = _call("POST", f"{_api(api)}/v1/feasibility/saved-questions", _token(token, org), trial)
    click.echo(json.dumps(record, indent=2))


@feasibility.command("answer")
@click.argument("trial_id")
@click.option("--json", "as_json", is_flag=True)
@_url
@_tok
@_org
def live_answer(trial_id: str, as_json: bool, api: str | None, token: str | None, org: str) -> None:
    """The current answer to a saved question."""
    answer = _call(
        "GET",
        f"{_api(api)}/v1/feasibility/saved-questions/{trial_id}/answer",
        _token(token, org),
    )
    click.echo(json.dumps(answer, indent=2) if as_json else render_answer(answer))


@feasibility.command("list")
@_url
@_tok
@_org
def list_saved(api: str | None, token: str | None, org: str) -> None:
    """Your saved questions."""
    for record in _call("GET", f"{_api(api)}/v1/feasibility/saved-questions", _token(token, org)):
        click.echo(f"{record['id']:30} v{record['version']:<3} {record['status']:8} "
                   f"{record['title']}")  # fmt: skip


@feasibility.command()
@click.argument("trial_id")
@_url
@_tok
@_org
def retire(trial_id: str, api: str | None, token: str | None, org: str) -> None:
    """Retire a saved question."""
    record = _call(
        "DELETE", f"{_api(api)}/v1/feasibility/saved-questions/{trial_id}", _token(token, org)
    )
    click.echo(f"{record['id']} retired (version {record['version']})")


def _register_import_atlas() -> None:
    from concierge.commands.atlas import import_atlas

    feasibility.add_command(import_atlas)


_register_import_atlas()


def render_sites(answer: dict[str, Any]) -> str:
    """A site-selection answer as a table: ranked sites first, each cell as published."""

    def shown(cell: dict[str, Any] | None) -> str:
        return "-" if cell is None else _cell(cell)

    target = answer.get("target", {})
    lines = [
        f"{answer.get('title') or answer.get('trial')}: site selection",
        f"evaluated {answer.get('evaluated_at')}; eligible now {_cell(answer['total'])}; "
        f"target {target.get('target') or '-'} (remaining {target.get('remaining') or '-'})",
    ]
    history = answer.get("history", {})
    if history.get("available"):
        lines.append(
            f"arrivals counted since {history.get('baseline')} "
            f"({history.get('window_days')} days)" + (" PARTIAL" if history.get("partial") else "")
        )
    else:
        lines.append(f"no arrival rates: {history.get('reason')}")
    lines.append("")
    lines.append(
        f"{'rank':>4} {'site':10} {'eligible':>8} {'new/30d':>8} {'opt-outs':>8} "
        f"{'limits':>8} {'consent':>8} {'enrol':>8}  target reached (90% interval)"
    )
    for row in answer.get("sites", []):
        projection = row.get("projection") or {}
        if projection.get("forecast"):
            low, high = projection.get("interval") or [None, None]
            when = f"{projection.get('projected_date')} ({low or '?'} to {high or 'later'})"
        else:
            when = str(projection.get("reason", ""))
        site = row["site"] + ("*" if row.get("recruiting") else "")
        lines.append(
            f"{row.get('rank') or '-':>4} {site[:10]:10} {shown(row.get('eligible_now')):>8} "
            f"{shown(row.get('new_per_30_days')):>8} {shown(row.get('lost_to_opt_outs')):>8} "
            f"{shown(row.get('lost_to_limits')):>8} {shown(row.get('consent_rate')):>8} "
            f"{shown(row.get('enrolment_rate')):>8}  {when}"
        )
    forecast = answer.get("trial_forecast", {})
    lines.append("")
    if forecast.get("forecast"):
        low, high = forecast.get("interval") or [None, None]
        lines.append(
            f"Trial ({forecast.get('from')}): target reached about {forecast.get('projected_date')}"
            f" (90% interval {low or '?'} to {high or 'beyond the horizon'})"
        )
    else:
        lines.append(f"Trial: no forecast ({forecast.get('reason')})")
    lines.append("* recruiting site; ranked by " + str(answer.get("ranked_by", "")))
    lines.append("Disclosure control: " + "; ".join(answer.get("rules", [])))
    return "\n".join(lines)


@feasibility.command()
@click.argument("trial_id")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@_url
@_tok
@_org
def sites(trial_id: str, as_json: bool, api: str | None, token: str | None, org: str) -> None:
    """Site selection for a saved question: candidate sites ranked by projected time to the
    trial's target (charged to the query budget like any answer)."""
    answer = _call(
        "GET",
        f"{_api(api)}/v1/feasibility/saved-questions/{trial_id}/sites",
        _token(token, org),
    )
    click.echo(json.dumps(answer, indent=2) if as_json else render_sites(answer))
