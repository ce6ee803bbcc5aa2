#!/usr/bin/env bash
# Set up a fresh machine for this project: a virtualenv with the project and its test tools.
# Idempotent and quiet when there is nothing to do. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
for tool in java mvn; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "bootstrap: $tool is missing; installing it from Debian's packages" >&2
    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
  fi
done
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: creating .venv and installing the project (first run takes a minute or two)" >&2
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
