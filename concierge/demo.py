"""``concierge demo``: the whole product, live, on this machine.

Starts the broker (if none answers), creates topics, starts the stream worker, the API, the
recruitment service, a local SMTP server and the regulator dashboard, loads part of a synthetic
population in bulk and then streams the rest in through the FHIR REST endpoint as a source system
would, printing what the stream sees as it goes.

It holds together for as long as it runs: no single bad answer stops it (an error is reported
with its status and problem detail, then the demo backs off and goes on; a 503 is waited out as
its ``Retry-After`` says), it waits for every reader to be ready before asking anything, and
SIGTERM, SIGINT or SIGHUP stop every process it started. The processes it runs, by role, are
written to ``$CONCIERGE_HOME/logs/demo-processes.json`` (the soak script reads it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import Any

import click
import httpx

#: Seconds between two progress lines while the population streams, then while it idles.
REPORT_SECONDS = 5.0
IDLE_REPORT_SECONDS = 15.0
#: Longest back-off after an error, and the longest wait a ``Retry-After`` is honoured for.
MAX_BACKOFF_SECONDS = 30.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """A stop signal arrived (SIGTERM, SIGINT or SIGHUP). A BaseException, as KeyboardInterrupt
    is: the demo's ``except Exception`` around optional reads (invitations, signals) must not
    swallow it (a SIGTERM that arrived in one was shown as 'invitations unavailable (Stopped)'
    and the demo went on running)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


class Children:
    """The processes the demo started, each in a session of its own (so a terminal's Ctrl-C
    reaches only the demo, which stops them in order), stopped together by :meth:`stop`."""

    def __init__(self, registry: Path | None = None) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.registry = registry
        self.extra: dict[str, int] = {}
        #: What :meth:`stop` does last, after every child has exited (stopping the broker the
        #: demo started: the worker and API must not see it go first).
        self.finally_: list[tuple[str, Callable[[], object]]] = []

    def on_stop(self, role: str, action: Callable[[], object]) -> None:
        self.finally_.append((role, action))

    def spawn(
        self, role: str, command: list[str], log_path: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[role] = proc
        self.logs[role] = log_path
        self._write_registry()
        return proc

    def note(self, role: str, pid: int) -> None:
        """A process the demo uses but does not own (the broker), for the registry only."""
        self.extra[role] = pid
        self._write_registry()

    def _write_registry(self) -> None:
        if self.registry is None:
            return
        roles = {
            role: {"pid": proc.pid, "log": str(self.logs[role])}
            for role, proc in self.procs.items()
        }
        for role, pid in self.extra.items():
            roles[role] = {"pid": pid, "log": None, "owned": False}
        document = {"demo": os.getpid(), "roles": roles}
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2))
        tmp.replace(self.registry)

    def dead(self) -> dict[str, int]:
        """Roles whose process has exited, with the exit code."""
        return {
            role: code for role, proc in self.procs.items() if (code := proc.poll()) is not None
        }

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process group, wait up to ``timeout`` s in all, then SIGKILL."""
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for role, action in self.finally_:
            click.echo(f"stopping the {role}")
            try:
                action()
            except Exception as error:  # the rest of the clean-up still runs
                click.echo(f"could not stop the {role}: {error}", err=True)
        if self.registry is not None:
            self.registry.unlink(missing_ok=True)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _problem(response: httpx.Response) -> str:
    """The problem detail of an error answer, whatever its body (JSON or not)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return text[0][:200] if text else response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "title", "message", "error"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value)[:200]
        waiting = body.get("waiting_for")
        if waiting:  # the API gives a list, a single reader (the worker) one reason
            reasons = [waiting] if isinstance(waiting, str) else list(map(str, waiting))
            return "waiting for " + ", ".join(reasons)
    return json.dumps(body)[:200]


def _retry_after(response: httpx.Response, default: float) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return min(MAX_BACKOFF_SECONDS, max(0.5, float(value)))
    except ValueError:
        return default


