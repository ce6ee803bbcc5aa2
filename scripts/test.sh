#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, start a real Kafka broker, lint, type-check,
# run every test tier. Extra arguments go to pytest (e.g. scripts/test.sh -k worker).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
export CONCIERGE_HOME="${CONCIERGE_HOME:-$root/var/test-home}"
export CONCIERGE_BROKER_PORT="${CONCIERGE_BROKER_PORT:-19092}"
export CONCIERGE_CONTROLLER_PORT="${CONCIERGE_CONTROLLER_PORT:-19093}"
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$CONCIERGE_BROKER_PORT}"

started_broker=0
if ! concierge broker status --quiet >/dev/null 2>&1; then
  echo "== starting the Kafka broker ($KAFKA_BOOTSTRAP_SERVERS)"
  concierge broker start
  started_broker=1
fi
cleanup() {
  if [ "$started_broker" = 1 ]; then concierge broker stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy concierge fhir_adapters feasibility surveillance_stream infra
echo "== pytest"
mkdir -p test-artifacts
pytest -p no:cacheprovider "$@"
