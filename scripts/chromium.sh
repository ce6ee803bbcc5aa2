#!/usr/bin/env bash
# A real headless browser for page tests: Chromium and its WebDriver from Debian's packages.
# Prints the two paths. Installs them when missing (needs root, as apt does).
set -euo pipefail
say() { echo "chromium.sh: $*" >&2; }
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    say "Chromium is not installed; run as root (or: apt-get install -y chromium chromium-driver)"
    exit 1
  fi
  say "installing chromium and chromium-driver from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
echo "$(command -v chromium) $(command -v chromedriver)"