class Api:
    """HTTP calls that never take the demo down: a failure is reported (status and problem
    detail, or the connection error) and backed off; a 503 is retried after ``Retry-After``."""

    def __init__(
        self,
        echo: Callable[[str], None] = click.echo,
        sleep: Callable[[float], None] = time.sleep,
        client: httpx.Client | None = None,
    ) -> None:
        self.echo = echo
        self.sleep = sleep
        self.client = client or httpx.Client(timeout=30)
        self.backoff = 1.0

    def close(self) -> None:
        self.client.close()

    def call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        wait: float = 60.0,
        ok: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> httpx.Response | None:
        """The response when it is a success (2xx, or a status in ``ok``); None after reporting
        the failure. A 503 (or a connection error) is retried for up to ``wait`` seconds, as
        ``Retry-After`` says; any other error is reported once and backed off."""
        deadline = time.monotonic() + wait
        while True:
            try:
                response = self.client.request(method, url, **kwargs)
            except httpx.HTTPError as exc:
                problem, pause, retry = f"unreachable ({type(exc).__name__}: {exc})", None, True
            else:
                if response.is_success or response.status_code in ok:
                    self.backoff = 1.0
                    return response
                problem = f"{response.status_code}: {_problem(response)}"
                retry = response.status_code == 503
                pause = _retry_after(response, 2.0) if retry else None
            if pause is None:
                pause = self.backoff
                self.backoff = min(MAX_BACKOFF_SECONDS, self.backoff * 2)
            if not retry or time.monotonic() + pause > deadline:
                self.echo(f"        {what}: {problem}; backing off {pause:.0f} s and going on")
                self.sleep(pause)
                return None
            self.echo(f"        {what}: {problem}; retrying in {pause:.0f} s")
            self.sleep(pause)

    def json(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any] | None:
        """Like :meth:`call`, and the body as a JSON object (None, reported, if it is not)."""
        response = self.call(method, url, what, **kwargs)
        if response is None:
            return None
        try:
            body = response.json()
        except ValueError:
            self.echo(f"        {what}: {response.status_code} with a body that is not JSON")
            return None
        return body if isinstance(body, dict) else {"items": body}


def wait_ready(
    name: str,
    base: str,
    fallback: str,
    timeout: float,
    children: Children,
    role: str,
    echo: Callable[[str], None] = click.echo,
    fatal: bool = True,
) -> None:
    """Wait until ``base/readyz`` answers ready, printing what it waits for every few seconds.
    A reader without ``/readyz`` (404) is taken as ready once ``base + fallback`` answers. Past
    ``timeout`` it fails (``fatal``) or says so and returns; a reader that exits always fails."""
    started = time.monotonic()
    deadline = started + timeout
    last_said = ""
    next_say = started
    while True:
        dead = children.dead()
        if role in dead:
            log = children.logs[role]
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise click.ClickException(
                f"the {name} exited ({dead[role]}) while starting; log {log}:\n{tail}"
            )
        said = "not answering yet"
        try:
            response = httpx.get(f"{base}/readyz", timeout=5)
            if response.status_code == 404:
                if httpx.get(f"{base}{fallback}", timeout=5).status_code < 500:
                    echo(f"  {name}: up (it has no /readyz; {fallback} answers)")
                    return
            elif response.status_code == 200:
                echo(f"  {name}: ready after {time.monotonic() - started:.0f} s")
                return
            else:
                said = _problem(response)
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now > deadline:
            message = (
                f"the {name} was not ready within {timeout:.0f} s ({said}); "
                f"see {children.logs.get(role)}"
            )
            if fatal:
                raise click.ClickException(message)
            echo(f"  {message}; going on")
            return
        if said != last_said or now >= next_say:
            echo(f"  {name}: {said} ({now - started:.0f} s)")
            last_said, next_say = said, now + 5
        time.sleep(0.5)


def _headers(
    settings: Any, role: Any, org: str, source_system: str | None = None
) -> dict[str, str]:
    from core.auth import SigningKeys, issue

    token = issue(SigningKeys.from_settings(settings), role, org, source_system=source_system)
    return {"Authorization": f"Bearer {token}"}


def _sponsor_headers(settings: Any) -> dict[str, str]:
    return _headers(settings, "sponsor", "Demo Pharma")


def _example(name: str) -> dict[str, Any]:
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


