#!/usr/bin/env bash
# A real serving benchmark (NVIDIA aiperf) against the simulated fleet through switchyard.
# There is no model hub here, so the tokenizer is a local one built with `tokenizers`
# (bench/make_tokenizer.py); output lengths are taken from the server's usage counts.
# Needs: VENV with `pip install aiperf tokenizers` (default .venv-bench, created here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bench}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
WORKERS=${WORKERS:-2}
REQUESTS=${REQUESTS:-200}
CONCURRENCY=${CONCURRENCY:-8}
if ! "$VENV/bin/python" -c "import aiperf, tokenizers" 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet aiperf tokenizers
fi
OUT=$(mktemp -d)
trap 'kill "$ROUTER" 2>/dev/null || true; rm -rf "$OUT"' EXIT
"$VENV/bin/python" bench/make_tokenizer.py "$OUT/tokenizer" > /dev/null
cargo build --release --quiet --bin switchyard
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/switchyard --port "$PORT" --sim-workers "$WORKERS" --sim-time-scale 10 --policy power_of_two --log-level warn > "$OUT/router.log" 2>&1 &
ROUTER=$!
for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
cd "$OUT"
"$VENV/bin/aiperf" profile --model meta-llama/Llama-3.1-8B-Instruct --url "http://127.0.0.1:$PORT" \
  --endpoint-type chat --streaming --tokenizer "$OUT/tokenizer" --use-server-token-count \
  --request-count "$REQUESTS" --concurrency "$CONCURRENCY" \
  --synthetic-input-tokens-mean 200 --output-tokens-mean 64 --extra-inputs ignore_eos:true 2>&1 \
  | grep -E "Metric|Time to First Token|Inter Token Latency|Request Latency|Output Token Throughput|Request Throughput|Output Sequence Length|━"
echo "(simulated workers run 10x faster than real hardware: multiply latencies by 10 for simulated H100 time)"
