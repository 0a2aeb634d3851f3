#!/usr/bin/env bash
# Routing quality, side by side in one run (shared/design/benchmarks.md §2): every switchyard
# policy and both peer routers against the same simulated fleet and seeded workload.
#
#   bench/compare.sh bench/scenarios/heterogeneous.toml [switchyard-bench compare flags...]
#
# Sets up a Python venv with the peers (pip install sglang-router vllm-router) in
# $PEERS_VENV (default bench/.peers) unless it already has them; a peer that can't be
# installed or started is skipped with a message. Writes results.json, results.md and
# <scenario>.svg under $OUT (default bench-results/<scenario>).
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:?usage: bench/compare.sh SCENARIO.toml [flags...]}
shift
NAME=$(basename "$SCENARIO" .toml)
OUT=${OUT:-bench-results/$NAME}
PEERS_VENV=${PEERS_VENV:-bench/.peers}
if [ ! -x "$PEERS_VENV/bin/vllm-router" ] || ! "$PEERS_VENV/bin/python" -c 'import sglang_router' 2>/dev/null; then
  echo "setting up the peer routers in $PEERS_VENV (pip install sglang-router vllm-router)" >&2
  { python3 -m venv "$PEERS_VENV" && "$PEERS_VENV/bin/pip" install --quiet sglang-router vllm-router; } \
    || echo "could not install the peer routers; they will be skipped" >&2
fi
cargo build --release --quiet -p switchyard -p switchyard-sim -p switchyard-bench
exec ./target/release/switchyard-bench compare --scenario "$SCENARIO" --peers-venv "$PEERS_VENV" --out "$OUT" "$@"
