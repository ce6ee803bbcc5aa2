#!/usr/bin/env bash
# Set up a fresh machine for this project: a virtualenv with the project and its test tools, at
# the versions pinned in requirements.lock.
# Idempotent and quiet when there is nothing to do. Sourced by scripts/test.sh, scripts/demo.sh
# and benchmarks/run.sh, or by hand (`source scripts/bootstrap.sh`): the work runs in a subshell
# with `set -euo pipefail`, so the caller's shell keeps its own options and directory, and a
# failure returns non-zero instead of closing an interactive shell. Only PATH changes: the
# project's .venv/bin comes first.
_concierge_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(
  set -euo pipefail
  cd "$_concierge_root"
  python=${PYTHON:-python3.11}
  command -v "$python" >/dev/null 2>&1 || python=python3
  for tool in java mvn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "bootstrap: $tool is missing; installing it from Debian's packages" >&2
      apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    fi
  done
  # WeasyPrint (the sponsor's PDF reports) loads Pango and a font through fontconfig at run time
  # (grep reads to the end, not -q: under pipefail an early exit would fail the pipe by SIGPIPE
  # and the check would say "missing" on a machine that has them)
  if ! ldconfig -p 2>/dev/null | grep 'libpangoft2-1.0.so.0' >/dev/null || ! fc-list 2>/dev/null | grep . >/dev/null; then
    echo "bootstrap: Pango or fonts are missing (PDF reports need them); installing them from Debian's packages" >&2
    apt-get update -qq && apt-get install -y -qq libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core fontconfig >/dev/null
  fi
  # The versions installed are requirements.lock's (every dependency pinned, with hashes;
  # `bash scripts/lock.sh` refreshes it), so a fresh machine gets what CI tested. A change to the
  # lock or to pyproject.toml changes the stamp, and the next run installs again.
  stamp=.venv/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    echo "bootstrap: creating .venv and installing the locked environment (first run takes a minute or two)" >&2
    "$python" -m venv .venv
    # uv installs the same locked files (hashes checked) in seconds where pip took two minutes
    # of every CI run; the version scripts/lock.sh locks with. --compile-bytecode, as pip does:
    # compiled at import instead, a dependency's SyntaxWarning (pysbd) became an error under
    # pytest's filterwarnings = error and failed every test that loads the note rules
    .venv/bin/pip install -q --disable-pip-version-check uv==0.13.9
    # --no-deps: the lock already holds every dependency, some chosen by an override that pip's
    # resolver would refuse (scripts/lock-overrides.txt)
    .venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode --require-hashes --no-deps -r requirements.lock
    # the project itself, editable, with nothing more: its dependencies are all in the lock
    .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
)
_concierge_status=$?
if [ "$_concierge_status" = 0 ]; then
  export PATH="$_concierge_root/.venv/bin:$PATH"
fi
unset _concierge_root
# `return` when sourced, `exit` when run as a script
return "$_concierge_status" 2>/dev/null || exit "$_concierge_status"
