"""``concierge feasibility sites ID`` against the whole app in process (``tests/api_world.py``):
the command's HTTP calls go to the app's test client instead of the network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from concierge.cli import main
from tests.api_world import SPONSOR_ORG, TRIAL, build_world


def test_sites_prints_the_ranking_as_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with build_world(tmp_path) as world:
        token = world.headers("sponsor", SPONSOR_ORG)["Authorization"].split()[1]
        calls: list[str] = []

        def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
            path = url.removeprefix("http://api.test")
            calls.append(f"{method} {path}")
            return world.client.request(method, path, json=kwargs.get("json"),
                                        headers=kwargs.get("headers"))  # fmt: skip

        monkeypatch.setattr("concierge.commands.feasibility.httpx.request", request)
        runner = CliRunner()
        args = ["feasibility", "sites", TRIAL, "--api", "http://api.test", "--token", token]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert calls == [f"GET /v1/feasibility/saved-questions/{TRIAL}/sites"]
        lines = result.output.splitlines()
        assert lines[0] == "Type 2 diabetes: site selection"
        assert "   - RA3*       withheld" in result.output  # the recruiting site, unranked
        # one patient: every count of it is withheld, never a number
        assert "eligible now withheld" in lines[1]
        assert "Disclosure control: counts under 10 suppressed" in result.output

        as_json = runner.invoke(main, [*args, "--json"])
        body = json.loads(as_json.output)
        assert body["output"] == "sites" and body["trial"] == TRIAL

        missing = runner.invoke(main, ["feasibility", "sites", "nope", *args[3:]])
        assert missing.exit_code == 1 and "404 Not Found: no saved question nope" in missing.output
