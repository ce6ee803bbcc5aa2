#!/usr/bin/env bash
# Every benchmark, one command: set-up, a real broker, each figure beside its same-run baseline.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
export CONCIERGE_HOME="${CONCIERGE_HOME:-$root/var/bench-home}"
export CONCIERGE_BROKER_PORT="${CONCIERGE_BROKER_PORT:-29092}"
export CONCIERGE_CONTROLLER_PORT="${CONCIERGE_CONTROLLER_PORT:-29093}"
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$CONCIERGE_BROKER_PORT}"
started=0
if ! concierge broker status --quiet >/dev/null 2>&1; then concierge broker start; started=1; fi
trap '[ "$started" = 1 ] && concierge broker stop >/dev/null 2>&1 || true' EXIT
python -m benchmarks.bench_ingest "$@"
