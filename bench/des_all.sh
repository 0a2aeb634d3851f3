#!/usr/bin/env bash
# Every switchyard policy (marginal_utility with each objective and both estimators) on every
# scenario (pd's prefill/decode fleet included), in the discrete-event simulation: the router's
# own policy objects on the simulator's model in virtual time. Deterministic for the scenarios'
# seeds.
#   bench/des_all.sh [requests per load, default 20000]
# OUT=DIR writes elsewhere than bench-results/des and POLICIES=a,b,... runs those only (a
# longer-window check beside the table: `OUT=bench-results/des-long POLICIES=random,round_robin,
# power_of_two,load_based,cache_aware,consistent_hash,marginal_utility MULTI_TURN_REQUESTS=6000
# bench/des_all.sh 60000`, README). REPLICAS=R puts R router replicas in front of the fleet
# (`des --replicas`), CACHE_VIEW=text|tokens|events sets what they see of the caches.
# 20,000 requests per level (the `des` default): past the knee shorter windows are mostly the
# transient before queues reach their steady state, in which a policy that lets every queue
# grow (random) still looks good (zipf-prefix at 1.4x: random 150.9 req/s over 6,000 requests,
# 62.6 over 50,000). Mooncake's trace-timed levels run its 2,000-request knee window (past it
# the trace's bursts saturate every policy). About 50 min on one core.
# Writes $OUT/<scenario>/{results.json,results.md,<scenario>.svg} (OUT default bench-results/des) and prints the
# tables; `python3 bench/mu_vs_best.py bench-results/des` then gives marginal_utility's ratio
# to the best other policy at every load.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
OUT=${OUT:-bench-results/des}
cargo build --release --quiet -p switchyard-bench
POLICIES=${POLICIES:-random,round_robin,power_of_two,load_based,cache_aware,consistent_hash,marginal_utility,marginal_utility/latency,marginal_utility/throughput,marginal_utility/slo/difference}
for f in bench/scenarios/*.toml; do
  name=$(basename "$f" .toml)
  extra=""
  # shed is a marginal_utility mode: only beside it, not in a POLICIES set without it
  [ "$name" = overload ] && [[ ",$POLICIES," == *",marginal_utility,"* ]] && extra=",marginal_utility/shed"
  n=$N
  [ "$name" = multi-turn ] && n=${MULTI_TURN_REQUESTS:-2000}
  ./target/release/switchyard-bench des --scenario "$f" --policy "$POLICIES$extra" --requests "$n" \
    --replicas "${REPLICAS:-1}" --cache-view "${CACHE_VIEW:-text}" --out "$OUT/$name" | sed -n '/^### /,$p'
done
