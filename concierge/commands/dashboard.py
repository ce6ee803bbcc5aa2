"""``concierge dashboard``: serve the regulator's Streamlit page (``dashboards/regulator.py``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import click

from dashboards.settings import DEFAULT_PORT

#: Validity of a token the dashboard issues itself (as ``concierge token create``'s default).
ISSUED_TOKEN_DAYS = 30


def app_path() -> Path:
    """Where ``dashboards/regulator.py`` is, found without importing it (that loads Streamlit)."""
    spec = importlib.util.find_spec("dashboards.regulator")
    if spec is None or spec.origin is None:
        raise click.ClickException("the dashboards package is not installed with the concierge")
    return Path(spec.origin)


def default_api_url() -> str:
    """The API this configuration serves (loopback for a wildcard bind)."""
    from core.settings import get_settings

    return get_settings().api_address()


def issue_regulator_token(org: str) -> str:
    """A regulator token signed with this site's key, as ``concierge token create`` issues."""
    from core.auth import SigningKeys, issue
    from core.settings import get_settings

    keys = SigningKeys.from_settings(get_settings())
    return issue(keys, "regulator", org, ttl_seconds=ISSUED_TOKEN_DAYS * 24 * 3600)


def streamlit_command(path: Path, port: int, bind: str = "127.0.0.1") -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(path),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        bind,
        "--browser.gatherUsageStats",
        "false",
        # a regulator sees the page, not Streamlit's developer menu (Deploy, Rerun, Stop)
        "--client.toolbarMode",
        "minimal",
    ]


def dashboard_env(
    api_url: str, token: str, refresh: float | None, base: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["CONCIERGE_API_URL"] = api_url
    env["CONCIERGE_DASHBOARD_TOKEN"] = token
    if refresh is not None:
        env["CONCIERGE_DASHBOARD_REFRESH_SECONDS"] = f"{refresh:g}"
    # The script runs as a file, not a module: make sure its package imports from here.
    root = str(app_path().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


@click.command()
@click.option(
    "--port",
    type=int,
    default=None,
    help=f"Port (default CONCIERGE_DASHBOARD_PORT or {DEFAULT_PORT}); it binds "
    "CONCIERGE_DASHBOARD_BIND (127.0.0.1 by default).",
)
@click.option(
    "--api-url",
    default=None,
    help="The regulator API (default CONCIERGE_API_URL, else CONCIERGE_API_HOST/PORT).",
)
@click.option(
    "--token",
    default=None,
    help="A regulator bearer token (default CONCIERGE_DASHBOARD_TOKEN; else one is issued "
    "with this site's CONCIERGE_TOKEN_KEY).",
)
@click.option(
    "--org",
    default="regulator",
    show_default=True,
    help="Organisation named in a token the dashboard issues itself.",
)
@click.option(
    "--refresh",
    type=float,
    default=None,
    help="Seconds between live updates (default CONCIERGE_DASHBOARD_REFRESH_SECONDS or 2).",
)
def dashboard(
    port: int | None, api_url: str | None, token: str | None, org: str, refresh: float | None
) -> None:
    """Serve the regulator's live device-safety dashboard and print its URL.

    It reads /v1/surveillance on the API with a regulator token; stop it with Ctrl-C.
    """
    from concierge.configuration import load_configuration

    if refresh is not None and refresh <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--refresh")
    section = load_configuration().dashboard  # every section checked before serving
    port = port or section.port
    api_url = api_url or section.api
    token = token or (section.token.get_secret_value() if section.token else None)
    token = token or issue_regulator_token(org)
    env = dashboard_env(api_url, token, refresh)
    command = streamlit_command(app_path(), port, section.bind)
    shown = "127.0.0.1" if section.bind in ("0.0.0.0", "::") else section.bind
    click.echo(f"Regulator dashboard: http://{shown}:{port} (reading {api_url})")
    sys.stdout.flush()
    sys.stderr.flush()
    # Become Streamlit, so a signal to this process (Ctrl-C, a supervisor's SIGTERM) reaches it.
    os.execve(sys.executable, command, env)
