#!/usr/bin/env bash
# Every benchmark, one command: set-up, a real broker, each figure beside its same-run baseline.
#   bash benchmarks/run.sh                 # all of them, default sizes
#   bash benchmarks/run.sh --quick         # smaller sizes (minutes, for a smoke run)
#   BENCH_ADHOC_PATIENTS=200000 bash benchmarks/run.sh   # a smaller ad hoc snapshot (building the
#                                          # default 1,000,000 takes ~25 min on 2 cores)
#   BENCH_TILE_COPIES=20 ...               # on a loaded machine: the ad hoc snapshot as 20
#                                          # copies of a 1/20 one (benchmarks/tile_snapshot.py)
#   BENCH_SKIP_INGEST=1 ...                # skip the ingest benchmark (already run)
#   BENCH_SCALING_SIZES=100000,300000 ...  # population sizes of the scaling benchmark
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

quick=0
[ "${1:-}" = "--quick" ] && quick=1
if [ "$quick" = 1 ]; then
  patients_adhoc=100000; patients_stream=5000; probes=60; repeats=1
  cohort_events=2000; invitations=2000; load_seconds=5; sim_null=20; sim_power=10
else
  patients_adhoc=${BENCH_ADHOC_PATIENTS:-1000000}; patients_stream=20000; probes=200; repeats=3
  cohort_events=20000; invitations=10000; load_seconds=20; sim_null=120; sim_power=50
fi

[ -n "${BENCH_SKIP_INGEST:-}" ] || {
echo "== ingest throughput (adapter vs naive fhir.resources pipeline)"
python -m benchmarks.bench_ingest --patients 2000 --repeats "$repeats"
}
echo "== ad hoc feasibility answer over $patients_adhoc patients (engine vs hand-written polars)"
snapshot="$CONCIERGE_HOME/snapshot-$patients_adhoc"
if [ ! -d "$snapshot" ] && [ -n "${BENCH_TILE_COPIES:-}" ]; then
  part=$((patients_adhoc / BENCH_TILE_COPIES))
  [ -d "$CONCIERGE_HOME/snapshot-$part" ] || \
    python -m benchmarks.build_snapshot "$CONCIERGE_HOME/snapshot-$part" --patients "$part" --seed 42
  python -m benchmarks.tile_snapshot "$CONCIERGE_HOME/snapshot-$part" "$snapshot" \
    --copies "$BENCH_TILE_COPIES"
fi
[ -d "$snapshot" ] || python -m benchmarks.build_snapshot "$snapshot" --patients "$patients_adhoc" --seed 42
python -m benchmarks.bench_adhoc "$snapshot" --repeats 30 --at 2026-01-01  # the generator's as-of
echo "== sponsor workspace over $patients_adhoc patients: sites, impact, profile (vs the plain ad hoc answer)"
python -m benchmarks.bench_workspace "$snapshot" --repeats "$((repeats * 13 + 1))" --at 2026-01-01
echo "== stream throughput with 10 live saved questions (worker vs consume-and-decode)"
python -m benchmarks.bench_stream --patients "$patients_stream" --trials 10 --repeats "$repeats"
echo "== live-count freshness at 1k resources/s (API vs Kafka arrival)"
python -m benchmarks.bench_freshness --rate 1000 --probes "$probes"
echo "== stream throughput with device counters on a device-heavy population (worker vs consume-and-decode)"
python -m benchmarks.bench_stream --patients "$patients_stream" --trials 0 --repeats "$repeats" \
  --dense-implants --name stream_devices
echo "== signal freshness at 1k resources/s (AdverseEvent at /fhir to the regulator API vs Kafka arrival)"
python -m benchmarks.bench_signal_freshness --rate 1000 --probes "$probes"
echo "== follow-up safety events at 1k resources/s (serious AdverseEvent at /fhir to the outbox vs Kafka arrival)"
python -m benchmarks.bench_followup --rate 1000 --probes "$probes"
echo "== recruitment: candidates routed/s from $cohort_events cohort events (consumer vs consume-and-decode)"
python -m benchmarks.bench_recruitment --events "$cohort_events"
python -m benchmarks.bench_memory --patients 4000
echo "== terminology: UK-size SNOMED CT release load, concept search p99, ad hoc over a 5,000-code ECL expansion"
if [ "$quick" = 1 ]; then
  python -m benchmarks.bench_terminology --concepts 40000 --is-a-rows 140000 --queries 500 \
    --patients "$patients_adhoc" --repeats 5
else
  python -m benchmarks.bench_terminology --patients "$patients_adhoc"
fi
echo "== clinician API p99, 16 clients over $invitations invitations (clinician endpoints vs /healthz)"
python -m benchmarks.bench_clinician_api --invitations "$invitations" --duration "$load_seconds"
echo "== saved question's live answer p99, 16 sponsor clients (GET .../answer vs /healthz)"
python -m benchmarks.bench_saved_answer --patients "$invitations" --duration "$load_seconds"
echo "== surveillance null/power simulation: tree scan with alpha spending vs per-pair MaxSPRT"
nice -n 10 python -m benchmarks.bench_surveillance_sim \
  --null-replications "$sim_null" --power-replications "$sim_power"
echo "== worker recovery: restart to ready from a local checkpoint vs from offset 0 (100k and 300k patients)"
if [ "$quick" = 1 ]; then
  python -m benchmarks.bench_recovery --patients 20000 --interval 10
else
  python -m benchmarks.bench_recovery --patients 100000 300000
fi
echo "== scale-out: facts/s and CPU-s per fact with 1 and 2 workers in one group on the same topic"
python -m benchmarks.bench_scale_workers --patients "$patients_stream" --repeats "$repeats"
echo "== cost as the population grows: ad hoc answer time and memory, stream state per patient"
if [ "$quick" = 1 ]; then
  python -m benchmarks.bench_scaling --sizes 20000,100000 --stream-sizes 5000,20000 --repeats 5
else
  # snapshots are built once and kept in $CONCIERGE_HOME (3M patients: over an hour)
  python -m benchmarks.bench_scaling --sizes "${BENCH_SCALING_SIZES:-100000,300000,1000000,3000000}"
fi
echo "== summary: every figure, its baseline, ratio and target (also benchmarks/results/summary.md)"
python -m benchmarks.summary
