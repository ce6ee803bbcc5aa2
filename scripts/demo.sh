#!/usr/bin/env bash
# The demo on a fresh machine: broker, topics, stream worker, API and a synthetic population
# streaming in live. Prints the URLs to open; Ctrl-C (or SIGTERM/SIGHUP) stops everything.
# Options go to `concierge demo` (see `concierge demo --help`), e.g. scripts/demo.sh --patients 5000
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ "${1:-}" == "--federated" ]]; then  # three nodes and a hub: scripts/demo-federated.sh
    shift
    exec bash scripts/demo-federated.sh "$@"
fi
source scripts/bootstrap.sh
export CONCIERGE_HOME="${CONCIERGE_HOME:-$root/var/demo-home}"
# exec: this shell becomes the demo, so every signal sent to this script's pid reaches it
exec concierge demo "$@"
