#!/usr/bin/env bash
# The public router-vs-router table, in one command: every shipped scenario, every switchyard
# policy and both peer routers (sglang-router and vllm-router, installed here into a venv),
# over each scenario's grid (0.6-1.6 of the knee), each level long enough to be steady state;
# then the README's results table is regenerated from the results.
#
#   bench/public_table.sh            # the whole protocol
#   bench/public_table.sh --quick    # a reduced grid for a quick look (see below)
#
# Wall time on a 2-core machine: the whole protocol is 17 scenarios x 9 routers x 8 levels of
# steady-state runs. Each level's arrivals span at least the 120 s window the knee was found
# on, or 4x the p99 end-to-end latency least-in-flight shows there in the DES where that is
# longer, plus start-up and drain. That is at least 41 h of arrivals, about two days at time
# scale 1 (an estimate from the level lengths, not yet measured end to end).
# --quick is a reduced grid with the same level lengths: 5 scenarios (homogeneous,
# heterogeneous, slow-tier, prefill-heavy, shared-prefix-large), 5 routers (switchyard
# load_based, cache_aware, marginal_utility; sglang-router and vllm-router at their default,
# cache_aware), loads 0.8, 1.0, 1.2, 1.6: at least 3.3 h of arrivals (estimated the same way).
# Measured at these lengths so far, nothing else running: homogeneous 56 min (40 of them
# arrivals), heterogeneous 66 min, shared-prefix-large 47 min, prefill-heavy 54 min, slow-tier
# 80 min (in three runs; its 1.6x level, 14,910 requests at both lengths, 40 of them): 303 min,
# so --quick takes about 5 h.
# Measured before the 120 s floor (levels of 4x the p99 alone, 20-150 s), nothing else running:
# --quick 17 / 30 / 70 / 19 / 11 min, about 2.5 h; through the whole protocol zipf-mixed 71 min,
# bursty 59, multi-turn 98, shared-prefix-large 39. Those levels were too short past the knee:
# at 1.1x least-in-flight kept every request within the SLOs on five scenarios (README,
# "Level length"). The same was true before them of the 1,500-request levels --quick once ran
# (heterogeneous 1.6x: 92.7-99.6 req/s for the balancing routers where steady state gives 17.3-18.9).
# Results go to $OUT (default bench-results/public).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/public}
PEERS_VENV=${PEERS_VENV:-bench/.peers}
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK=1
if [ ! -x "$PEERS_VENV/bin/vllm-router" ] || ! "$PEERS_VENV/bin/python" -c 'import sglang_router' 2>/dev/null; then
  echo "setting up the peer routers in $PEERS_VENV (pip install sglang-router vllm-router)" >&2
  { python3 -m venv "$PEERS_VENV" && "$PEERS_VENV/bin/pip" install --quiet sglang-router vllm-router; } \
    || echo "could not install the peer routers; they will be skipped" >&2
fi
cargo build --release --quiet -p switchyard -p switchyard-sim -p switchyard-bench
started=$(date +%s)
if [ -n "$QUICK" ]; then
  SCENARIOS="homogeneous heterogeneous slow-tier prefill-heavy shared-prefix-large"
  ROUTERS="switchyard:load_based,switchyard:cache_aware,switchyard:marginal_utility,sglang-router:cache_aware,vllm-router:cache_aware"
  EXTRA=(--loads 0.8,1.0,1.2,1.6)
else
  SCENARIOS=$(ls bench/scenarios/*.toml | xargs -n1 basename | sed 's/\.toml$//')
  ROUTERS="switchyard:random,switchyard:round_robin,switchyard:power_of_two,switchyard:load_based,switchyard:cache_aware,switchyard:consistent_hash,switchyard:marginal_utility,sglang-router:cache_aware,vllm-router:cache_aware"
  EXTRA=()
fi
files=()
for sc in $SCENARIOS; do
  echo "== $sc" >&2
  ./target/release/switchyard-bench compare --scenario "bench/scenarios/$sc.toml" --peers-venv "$PEERS_VENV" \
    --routers "$ROUTERS" --out "$OUT/$sc" "${EXTRA[@]}" > /dev/null
  files+=("$OUT/$sc/results.json")
done
./target/release/switchyard-bench table --results "${files[@]}" --splice-into README.md
echo "wall time: $(( ($(date +%s) - started) / 60 )) min" >&2
