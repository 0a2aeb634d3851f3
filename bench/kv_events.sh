#!/usr/bin/env bash
# Exact cache state vs the router's guess, in the discrete-event simulation: cache_aware and
# marginal_utility on the prefix-heavy scenarios (shared-prefix-large, Mooncake multi-turn,
# Zipf-popular prefixes larger than one worker's KV), with the router's view of the caches
# being its text tree (the default), its token tree (--tokenizer-path), or the engines' KV
# events (--kv-events-endpoint), behind 1, 2 and 4 router replicas that each see an equal
# share of the traffic. Prints one line per run (goodput, TTFT, hit rate and the ceiling no
# routing can beat: every page ever computed, cached everywhere).
#
#   bash bench/kv_events.sh                  # ~8 min on 2 cores
#   REQUESTS=5000 LOADS=1.0 bash bench/kv_events.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-20000}
LOADS=${LOADS:-1.0,1.2}
SCENARIOS=${SCENARIOS:-"shared-prefix-large multi-turn zipf-prefix"}
cargo build --release -q -p switchyard-bench
for scenario in $SCENARIOS; do
  n=$REQUESTS
  # Mooncake replays its own arrival times scaled to the level's mean rate; past its first few
  # thousand requests they hold bursts no routing absorbs (load_based's p99 TTFT is ~400 s even
  # at a mean of 0.02 req/s over 20,000 requests), so it runs a window of 2,000.
  [ "$scenario" = multi-turn ] && n=${MULTI_TURN_REQUESTS:-2000}
  for replicas in 1 2 4; do
    for view in text tokens events; do
      target/release/switchyard-bench des --scenario "bench/scenarios/$scenario.toml" \
        --policy cache_aware,marginal_utility --load "$LOADS" --requests "$n" \
        --replicas "$replicas" --cache-view "$view" 2>/dev/null | grep -v "worker share"
    done
  done
done
