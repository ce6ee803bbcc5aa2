#!/usr/bin/env bash
# A soak: `concierge demo` with its defaults for N minutes (default 60), sampled every ~10 s
# (RSS per process role, /readyz of the API and the worker), then stopped with SIGTERM; writes
# benchmarks/results/soak.json and exits non-zero if any process logged an error or died.
#   bash scripts/soak.sh [--minutes N] [--interval S] [--out FILE] [-- demo options]
# The demo's ports and CONCIERGE_HOME come from the environment as for the demo itself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
exec python -m benchmarks.soak "$@"
