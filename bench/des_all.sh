#!/usr/bin/env bash
# Every switchyard policy (marginal_utility with each objective and both estimators) on every
# regular-mode scenario, in the discrete-event simulation: the router's own policy objects on
# the simulator's model in virtual time. Deterministic for the scenarios' seeds.
#   bench/des_all.sh [requests per load, default 6000]
# Writes bench-results/des/<scenario>/{results.json,results.md,<scenario>.svg} and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-6000}
cargo build --release --quiet -p switchyard-bench
POLICIES=random,round_robin,power_of_two,load_based,cache_aware,consistent_hash,marginal_utility,marginal_utility/latency,marginal_utility/throughput,marginal_utility/slo/difference
for f in bench/scenarios/*.toml; do
  name=$(basename "$f" .toml)
  [ "$name" = pd ] && continue   # the DES runs regular fleets only; pd is measured live
  extra=""
  [ "$name" = overload ] && extra=",marginal_utility/shed"
  ./target/release/switchyard-bench des --scenario "$f" --policy "$POLICIES$extra" --requests "$N" \
    --out "bench-results/des/$name" | sed -n '/^### /,$p'
done
