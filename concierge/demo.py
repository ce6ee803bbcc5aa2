"""``concierge demo``: the whole product, live, on this machine.

Starts the broker (if none answers), creates topics, starts the stream worker and the API, loads
part of a synthetic population in bulk and then streams the rest in through the FHIR REST endpoint
as a source system would, printing what the stream sees as it goes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import click
import httpx


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "concierge", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise click.ClickException(f"{url} died during start-up; log {log}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"{url} did not answer within {timeout:.0f} s (see {log})")


@click.command()
@click.option("--patients", default=5000, show_default=True, help="Population size.")
@click.option("--seed", default=42, show_default=True, help="Generator seed.")
@click.option(
    "--bulk-fraction",
    default=0.6,
    show_default=True,
    help="Share of the population loaded in bulk before the live stream starts.",
)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    help="Patients per second streamed live through POST /fhir afterwards.",
)
@click.option(
    "--duration",
    default=0.0,
    show_default=True,
    help="Stop after this many seconds (0: run until Ctrl-C).",
)
@click.option("--reset", is_flag=True, help="Start from an empty broker and vault.")
def demo(
    patients: int, seed: int, bulk_fraction: float, rate: float, duration: float, reset: bool
) -> None:
    """Run the product live: broker, worker, API and a synthetic population streaming in."""
    from concierge.settings import get_settings
    from fhir_adapters.service import build_ingestor
    from fhir_adapters.synthetic.cli import bundle
    from fhir_adapters.synthetic.generator import (
        DENSE_IMPLANT_RATES,
        GeneratorConfig,
        iter_patients,
        iter_reference_resources,
        sites,
    )

    settings = get_settings()
    home = settings.home
    logs = home / "logs"
    env = {**os.environ, "CONCIERGE_HOME": str(home)}
    concierge = [sys.executable, "-m", "concierge"]
    if reset:
        subprocess.run([*concierge, "broker", "stop"], env=env, check=False)
        for stale in (
            home / "identity-vault.sqlite",
            home / "recruitment.sqlite",
            home / "feasibility.sqlite",
        ):
            stale.unlink(missing_ok=True)
        subprocess.run([*concierge, "broker", "start", "--reset"], env=env, check=True)
    else:
        subprocess.run([*concierge, "broker", "start"], env=env, check=True)
    subprocess.run([*concierge, "topics", "create"], env=env, check=True)

    children: list[subprocess.Popen[bytes]] = []
    try:
        worker = _spawn(["worker"], logs / "worker.log", env)
        children.append(worker)
        api = _spawn(["api"], logs / "api.log", env)
        children.append(api)
        # clinicians' alerts go by e-mail to a local SMTP server (aiosmtpd; messages in its log)
        smtp_port = _free_port()
        mail = subprocess.Popen(
            [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_port}",
             "-c", "aiosmtpd.handlers.Debugging"],
            env=env, stdout=(logs / "mail.log").open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        children.append(mail)
        mail_env = {**env, "CONCIERGE_RECRUITMENT_SMTP_PORT": str(smtp_port),
                    "CONCIERGE_RECRUITMENT_DISPATCH_INTERVAL_SECONDS": "2"}  # fmt: skip
        recruiting = _spawn(["recruitment", "run"], logs / "recruitment.log", mail_env)
        children.append(recruiting)
        dashboard_port = int(os.environ.get("CONCIERGE_DASHBOARD_PORT", "8501"))
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        board = _spawn(["dashboard", "--port", str(dashboard_port)], logs / "dashboard.log", env)
        children.append(board)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        worker_url = f"http://127.0.0.1:{settings.worker_web_port}"
        _wait_http(f"{api_url}/healthz", 60, api, logs / "api.log")
        _wait_http(f"{worker_url}/health", 120, worker, logs / "worker.log")
        click.echo("\nThe concierge is up:")
        click.echo(f"  API and OpenAPI docs    {api_url}/docs")
        click.echo(f"  FHIR ingest endpoint    {api_url}/fhir")
        click.echo(f"  stream worker state     {worker_url}/state/digest")
        click.echo(f"  live cohorts (ops)      {worker_url}/state/cohorts")
        click.echo(f"  regulator dashboard     {dashboard_url}")
        click.echo(f"  device-safety signals   {api_url}/v1/surveillance/signals (regulator)")
        click.echo(f"  clinician page          {api_url}/clinician (a GP's link is printed below)")
        click.echo(f"  e-mail to clinicians    {logs / 'mail.log'} (a local SMTP server)")
        click.echo(f"  logs                    {logs}")
        click.echo("")

        from datetime import date

        # the population's "today" is today, so "in the last year" means what it says
        # every patient of 55 and over has implants, so the faulty hip model's signal shows
        config = GeneratorConfig(
            patients=patients,
            seed=seed,
            as_of=date.today(),
            implant_rates=DENSE_IMPLANT_RATES,
        )
        ingestor = build_ingestor(settings, source="urn:concierge:demo:ehr")
        reference = list(iter_reference_resources(config))
        ingestor.ingest_bundle(bundle(reference), "demo:reference")
        population: Iterator[list[dict[str, Any]]] = iter_patients(config)
        bulk = int(patients * bulk_fraction)
        started = time.perf_counter()
        for record in islice(population, bulk):
            ingestor.ingest_bundle(bundle(record), "demo:bulk")
        ingestor.commit()
        ingestor.vault.close()
        click.echo(
            f"Loaded {bulk} patients in bulk ({ingestor.stats.counts['accepted']} "
            f"resources) in {time.perf_counter() - started:.1f} s; streaming the rest "
            f"live at {rate:g} patients/s through POST /fhir."
        )
        sponsor = _sponsor_headers(settings)
        source = _headers(settings, "source", "Demo EHR")
        regulator = _headers(settings, "regulator", "Demo Regulator")
        question = _example("t2dm-sglt2.json")
        _show_answer(api_url, sponsor, question)
        recruiting_sites = [s.ods for s in sites(config)[:3]]
        trial = {
            "id": "demo-t2dm-sglt2",
            "title": question["title"],
            "criteria": question,
            "recruiting_sites": recruiting_sites,
            "target": 100,
        }
        registered = httpx.post(
            f"{api_url}/v1/feasibility/saved-questions", json=trial, headers=sponsor, timeout=30
        )
        click.echo(
            f"Saved question {trial['id']} registered ({registered.status_code}), recruiting at "
            f"{', '.join(recruiting_sites)}; the stream keeps its cohort live and the concierge "
            f"routes new candidates to their GPs: {api_url}/v1/feasibility/saved-questions/"
            f"{trial['id']}/answer"
        )
        deadline = time.monotonic() + duration if duration else None
        sent = 0
        with httpx.Client(base_url=api_url, timeout=30) as client:
            next_report = time.monotonic()
            approved = False
            for record in population:
                if deadline and time.monotonic() > deadline:
                    break
                response = client.post(
                    "/fhir",
                    content=_json(bundle(record)),
                    headers={"Content-Type": "application/fhir+json", **source},
                )
                response.raise_for_status()
                sent += 1
                time.sleep(1 / rate if rate > 0 else 0)
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + 5
                    state = httpx.get(f"{worker_url}/state/digest", timeout=10).json()
                    live = httpx.get(
                        f"{api_url}/v1/feasibility/saved-questions/{trial['id']}/answer",
                        headers=sponsor,
                        timeout=30,
                    ).json()
                    click.echo(
                        f"  live: {bulk + sent} patients sent; the stream holds "
                        f"{state['patients']} patients, {state['entries']} resources; "
                        f"{trial['id']} eligible: {live.get('total', {}).get('display')}; "
                        f"invitations: {_invitations(trial['id'])}"
                    )
                    click.echo(f"        device signals: {_signals(api_url, regulator)}")
                    if not approved:
                        approved = _approve_one(api_url, settings, trial["id"])
        click.echo(f"Population streamed ({bulk + sent} patients).")
        while deadline is None or time.monotonic() < deadline:
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("\nstopping")
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)


def _headers(settings: Any, role: Any, org: str) -> dict[str, str]:
    from concierge.auth import issue

    token = issue(settings.token_key.get_secret_value().encode(), role, org)
    return {"Authorization": f"Bearer {token}"}


def _sponsor_headers(settings: Any) -> dict[str, str]:
    return _headers(settings, "sponsor", "Demo Pharma")


def _example(name: str) -> dict[str, Any]:
    import json

    root = Path(__file__).resolve().parents[1]
    document: dict[str, Any] = json.loads((root / "docs/examples/criteria" / name).read_text())
    return document


def _invitations(trial: str) -> str:
    """Invitations per state for the demo trial, read from the recruitment database (the demo
    runs on the site itself; a sponsor would see these only through disclosure control)."""
    try:
        from recruitment.runtime import build_runtime
        from recruitment.service import counts_by_state

        runtime = build_runtime()
        try:
            with runtime.sessions() as session:
                counts = counts_by_state(session, trial)
        finally:
            runtime.close()
    except Exception as exc:  # the demo goes on; the log says why
        return f"unavailable ({type(exc).__name__})"
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items()) if n) or "none yet"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _approve_one(api_url: str, settings: Any, trial: str) -> bool:
    """A GP approves contact for one candidate the concierge sent them, through the clinician
    API as the clinician page would; prints the GP's page link. True once done."""
    from concierge.auth import issue
    from recruitment.models import Invitation
    from recruitment.runtime import build_runtime

    try:
        runtime = build_runtime()
        try:
            with runtime.sessions() as session:
                invitation = (
                    session.query(Invitation)
                    .filter_by(trial_id=trial, state="sent_to_clinician")
                    .order_by(Invitation.id)
                    .first()
                )
                found = None if invitation is None else (
                    invitation.id, invitation.practitioner, invitation.site)  # fmt: skip
        finally:
            runtime.close()
    except Exception as exc:  # the demo goes on; the log says why
        click.echo(f"        clinician: invitations unavailable ({type(exc).__name__})")
        return False
    if found is None:
        return False
    invitation_id, practitioner, site = found
    token = issue(
        settings.token_key.get_secret_value().encode(),
        "clinician",
        site,
        subject=f"clinician:{practitioner}",
        practitioner=practitioner,
        sites=(site,),
    )
    response = httpx.post(
        f"{api_url}/v1/clinician/invitations/{invitation_id}/approve",
        json={"note": "approved in the demo: I know this patient, please contact them"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    if response.status_code != 200:
        click.echo(f"        clinician: approve failed {response.status_code} {response.text[:99]}")
        return False
    click.echo(
        f"        clinician: the patient's GP approved contact for invitation {invitation_id} "
        f"(now {response.json()['state']}); the GP's page: {api_url}/clinician#token={token}"
    )
    return True


def _signals(api_url: str, headers: dict[str, str]) -> str:
    """The strongest device-safety signals, as the regulator API ranks them."""
    try:
        response = httpx.get(f"{api_url}/v1/surveillance/signals", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        return f"unavailable ({type(exc).__name__})"
    if response.status_code != 200:
        return f"unavailable ({response.status_code}: {response.json().get('detail')})"
    rows = [r for r in response.json()["signals"] if r["level"] == "model"]
    strong = [r for r in rows if r["signal"] or r["state"] != "none"][:3]
    if not strong:
        return f"none signalling ({len(rows)} model/outcome pairs watched)"
    return "; ".join(
        f"{r['node'].split('/')[-1]} / {r['outcome']}: {r['state']}, observed {r['observed']} "
        f"vs expected {r['expected']:.1f}"
        for r in strong
    )


def _show_answer(api_url: str, headers: dict[str, str], question: dict[str, Any]) -> None:
    """Ask the API a question once the snapshot has caught up, and print the answer."""
    from feasibility.cli import render_answer

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = httpx.get(f"{api_url}/v1/feasibility/status", headers=headers, timeout=10)
        if status.status_code == 200 and status.json().get("lag_messages", 1) == 0:
            break
        time.sleep(0.5)
    response = httpx.post(
        f"{api_url}/v1/feasibility/ask", json=question, headers=headers, timeout=60
    )
    if response.status_code != 200:
        click.echo(f"feasibility question failed: {response.status_code} {response.text[:300]}")
        return
    click.echo(
        "\nA sponsor asks (concierge feasibility ask docs/examples/criteria/t2dm-sglt2.json):"
    )
    click.echo(render_answer(response.json(), top=5))
    click.echo("")


def _json(document: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(document)
