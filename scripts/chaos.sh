#!/usr/bin/env bash
# The chaos suite on its own: a broker of its own, the worker, the API and the recruitment service,
# SIGKILLed at random under load, checked against a batch fold of the log after every recovery.
#   bash scripts/chaos.sh            # the CI profile: 8 random faults (each kind twice) after the named cases
#   bash scripts/chaos.sh --long     # 50 random faults (about half an hour)
#   CHAOS_SEED=7 CHAOS_FAULTS=20 bash scripts/chaos.sh
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
export CONCIERGE_HOME="${CONCIERGE_HOME:-$root/var/test-home}"
export CI="${CI:-true}"
if [ "${1:-}" = "--long" ]; then
  shift
  export CHAOS_FAULTS="${CHAOS_FAULTS:-50}"
fi
# The suite fetches the broker's jars like every broker start does (cached under CONCIERGE_HOME).
concierge broker fetch >/dev/null
mkdir -p test-artifacts
pytest -p no:cacheprovider tests/chaos -s "$@"
