"""``source scripts/bootstrap.sh`` leaves the caller's shell as it was, but for PATH; it installs
the locked environment (``requirements.lock``, refreshed by ``scripts/lock.sh``), again whenever
the lock or the pyproject changes; and the lock pins what the tests run with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from hashlib import sha256
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
LOCK = ROOT / "requirements.lock"


def checkout(tmp_path: Path) -> Path:
    """A checkout with bootstrap.sh, a pyproject and an up-to-date .venv stamp (so nothing is
    installed), and java/mvn stand-ins on PATH."""
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", root / "scripts" / "bootstrap.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "requirements.lock").write_text("x==1 \\\n    --hash=sha256:00\n")
    stamp = sha256(
        (root / "pyproject.toml").read_bytes() + (root / "requirements.lock").read_bytes()
    ).hexdigest()[:16]
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


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A ``python`` whose ``-m venv DIR`` makes a venv whose pip and uv (which that pip
    installs) only record their arguments."""
    log = tmp_path / "pip.log"
    uv = tmp_path / "tools" / "fake-uv"
    uv.write_text(f'#!/bin/sh\necho "uv $*" >> {log}\n')
    pip = tmp_path / "tools" / "fake-pip"
    pip.write_text(
        f'#!/bin/sh\necho "pip $*" >> {log}\n'
        f'case "$*" in *uv==*) cp {uv} "$(dirname "$0")/uv";; esac\n'
    )
    python = tmp_path / "tools" / "fake-python"
    python.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "-m venv" ] || exit 1\n'
        f'mkdir -p "$3/bin" && cp {pip} "$3/bin/pip" && chmod +x "$3/bin/pip"\n'
    )
    for script in (uv, pip, python):
        script.chmod(0o755)
    return python, log


def uv_version(script: str) -> str:
    found = re.search(r"uv(?:==|_version=)(\d+\.\d+\.\d+)", (ROOT / "scripts" / script).read_text())
    assert found, script
    return found.group(1)


def test_a_changed_lock_installs_the_locked_versions_then_the_project(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    python, log = fake_python(tmp_path)
    quiet = run(f"PYTHON={python}; source {root}/scripts/bootstrap.sh; echo status=$?", tmp_path)
    assert "status=0" in quiet.stdout and not log.exists()  # the stamp is current: nothing to do
    (root / "requirements.lock").write_text("x==2 \\\n    --hash=sha256:11\n")
    done = run(f"PYTHON={python}; source {root}/scripts/bootstrap.sh; echo status=$?", tmp_path)
    assert "status=0" in done.stdout, done.stderr
    calls = log.read_text().splitlines()
    # uv (the version lock.sh locks with) installs the locked files, then the project
    version = uv_version("bootstrap.sh")
    assert version == uv_version("lock.sh")
    venv_python = "--python .venv/bin/python"
    assert calls == [
        f"pip install -q --disable-pip-version-check uv=={version}",
        f"uv pip install -q {venv_python} --compile-bytecode --require-hashes --no-deps"
        " -r requirements.lock",
        f"uv pip install -q {venv_python} --no-deps -e .",
    ], calls
    stamps = [p.name for p in (root / ".venv").glob(".installed-*")]
    expected = sha256(b"[project]\nname = 'x'\nx==2 \\\n    --hash=sha256:11\n").hexdigest()[:16]
    assert stamps == [f".installed-{expected}"]


def test_the_lock_command_compiles_the_pyproject_with_hashes(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    shutil.copy(ROOT / "scripts" / "lock.sh", root / "scripts" / "lock.sh")
    uv = tmp_path / "tools" / "fake-uv"
    written = tmp_path / "written.lock"  # what uv would write, a temporary constraint named
    written.write_text("x==1 \\\n    --hash=sha256:00\n    # via -c /tmp/c.txt\n")
    uv.write_text(f'#!/bin/sh\necho "$*" > {tmp_path}/uv.args\ncp {written} requirements.lock\n')
    uv.chmod(0o755)
    done = run(f"UV={uv} bash {root}/scripts/lock.sh --upgrade-package x", tmp_path)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "uv.args").read_text().split()
    assert args[:3] == ["pip", "compile", "pyproject.toml"]
    for flag in ("--generate-hashes", "--universal", "--system-certs", "--upgrade-package"):
        assert flag in args
    assert args[args.index("--extra") + 1] == "dev"
    assert args[args.index("--output-file") + 1] == "requirements.lock"
    # a temporary constraints file is not named in the lock
    assert "/tmp/c.txt" not in (root / "requirements.lock").read_text()


def locked() -> dict[str, tuple[str, str]]:
    """name -> (version, marker) of every pin in requirements.lock."""
    pins: dict[str, tuple[str, str]] = {}
    for line in LOCK.read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]*))?", line)
        if found:
            name, version, marker = found.groups()
            pins[canonicalize_name(name)] = (version, (marker or "").strip())
    return pins


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        wanted += [r for r in extra if not r.startswith("trial-concierge")]
    pins = locked()
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: bash scripts/lock.sh"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (text, pins[name])
    blocks = LOCK.read_text().split("\n")
    pinned_lines = [i for i, line in enumerate(blocks) if re.match(r"^[A-Za-z0-9]", line)]
    assert all("--hash=sha256:" in blocks[i + 1] for i in pinned_lines)


def test_the_tests_run_with_the_locked_versions() -> None:
    """What CI tests is what a fresh machine installs: every locked package that applies here is
    installed at the locked version (a stale .venv fails here; `source scripts/bootstrap.sh`)."""
    from packaging.markers import Marker

    environment: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    wrong = []
    for name, (version, marker) in locked().items():
        if marker and not Marker(marker).evaluate(environment):
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed")
            continue
        if installed != version:
            wrong.append(f"{name}: {installed} installed, {version} locked")
    assert not wrong, wrong
