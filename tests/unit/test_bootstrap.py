"""``source scripts/bootstrap.sh`` leaves the caller's shell as it was, but for PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from hashlib import sha256
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def checkout(tmp_path: Path) -> Path:
    """A checkout with bootstrap.sh, a pyproject and an up-to-date .venv stamp (so nothing is
    installed), and java/mvn stand-ins on PATH."""
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", root / "scripts" / "bootstrap.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    stamp = sha256((root / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / f".installed-{stamp}").touch()
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("java", "mvn"):
        (tools / tool).write_text("#!/bin/sh\n")
        (tools / tool).chmod(0o755)
    return root


def run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{tmp_path / 'tools'}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_sourcing_keeps_the_callers_options_and_directory(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    done = run(
        f"set +euo pipefail; source {root}/scripts/bootstrap.sh; echo status=$?; "
        "set -o | grep -E '^(errexit|nounset|pipefail)'; pwd; echo PATH=$PATH; "
        "false; echo still-here",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "status=0" in out
    for option in ("errexit", "nounset", "pipefail"):
        assert any(line.split() == [option, "off"] for line in out.splitlines()), out
    assert f"\n{tmp_path}\n" in out  # the caller's directory
    assert f"PATH={root}/.venv/bin:" in out
    assert "still-here" in out  # no errexit left behind


def test_a_caller_with_strict_options_keeps_them(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    done = run(f"set -euo pipefail; source {root}/scripts/bootstrap.sh; set -o", tmp_path)
    assert done.returncode == 0, done.stderr
    for option in ("errexit", "nounset", "pipefail"):
        assert any(line.split() == [option, "on"] for line in done.stdout.splitlines())


def test_a_failure_returns_non_zero_without_closing_the_shell(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    (root / "pyproject.toml").write_text("[project]\nname = 'changed'\n")  # stale stamp
    done = run(
        f"PYTHON=false; source {root}/scripts/bootstrap.sh; echo status=$?",
        tmp_path,
    )
    assert "status=0" not in done.stdout and "status=" in done.stdout
