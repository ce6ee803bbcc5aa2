"""``concierge hub keygen|register`` and ``concierge concept-map load`` through the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from concierge.cli import main
from core.settings import get_settings
from federation.bunny import ConceptMap
from federation.hub import NodeDirectory

FIXTURE = Path(__file__).resolve().parents[3] / "fixtures" / "omop" / "CONCEPT.csv"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CONCIERGE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_keys_a_node_and_the_concept_map(home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(main, ["hub", "keygen", "--out", str(tmp_path / "keys" / "north")])
    assert made.exit_code == 0, made.output
    paths = json.loads(made.output)
    assert (Path(paths["private"]).stat().st_mode & 0o777) == 0o600
    registered = runner.invoke(
        main,
        ["hub", "register", "north", "--url", "http://north:8000",
         "--public-key", paths["public"], "--controller", "North Trust"],
    )  # fmt: skip
    assert registered.exit_code == 0, registered.output
    nodes = NodeDirectory(home / "hub" / "nodes.json").all()
    assert nodes["north"].url == "http://north:8000"
    bad = runner.invoke(
        main, ["hub", "register", "south", "--url", "ftp://x", "--public-key", paths["public"]]
    )
    assert bad.exit_code == 1 and "http" in bad.output

    loaded = runner.invoke(main, ["concept-map", "load", str(FIXTURE)])
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.output)["concepts"] == 10
    assert ConceptMap.open(home / "omop" / "concepts.json").concepts[8507].code == "M"
    not_athena = tmp_path / "x.csv"
    not_athena.write_text("a\tb\n1\t2\n")
    refused = runner.invoke(main, ["concept-map", "load", str(not_athena)])
    assert refused.exit_code == 1 and "not an Athena CONCEPT.csv" in refused.output