def _approve_one(api: Api, api_url: str, public_url: str, settings: Any, trial: str) -> bool:
    """A GP approves contact for one candidate the concierge sent them, through the clinician
    API as the clinician page would; prints the GP's page link. True once done."""
    from core.auth import SigningKeys, issue
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
        SigningKeys.from_settings(settings),
        "clinician",
        site,
        subject=f"clinician:{practitioner}",
        practitioner=practitioner,
        sites=(site,),
    )
    body = api.json(
        "POST",
        f"{api_url}/v1/clinician/invitations/{invitation_id}/approve",
        "clinician approval",
        wait=10,
        json={"note": "approved in the demo: I know this patient, please contact them"},
        headers={"Authorization": f"Bearer {token}"},
    )
    if body is None:
        return False
    click.echo(
        f"        clinician: the patient's GP approved contact for invitation {invitation_id} "
        f"(now {body.get('state')}); the GP's page: {public_url}/clinician#token={token}"
    )
    return True


def _signals(api: Api, api_url: str, headers: dict[str, str]) -> str:
    """The strongest device-safety signals, as the regulator API ranks them."""
    body = api.json(
        "GET", f"{api_url}/v1/surveillance/signals", "device signals", wait=0, headers=headers
    )
    if body is None:
        return "unavailable (above)"
    rows = [r for r in body.get("signals", []) if r.get("level") == "model"]
    strong = [r for r in rows if r.get("signal") or r.get("state") != "none"][:3]
    if not strong:
        return f"none signalling ({len(rows)} model/outcome pairs watched)"
    return "; ".join(
        f"{r['node'].split('/')[-1]} / {r['outcome']}: {r['state']}, observed {r['observed']} "
        f"vs expected {r['expected']:.1f}"
        for r in strong
    )


def _show_answer(
    api: Api, api_url: str, headers: dict[str, str], question: dict[str, Any], name: str
) -> bool:
    """Ask the API a question (a 503 while its snapshot catches up is waited out) and print
    the answer. False, reported, if there is none."""
    from concierge.commands.feasibility import render_answer

    body = api.json(
        "POST",
        f"{api_url}/v1/feasibility/ask",
        "feasibility question",
        wait=300,
        json=question,
        headers=headers,
        timeout=60,
    )
    if body is None:
        return False
    click.echo(f"\nA sponsor asks (concierge feasibility ask docs/examples/criteria/{name}):")
    click.echo(render_answer(body, top=5))
    click.echo("")
    return True


def _wait_caught_up(api: Api, api_url: str, headers: dict[str, str], timeout: float) -> None:
    """Wait until the API's snapshot has read the facts topic to its end, with progress."""
    started = time.monotonic()
    next_say = started
    while time.monotonic() < started + timeout:
        status = api.json(
            "GET", f"{api_url}/v1/feasibility/status", "feasibility status", headers=headers
        )
        lag = None if status is None else status.get("lag_messages")
        if lag == 0:
            return
        if time.monotonic() >= next_say:
            click.echo(
                f"  API snapshot: {lag if lag is not None else '?'} facts behind "
                f"({time.monotonic() - started:.0f} s)"
            )
            next_say = time.monotonic() + 5
        time.sleep(0.5)
    click.echo(f"  API snapshot: still behind after {timeout:.0f} s; asking anyway")


def _json(document: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(document)


def _cell(cell: Any) -> str:
    return str(cell.get("display")) if isinstance(cell, dict) else "?"


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
    help="Stop after this many seconds (0: run until Ctrl-C or SIGTERM).",
)
@click.option("--reset", is_flag=True, help="Start from an empty broker and vault.")
def demo(
    patients: int, seed: int, bulk_fraction: float, rate: float, duration: float, reset: bool
) -> None:
    """Run the product live: broker, worker, API and a synthetic population streaming in."""
    from concierge.configuration import load_configuration
    from core.settings import get_settings

    configuration = load_configuration()  # every section checked before anything starts
    if not {"KAFKA_BOOTSTRAP_SERVERS", "CONCIERGE_KAFKA_BOOTSTRAP_SERVERS"} & set(os.environ):
        # the local broker the demo starts, on CONCIERGE_BROKER_PORT, is the one to use
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{configuration.broker.port}"
        get_settings.cache_clear()
    settings = get_settings()
    children = Children(settings.home / "logs" / "demo-processes.json")
    code = supervise(
        children,
        lambda: _run(settings, children, patients, seed, bulk_fraction, rate, duration, reset),
    )
    if code:
        sys.exit(code)


