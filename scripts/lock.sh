#!/usr/bin/env bash
# Refresh requirements.lock, the pinned environment scripts/bootstrap.sh installs (and so CI
# tests with), from pyproject.toml's dependencies and the dev extra.
#
#   bash scripts/lock.sh                          # after changing pyproject.toml: pins that are
#                                                 # already in the lock stay, new ones are added
#   bash scripts/lock.sh --upgrade-package NAME   # move one package to its newest allowed version
#   bash scripts/lock.sh --upgrade                # move everything (then run the tests)
#   bash scripts/lock.sh -c constraints.txt       # keep versions to those of an environment
#                                                 # (e.g. `pip freeze` of a venv CI tested)
#
# Arguments go to `uv pip compile`. The lock is universal (markers for every platform) and holds
# a hash for every file, so exactly what was locked is installed (bootstrap installs it with the
# same uv version, which it puts into the project's .venv). uv here is the command given by $UV,
# else `uv` on PATH, else the one in the project's .venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
uv_version=0.13.9
uv=${UV:-}
if [ -z "$uv" ] && command -v uv >/dev/null 2>&1; then
  uv=uv
fi
if [ -z "$uv" ]; then
  source scripts/bootstrap.sh
  if [ ! -x .venv/bin/uv ]; then
    echo "lock: installing uv $uv_version into .venv" >&2
    .venv/bin/pip install -q "uv==$uv_version"
  fi
  uv=.venv/bin/uv
fi
# --system-certs: trust the machine's certificate store, as pip does here, not only uv's bundle
"$uv" pip compile pyproject.toml \
  --system-certs \
  --extra dev \
  --universal \
  --python-version 3.11 \
  --generate-hashes \
  --quiet \
  --custom-compile-command "bash scripts/lock.sh" \
  --override scripts/lock-overrides.txt \
  --output-file requirements.lock \
  "$@"
# A constraints file given with -c is a means, not a reason: keep its (often temporary) path out
# of the lock's "via" notes.
sed -i -e '/^    #   -c /d' -e 's/^    # via -c .*/    # via (constraints)/' requirements.lock
echo "lock: requirements.lock written; \`source scripts/bootstrap.sh\` installs it" >&2
