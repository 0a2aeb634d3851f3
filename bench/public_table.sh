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
# steady-state runs - about a day at time scale 1 (each level's arrivals span 4x the p99
# end-to-end latency least-in-flight shows there in the DES, typically 30-60 s, plus start-up and
# drain). --quick is a reduced grid, not shorter levels: 5 scenarios (homogeneous, heterogeneous,
# slow-tier, prefill-heavy, shared-prefix-large), 5 routers (switchyard load_based, cache_aware,
# marginal_utility; sglang-router and vllm-router at their default policy, cache_aware) and loads
# 0.8, 1.0, 1.2, 1.6, each level as long as the whole protocol's. Levels of a fixed 1,500 requests
# (what --quick ran until 2026-12-06) are 9-44 s of arrivals: past the knee no queue has time to
# build and every balancing router looked 5x better than at steady state (heterogeneous 1.6x:
# 92.7-99.6 req/s against 17.3-18.9). Measured 2026-12-06 on 2 cores, nothing else running:
# homogeneous 17, heterogeneous 30, slow-tier 70, prefill-heavy 19, shared-prefix-large 11 min,
# about 2.5 h in all (the past-knee levels' drains are most of it: slow-tier's l4 runs minutes late).
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
