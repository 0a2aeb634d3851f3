#!/usr/bin/env bash
# How much of a DES result is the policies' luck: the same workload and engines (the scenario's
# seed) routed with several seeds for the policies' own random choices (tie-breaks, exploration,
# sampling), then marginal_utility against the best other policy per seed, and the spread.
# Past the knee a different stream of tie-breaks moves some cells by a tenth; one seed's ratio
# there is one draw, not a property of the policy; the geometric mean over the seeds is the
# cell's figure (a tie there with a wide min-max is luck, a min near the max is systematic).
#
#   bash bench/des_seeds.sh                       # 4 scenarios x 3 loads x 4 seeds: ~14 min on 2 cores
#   SCENARIOS=bursty LOADS=1.0 SEEDS="1 2" bash bench/des_seeds.sh   # a quick look
#   DRAW=arrivals SCENARIOS=bursty LOADS=1.0,1.1 SEEDS="1 2 3 4 5 6 7 8" bash bench/des_seeds.sh
#
# DRAW=arrivals varies the scenario's own seed instead (its arrival times and request lengths:
# a copy of the scenario with `seed = N`, its knee bisected anew, the policies' seed fixed).
# Policy seeds keep the arrivals, so they cannot show a cell that depends on one arrival draw
# (bursty at the knee: 0.984 for the scenario's seed 1, geometric mean 1.338 over eight draws).
# Each draw's load 1.0 is then that draw's own knee, bisected anew: the edge load_based just
# holds on that draw. KNEE=<req/s> (the `--knee` figure any `des` run of the scenario prints)
# keeps one offered rate for every draw instead, what a fleet sees from day to day:
#   DRAW=arrivals KNEE=107.803912944308 SCENARIOS=homogeneous LOADS=1.0,1.05 REQUESTS=12937 \
#     SEEDS="$(seq 2 21)" POLICIES=load_based,cache_aware,marginal_utility bash bench/des_seeds.sh
#
# Results: $OUT (default bench-results/des-seeds)/<scenario>/seed-<n>/results.json, or
# arrivals-<n>/ with its scenario copy; the summary is printed, over every seed folder there
# (clear $OUT between runs with different seeds or KNEE).
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIOS=${SCENARIOS:-"bursty tight-tpot zipf-prefix slow-tier"}
LOADS=${LOADS:-1.0,1.4,1.6}
SEEDS=${SEEDS:-"1 2 3 4"}
REQUESTS=${REQUESTS:-20000}
DRAW=${DRAW:-policy}
JOBS=${JOBS:-2}
KNEE=${KNEE:-}
POLICIES=${POLICIES:-random,round_robin,power_of_two,load_based,cache_aware,consistent_hash,marginal_utility}
OUT=${OUT:-bench-results/des-seeds}
case "$DRAW" in
  policy) PREFIX=seed ;;
  arrivals) PREFIX=arrivals ;;
  *) echo "DRAW must be policy or arrivals, not $DRAW" >&2; exit 2 ;;
esac
KNEE_ARG=""
if [ -n "$KNEE" ]; then
  case "$KNEE" in *[!0-9.]*|*.*.*) echo "KNEE is a rate in req/s, not $KNEE" >&2; exit 2 ;; esac
  KNEE_ARG="--knee $KNEE"
fi
cargo build --release --quiet -p switchyard-bench
for scenario in $SCENARIOS; do
  [ -f "bench/scenarios/$scenario.toml" ] || { echo "no scenario bench/scenarios/$scenario.toml" >&2; exit 2; }
  for seed in $SEEDS; do
    case "$seed" in ''|*[!0-9]*) echo "seeds are whole numbers, not $seed" >&2; exit 2 ;; esac
    if [ "$DRAW" = arrivals ]; then
      mkdir -p "$OUT/$scenario/$PREFIX-$seed"
      # The top-level `seed` (before the first table) is the scenario's; add one if it has none.
      awk -v seed="$seed" 'BEGIN { done = 0 }
        !done && /^\[/ { print "seed = " seed; done = 1 }
        !done && /^seed[ \t]*=/ { print "seed = " seed; done = 1; next }
        { print }
        END { if (!done) print "seed = " seed }' "bench/scenarios/$scenario.toml" > "$OUT/$scenario/$PREFIX-$seed/scenario.toml"
    fi
  done
done
for scenario in $SCENARIOS; do
  for seed in $SEEDS; do
    echo "$scenario $seed"
  done
done | xargs -P "$JOBS" -L 1 sh -c '
  dir="'"$OUT"'/$0/'"$PREFIX"'-$1"
  if [ "'"$DRAW"'" = arrivals ]; then scenario="$dir/scenario.toml"; policy_seed=""
  else scenario="bench/scenarios/$0.toml"; policy_seed="--policy-seed $1"; fi
  ./target/release/switchyard-bench des --scenario "$scenario" $policy_seed '"$KNEE_ARG"' --policy "'"$POLICIES"'" \
    --load "'"$LOADS"'" --requests "'"$REQUESTS"'" --out "$dir" >/dev/null 2>&1 \
    || echo "failed: $0 '"$DRAW"' seed $1" >&2'
python3 - "$OUT" "$PREFIX" $SCENARIOS <<'PY'
import glob, json, statistics, sys
root, prefix, scenarios = sys.argv[1], sys.argv[2], sys.argv[3:]
print(f"| scenario | load | {'policy' if prefix == 'seed' else prefix} seeds | marginal_utility / best other: min | median | max | geometric mean | MU goodput min-max (req/s) | best other, per seed (seed: policy goodput) |")
print("|---|---|---|---|---|---|---|---|---|")
for sc in scenarios:
    per_seed = {}
    for f in sorted(glob.glob(f"{root}/{sc}/{prefix}-*/results.json")):
        per_seed[f.split("/")[-2][len(prefix) + 1:]] = json.load(open(f))["runs"]
    loads = sorted({r["load"] for runs in per_seed.values() for r in runs})
    for load in loads:
        ratios, mus, bests = [], [], []
        for seed, runs in sorted(per_seed.items(), key=lambda kv: int(kv[0])):
            at = [r for r in runs if r["load"] == load]
            mu = [r for r in at if r["policy"] == "marginal_utility"]
            others = [r for r in at if not r["policy"].startswith("marginal_utility")]
            if not mu or not others:
                continue
            best = max(others, key=lambda r: r["goodput_rps"])
            ratios.append(mu[0]["goodput_rps"] / max(best["goodput_rps"], 1e-9))
            mus.append(mu[0]["goodput_rps"])
            bests.append(f"{seed}: {best['policy']} {best['goodput_rps']:.1f}")
        if ratios:
            print(f"| {sc} | {load:g} | {len(ratios)} | {min(ratios):.3f} | {statistics.median(ratios):.3f} | "
                  f"{max(ratios):.3f} | {(statistics.geometric_mean(ratios) if min(ratios) > 0 else 0.0):.3f} | {min(mus):.1f}-{max(mus):.1f} | {', '.join(bests)} |")
PY