def supervise(children: Children, body: Callable[[], int]) -> int:
    """Run ``body`` (which starts ``children``) so that SIGTERM, SIGINT and SIGHUP, like its
    own end or failure, stop every child; its exit code (0 when stopped by a signal)."""
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    code = 0
    try:
        code = body()
    except Stopped as stop:
        click.echo(f"\nstopping ({stop})")
    except KeyboardInterrupt:
        click.echo("\nstopping")
    finally:
        for s in STOP_SIGNALS:  # a second signal does not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        children.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


#: The demo's one EHR: its reference data is loaded in bulk and its patients stream in through
#: the API, so both must write under this source system (resource keys are ``source|Type|id``).
DEMO_SOURCE = "urn:concierge:demo:ehr"


#: The demo sponsor's query budget per 24 h, unless ``CONCIERGE_DC_QUERY_BUDGET`` is set: the
#: demo reads its saved question's answer every few seconds while patients stream in, and each
#: answer that changed is charged (about 25 a run), so the default 200 would refuse a demo run
#: again within the day without ``--reset`` (an unchanged answer is free).
DEMO_QUERY_BUDGET = "2000"


def demo_environment(home: Path) -> tuple[dict[str, str], str]:
    """The environment of the demo's processes and the source system they all write under
    (``CONCIERGE_SOURCE_SYSTEM`` if set, else :data:`DEMO_SOURCE`). The API's ``/fhir`` resolves
    a Patient's ``Organization/x`` under its own source: under another one than the bulk load's,
    no live patient's site or GP would ever resolve. The query budget is
    :data:`DEMO_QUERY_BUDGET` unless set."""
    source = os.environ.get("CONCIERGE_SOURCE_SYSTEM") or DEMO_SOURCE
    env = {
        "CONCIERGE_DC_QUERY_BUDGET": DEMO_QUERY_BUDGET,
        **os.environ,
        "CONCIERGE_HOME": str(home),
        "CONCIERGE_SOURCE_SYSTEM": source,
    }
    return env, source


def demo_population(patients: int, seed: int, as_of: Any) -> Any:
    """The demo's population: the population's "today" is ``as_of`` (today in the demo, so "in
    the last year" means what it says), and every patient of 55 and over has implants, so the
    faulty hip model's signal shows."""
    from fhir_adapters.synthetic.generator import DENSE_IMPLANT_RATES, GeneratorConfig

    return GeneratorConfig(
        patients=patients, seed=seed, as_of=as_of, implant_rates=DENSE_IMPLANT_RATES
    )


def reset_home(home: Path) -> None:
    """What ``--reset`` removes besides the broker's data: the vault, the databases and the
    worker's local state (Faust's tables and the patient-state checkpoints, made from the topics
    the reset deletes: a worker would refuse them and rebuild from offset 0, loudly). Logs stay."""
    for stale in (
        home / "identity-vault.sqlite",
        home / "recruitment.sqlite",
        home / "feasibility.sqlite",
    ):
        stale.unlink(missing_ok=True)
    shutil.rmtree(home / "worker", ignore_errors=True)


