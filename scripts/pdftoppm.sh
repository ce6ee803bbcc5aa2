#!/usr/bin/env bash
# pdftoppm (poppler-utils, Debian's packages) for the tests that render signal reports' PDFs to
# pictures. Prints its path. Installs it when missing (needs root, as apt does).
set -euo pipefail
say() { echo "pdftoppm.sh: $*" >&2; }
if ! command -v pdftoppm >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    say "pdftoppm is not installed; run as root (or: apt-get install -y poppler-utils)"
    exit 1
  fi
  say "installing poppler-utils from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq poppler-utils >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq poppler-utils >/dev/null
  fi
fi
command -v pdftoppm
