#!/usr/bin/env bash
# The federated demo: the local broker, three nodes (each `concierge api` with its own topic
# prefix, keys, home and synthetic population: 900, 600 and 300 patients) and a hub
# (`concierge hub serve`); asks the hub one sponsor question and prints the federated answer.
# Options: --scale X (population multiplier), --keep (stay up until Ctrl-C).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
export CONCIERGE_HOME="${CONCIERGE_HOME:-$root/var/demo-home}"
concierge broker start
exec python -m concierge.federated_demo "$@"
