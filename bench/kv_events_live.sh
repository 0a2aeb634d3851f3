#!/usr/bin/env bash
# Exact cache state vs the routers' guesses, live and side by side: switchyard cache_aware and
# marginal_utility with their text tree and with the workers' KV events (`+events`), and both
# peer routers (sglang-router and vllm-router cache_aware, installed here into a venv), each as
# 1 and 4 replicas sharing the traffic (request i to replica i mod N), against the simulated
# fleet. Workers and switchyard tokenize with an HF tokenizer written for the workload (one
# token per generated word, so token counts stay the scenario's).
#
#   bash bench/kv_events_live.sh                  # ~55 min on 2 cores (24 levels)
#   LOADS=1.0 REQUESTS=2000 bash bench/kv_events_live.sh
#
# Each level offers the knee's 120 s window of arrivals (`compare`), so a level takes 2-3 min
# with its drain (2026-12-07, 2 cores: 129 s a level with one replica and 143 s with four at
# 1.2x, 177 s with four at 1.2 / 1.6x); LOADS=1.2,1.6 is about 2 h. Four replicas at 1.6x the
# knee of zipf-prefix are more than 2 cores hold live: the simulated workers stop accepting
# connections in time, the routers' health checks fail and requests get 503 (README).
#
# Results: $OUT/<scenario>-x<replicas>/results.md (default OUT=bench-results/kv-events).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/kv-events}
LOADS=${LOADS:-1.2}
SCENARIOS=${SCENARIOS:-"shared-prefix-large zipf-prefix"}
PEERS_VENV=${PEERS_VENV:-bench/.peers}
ROUTERS=${ROUTERS:-switchyard:cache_aware,switchyard:cache_aware+events,switchyard:marginal_utility,switchyard:marginal_utility+events,sglang-router:cache_aware,vllm-router:cache_aware}
if [ ! -x "$PEERS_VENV/bin/vllm-router" ] || ! "$PEERS_VENV/bin/python" -c 'import sglang_router' 2>/dev/null; then
  echo "setting up the peer routers in $PEERS_VENV (pip install sglang-router vllm-router)" >&2
  { python3 -m venv "$PEERS_VENV" && "$PEERS_VENV/bin/pip" install --quiet sglang-router vllm-router; } \
    || echo "could not install the peer routers; they will be skipped" >&2
fi
cargo build --release --quiet -p switchyard -p switchyard-sim -p switchyard-bench
extra=()
[ -n "${REQUESTS:-}" ] && extra=(--requests "$REQUESTS")
for scenario in $SCENARIOS; do
  for replicas in 1 4; do
    echo "== $scenario, $replicas replica(s)" >&2
    ./target/release/switchyard-bench compare --scenario "bench/scenarios/$scenario.toml" \
      --peers-venv "$PEERS_VENV" --routers "$ROUTERS" --workload-tokenizer --replicas "$replicas" \
      --loads "$LOADS" --out "$OUT/$scenario-x$replicas" "${extra[@]}" > /dev/null
  done
done
for f in "$OUT"/*/results.md; do sed -n '/every run/,/details>$/p' "$f" | grep '^|' ; done