def _run(
    settings: Any,
    children: Children,
    patients: int,
    seed: int,
    bulk_fraction: float,
    rate: float,
    duration: float,
    reset: bool,
) -> int:
    """The demo itself; returns the exit code (1 when a process it started died)."""
    from datetime import date

    from concierge.commands.generate import bundle
    from dashboards.settings import DashboardSettings
    from fhir_adapters.service import build_ingestor
    from fhir_adapters.synthetic.generator import iter_patients, iter_reference_resources, sites
    from infra.broker import BrokerConfig
    from infra.broker import _pid as broker_pid
    from infra.broker import answers as broker_answers
    from infra.settings import BrokerSettings
    from recruitment.settings import get_recruitment_settings

    home = settings.home
    logs = home / "logs"
    env, source_system = demo_environment(home)
    concierge = [sys.executable, "-m", "concierge"]
    started_at = time.monotonic()
    deadline = started_at + duration if duration else None
    local = BrokerConfig.from_settings(home, BrokerSettings())
    # a cluster named by KAFKA_BOOTSTRAP_SERVERS that answers is used as it is
    external = settings.kafka_bootstrap_servers != local.bootstrap and broker_answers(
        settings.kafka_bootstrap_servers
    )
    if reset:
        reset_home(home)
    # a broker the demo starts is stopped when the demo ends; one already running is left alone
    owns_broker = not external and (reset or not broker_answers(local.bootstrap))
    if owns_broker:
        children.on_stop(
            "broker", lambda: subprocess.run([*concierge, "broker", "stop"], env=env, check=False)
        )
    if external:
        click.echo(f"Using the Kafka cluster at {settings.kafka_bootstrap_servers}.")
    elif reset:
        subprocess.run([*concierge, "broker", "stop"], env=env, check=False)
        subprocess.run([*concierge, "broker", "start", "--reset"], env=env, check=True)
    else:
        subprocess.run([*concierge, "broker", "start"], env=env, check=True)
    broker = None if external else broker_pid(local)
    if broker is not None:
        children.note("broker", broker)
    subprocess.run([*concierge, "topics", "create"], env=env, check=True)

    children.spawn("worker", [*concierge, "worker"], logs / "worker.log", env)
    # one process serves everything in the demo: the signal monitor runs inside the API
    # (a cluster runs it as `concierge monitor`, docs/how-to/deploy-cluster.md)
    api_env = {"CONCIERGE_SURVEILLANCE_MONITOR": "true", **env}
    children.spawn("api", [*concierge, "api"], logs / "api.log", api_env)
    # clinicians' alerts go by e-mail to a local SMTP server (aiosmtpd; messages in its log)
    smtp_port = _free_port()
    children.spawn(
        "smtp",
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_port}",
         "-c", "aiosmtpd.handlers.Debugging"],
        logs / "mail.log",
        env,
    )  # fmt: skip
    mail_env = {**env, "CONCIERGE_RECRUITMENT_SMTP_PORT": str(smtp_port),
                "CONCIERGE_RECRUITMENT_DISPATCH_INTERVAL_SECONDS": "2"}  # fmt: skip
    children.spawn(
        "recruitment", [*concierge, "recruitment", "run"], logs / "recruitment.log", mail_env
    )
    # follow-up of enrolled participants (per-trial feeds, safety events); without it the
    # follow-up routes answer 503 "never run", truthfully
    followup_port = _free_port()
    children.spawn(
        "followup",
        [*concierge, "followup", "--status-port", str(followup_port)],
        logs / "followup.log",
        env,
    )
    dashboard_port = DashboardSettings().port
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    children.spawn(
        "dashboard",
        [*concierge, "dashboard", "--port", str(dashboard_port)],
        logs / "dashboard.log",
        env,
    )
    api_url = f"http://{settings.api_host}:{settings.api_port}"
    public_url = get_recruitment_settings().app_base_url.rstrip("/")
    worker_url = settings.worker_address()
    click.echo("Waiting for the API and the stream worker to be ready:")
    # a rerun without --reset reads every earlier fact first: minutes on a big topic
    wait_ready("API", api_url, "/healthz", 900, children, "api")
    wait_ready("stream worker", worker_url, "/health", 900, children, "worker")
    click.echo("\nThe concierge is up:")
    click.echo(f"  API and OpenAPI docs    {api_url}/docs")
    click.echo(f"  readiness               {api_url}/readyz, {worker_url}/readyz")
    click.echo(f"  follow-up service       http://127.0.0.1:{followup_port}/readyz")
    click.echo(f"  FHIR ingest endpoint    {api_url}/fhir")
    click.echo(f"  stream worker state     {worker_url}/state/digest (site admins: bearer token)")
    click.echo(f"  live cohorts (ops)      {worker_url}/state/cohorts (site admins: bearer token)")
    click.echo(
        "                          an admin token: concierge token create --role admin --org ops"
    )
    click.echo(f"  regulator dashboard     {dashboard_url}")
    click.echo(f"  device-safety signals   {api_url}/v1/surveillance/signals (regulator)")
    click.echo(f"  clinician page          {public_url}/clinician (a GP's link is printed below)")
    click.echo(
        f"  sponsor page            {public_url}/sponsor (a sponsor's link is printed below)"
    )
    click.echo(f"  e-mail to clinicians    {logs / 'mail.log'} (a local SMTP server)")
    click.echo(f"  logs                    {logs}")
    click.echo("")

    config = demo_population(patients, seed, date.today())
    ingestor = build_ingestor(settings, source=source_system)
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
    api = Api()
    sponsor = _sponsor_headers(settings)
    # the demo's EHR writes as the bulk load's source system, so its patients' sites resolve
    source = _headers(settings, "source", "Demo EHR", source_system)
    regulator = _headers(settings, "regulator", "Demo Regulator")
    # the worker's state pages are for site admins (the demo runs on the site)
    site_admin = _headers(settings, "admin", "Demo Site")
    # the snapshot behind ad hoc answers catches up with the bulk load first
    wait_ready("API (after the bulk load)", api_url, "/healthz", 300, children, "api", fatal=False)
    _wait_caught_up(api, api_url, sponsor, 300)
    question = _example("t2dm-sglt2.json")
    _show_answer(api, api_url, sponsor, question, "t2dm-sglt2.json")
    recruiting_sites = [s.ods for s in sites(config)[:3]]
    trial = {
        "id": "demo-t2dm-sglt2",
        "title": question["title"],
        "criteria": question,
        "recruiting_sites": recruiting_sites,
        "target": 100,
    }
    registered = api.call(
        "POST",
        f"{api_url}/v1/feasibility/saved-questions",
        "saved question",
        wait=120,
        ok=(409,),
        json=trial,
        headers=sponsor,
    )
    live_url = f"{api_url}/v1/feasibility/saved-questions/{trial['id']}/answer"
    if registered is not None:
        click.echo(
            f"Saved question {trial['id']} "
            f"{'registered' if registered.status_code != 409 else 'already registered'}, "
            f"recruiting at {', '.join(recruiting_sites)}; the stream keeps its cohort live and "
            f"the concierge routes new candidates to their GPs: {live_url}"
        )
        # the sponsor page opens on the saved question: its criteria answered (funnel, sites,
        # profile, impact) and its live count, forecast and site ranking followed
        sponsor_token = sponsor["Authorization"].split(" ", 1)[1]
        click.echo(
            f"  sponsor page            {public_url}/sponsor#saved={trial['id']}&token="
            f"{sponsor_token}"
        )

    reports = 0

    def report(sent: int) -> None:
        nonlocal reports
        reports += 1
        state = api.json(
            "GET", f"{worker_url}/state/digest", "stream worker state", wait=0, headers=site_admin
        )
        live = api.json("GET", live_url, "saved answer", wait=0, headers=sponsor)
        held = (
            f"{state.get('patients')} patients, {state.get('entries')} resources"
            if state is not None
            else "unavailable"
        )
        eligible = _cell(live.get("total")) if live is not None else "unavailable"
        click.echo(
            f"  live: {bulk + sent} patients sent; the stream holds {held}; "
            f"{trial['id']} eligible: {eligible}; invitations: {_invitations(trial['id'])}"
        )
        click.echo(f"        device signals: {_signals(api, api_url, regulator)}")

    def died() -> int:
        dead = children.dead()
        for role, exit_code in dead.items():
            click.echo(f"the {role} exited ({exit_code}); see {children.logs[role]}", err=True)
        return 1 if dead else 0

    sent = 0
    approved = False
    next_report = time.monotonic()
    for record in population:
        if deadline and time.monotonic() > deadline:
            break
        posted = None
        while posted is None:  # the same patient again until the API takes it
            posted = api.call(
                "POST",
                f"{api_url}/fhir",
                "FHIR ingest",
                wait=120,
                content=_json(bundle(record)),
                headers={"Content-Type": "application/fhir+json", **source},
            )
            if posted is None and died():
                return 1
            if deadline and time.monotonic() > deadline:
                break
        if posted is None:
            break
        sent += 1
        time.sleep(1 / rate if rate > 0 else 0)
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + REPORT_SECONDS
            if died():
                return 1
            report(sent)
            if not approved:
                approved = _approve_one(api, api_url, public_url, settings, trial["id"])
    click.echo(f"Population streamed ({bulk + sent} patients).")
    while deadline is None or time.monotonic() < deadline:
        pause = IDLE_REPORT_SECONDS
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        if died():
            return 1
        if deadline is None or time.monotonic() < deadline:
            report(sent)
            if not approved:
                approved = _approve_one(api, api_url, public_url, settings, trial["id"])
    if reports == 0:  # a run whose time ran out before the first report still says where it is
        report(sent)
    api.close()
    return 0
