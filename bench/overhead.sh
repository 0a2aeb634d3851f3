#!/usr/bin/env bash
# Router overhead, side by side in one run (shared/design/benchmarks.md §1):
#   direct (a static nginx worker) → nginx reverse proxy → switchyard → sglang-router →
#   vllm-router (peers when installed in $PEERS_VENV), with round_robin on one fixed chat
#   body, then cache_aware on varied prompts (every request a new conversation over 64
#   shared system prompts; the nginx proxy is re-measured on the same varied load).
# wrk, 64 connections, 2 threads, $DURATION seconds each, loopback only.
# SOAK=60 adds a 60 s varied-prompt cache_aware run sampling switchyard's RSS.
# SOAK_MINUTES=10 runs only the memory soak: varied prompts at full rate for that long, for
#   round_robin, cache_aware and marginal_utility, printing the router's RSS every 10 s and the
#   last minute against the first.
# STREAM=1 runs only the streaming check: time to first byte (and to the stream's end, which
#   shows per-event costs) through switchyard against a direct connection to a worker that
#   streams SSE on a fixed schedule (p50/p90/p99); BASELINE too when set.
# BASELINE=/path/to/an/older/switchyard runs that build too, right after this one (before/after
# comparisons of a change in one run).
# Prints requests/s, p50, p99, non-2xx and the proxy's RSS; ratios are against nginx proxy.
#
# Needs: nginx, wrk (apt-get install -y nginx wrk), a release build (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PEERS_VENV=${PEERS_VENV:-}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk: apt-get install -y nginx wrk" >&2; exit 1; }
cargo build --release --quiet --bin switchyard --bin switchyard-bench

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
W1=$(free_port); W2=$(free_port); NP=$(free_port); SY=$(free_port)

BODY='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}'
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$W1; location / { default_type application/json; return 200 '$BODY'; } }
  server { listen 127.0.0.1:$W2; location / { default_type application/json; return 200 '$BODY'; } }
  upstream workers { server 127.0.0.1:$W1; server 127.0.0.1:$W2; keepalive 128; }
  server { listen 127.0.0.1:$NP; location / { proxy_pass http://workers; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGINX
nginx -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!)

cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Write one sentence about trains."}],"max_tokens":32}'
LUA

cat > "$WORK/varied.lua" <<'LUA'
local systems = {}
for g = 1, 64 do systems[g] = string.rep("You are assistant " .. g .. ". Follow the policy document carefully. ", 10) end
local n = 0
request = function()
  n = n + 1
  local body = '{"model":"m","messages":[{"role":"system","content":"' .. systems[(n % 64) + 1] ..
    '"},{"role":"user","content":"question ' .. n .. ' about item ' .. math.random(1, 1000000000) .. '"}],"max_tokens":32}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
LUA

wait_port() { for _ in $(seq 1 "${2:-200}"); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
wait_port "$W1"; wait_port "$NP"


rss_mb() { [ -n "${1:-}" ] && awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "-"; }

printf '%-28s %12s %10s %10s %8s %8s %10s\n' target "req/s" "p50 ms" "p99 ms" non2xx "RSS MB" "vs nginx"
NGINX_RPS=""
SCRIPT=post.lua
run() { # name url pid
  local out rps p50 p99 non2xx
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/$SCRIPT" "$2/v1/chat/completions")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); non2xx=${non2xx:-0}
  ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us/,"",v); printf "%.3f", v/1000 } else if (v ~ /ms$/) { sub(/ms/,"",v); printf "%.3f", v } else if (v ~ /s$/) { sub(/s/,"",v); printf "%.3f", v*1000 } else print v }'; }
  [ "$1" = "nginx proxy" ] && NGINX_RPS=$rps
  local ratio="-"; [ -n "$NGINX_RPS" ] && ratio=$(awk -v a="$rps" -v b="$NGINX_RPS" 'BEGIN{printf "%.2fx", a/b}')
  printf '%-28s %12s %10s %10s %8s %8s %10s\n' "$1" "$rps" "$(ms "$p50")" "$(ms "$p99")" "$non2xx" "$(rss_mb "${3:-}")" "$ratio"
}

start_switchyard() { # policy [binary]
  SY=$(free_port)
  "${2:-./target/release/switchyard}" --port "$SY" --worker-urls "http://127.0.0.1:$W1" "http://127.0.0.1:$W2" --policy "$1" --log-level warn > "$WORK/switchyard.log" 2>&1 & SY_PID=$!; PIDS+=($SY_PID)
  wait_port "$SY"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

peers() { # policy label
  [ -n "$PEERS_VENV" ] && [ -x "$PEERS_VENV/bin/python" ] || return 0
  SG=$(free_port)
  "$PEERS_VENV/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port "$SG" --worker-urls "http://127.0.0.1:$W1" "http://127.0.0.1:$W2" --policy "$1" > "$WORK/sglang.log" 2>&1 & SG_PID=$!; PIDS+=($SG_PID)
  if wait_port "$SG" 1200; then sleep 2; run "sglang-router $1$2" "http://127.0.0.1:$SG" "$SG_PID"; else echo "sglang-router did not start: $(tail -1 "$WORK/sglang.log")"; fi
  stop "$SG_PID"  # both peers default to metrics port 29000
  if [ -x "$PEERS_VENV/bin/vllm-router" ]; then
    VR=$(free_port)
    "$PEERS_VENV/bin/vllm-router" --host 127.0.0.1 --port "$VR" --worker-urls "http://127.0.0.1:$W1" "http://127.0.0.1:$W2" --policy "$1" > "$WORK/vllm.log" 2>&1 & VR_PID=$!; PIDS+=($VR_PID)
    if wait_port "$VR" 1200; then sleep 2; run "vllm-router $1$2" "http://127.0.0.1:$VR" "$VR_PID"; else echo "vllm-router did not start: $(tail -1 "$WORK/vllm.log")"; fi
    stop "$VR_PID"
  fi
}

if [ -n "${STREAM:-}" ]; then
  SW=$(free_port)
  ./target/release/switchyard-bench stream-worker --port "$SW" --chunks 8 --interval-ms 5 & PIDS+=($!)
  wait_port "$SW"
  echo "# streaming: time to first byte, direct vs through switchyard (round_robin), ${STREAM_REQUESTS:-4000} requests, 4 at a time"
  for round in 1 2; do
    ./target/release/switchyard-bench ttfb --url "http://127.0.0.1:$SW" --requests "${STREAM_REQUESTS:-4000}" --label "direct (round $round)"
    SY=$(free_port)
    ./target/release/switchyard --port "$SY" --worker-urls "http://127.0.0.1:$SW" --policy round_robin --log-level warn > "$WORK/switchyard.log" 2>&1 & SY_PID=$!; PIDS+=($SY_PID)
    wait_port "$SY"
    ./target/release/switchyard-bench ttfb --url "http://127.0.0.1:$SY" --requests "${STREAM_REQUESTS:-4000}" --label "switchyard (round $round)"
    kill "$SY_PID" 2>/dev/null || true; wait "$SY_PID" 2>/dev/null || true
    if [ -n "${BASELINE:-}" ]; then
      SY=$(free_port)
      "$BASELINE" --port "$SY" --worker-urls "http://127.0.0.1:$SW" --policy round_robin --log-level warn > "$WORK/baseline.log" 2>&1 & SY_PID=$!; PIDS+=($SY_PID)
      wait_port "$SY"
      ./target/release/switchyard-bench ttfb --url "http://127.0.0.1:$SY" --requests "${STREAM_REQUESTS:-4000}" --label "baseline (round $round)"
      kill "$SY_PID" 2>/dev/null || true; wait "$SY_PID" 2>/dev/null || true
    fi
  done
  exit 0
fi

if [ -n "${SOAK_MINUTES:-}" ]; then
  echo "# memory soak: varied prompts at full rate (wrk -c$CONNS), ${SOAK_MINUTES} min per policy, RSS every 10 s"
  for policy in round_robin cache_aware marginal_utility; do
    SY=$(free_port)
    ./target/release/switchyard --port "$SY" --worker-urls "http://127.0.0.1:$W1" "http://127.0.0.1:$W2" --policy "$policy" --load-check-interval 0 --log-level warn > "$WORK/switchyard.log" 2>&1 & SY_PID=$!; PIDS+=($SY_PID)
    wait_port "$SY"
    secs=$((SOAK_MINUTES * 60))
    wrk -t2 -c"$CONNS" -d"${secs}s" --latency -s "$WORK/varied.lua" "http://127.0.0.1:$SY/v1/chat/completions" > "$WORK/soak.txt" 2>&1 & WRK=$!
    samples=()
    for ((t = 10; t <= secs; t += 10)); do
      sleep 10
      rss=$(rss_mb "$SY_PID"); samples+=("$rss")
      printf '%-18s t=%4ss RSS %6s MB\n' "$policy" "$t" "$rss"
    done
    wait "$WRK" || true
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/soak.txt")
    n=${#samples[@]}; k=$(( n < 6 ? n : 6 ))
    first=$(printf '%s\n' "${samples[@]:0:$k}" | awk '{s+=$1} END {printf "%.1f", s/NR}')
    last=$(printf '%s\n' "${samples[@]:$((n-k)):$k}" | awk '{s+=$1} END {printf "%.1f", s/NR}')
    max=$(printf '%s\n' "${samples[@]}" | sort -n | tail -1)
    echo "$policy: $rps req/s; RSS first minute $first MB, last minute $last MB ($(awk -v a="$last" -v b="$first" 'BEGIN{printf "%+.1f", (a/b-1)*100}') %), max $max MB"
    kill "$SY_PID" 2>/dev/null || true; wait "$SY_PID" 2>/dev/null || true
  done
  exit 0
fi

echo "# round_robin, one fixed chat body"
run "direct (static worker)" "http://127.0.0.1:$W1"
run "nginx proxy" "http://127.0.0.1:$NP"
start_switchyard round_robin
run "switchyard round_robin" "http://127.0.0.1:$SY" "$SY_PID"
stop "$SY_PID"
baseline() { # policy
  [ -n "${BASELINE:-}" ] || return 0
  start_switchyard "$1" "$BASELINE"
  run "baseline $1" "http://127.0.0.1:$SY" "$SY_PID"
  stop "$SY_PID"
}
baseline round_robin
peers round_robin ""

echo "# cache_aware, varied prompts (64 shared system prompts, every request new)"
SCRIPT=varied.lua
NGINX_RPS=""
run "nginx proxy" "http://127.0.0.1:$NP"
start_switchyard cache_aware
run "switchyard cache_aware" "http://127.0.0.1:$SY" "$SY_PID"
if [ -n "${SOAK:-}" ]; then
  before=$(rss_mb "$SY_PID")
  DURATION=$SOAK run "switchyard cache_aware ${SOAK}s soak" "http://127.0.0.1:$SY" "$SY_PID"
  echo "switchyard RSS: ${before} MB before the soak, $(rss_mb "$SY_PID") MB after"
fi
stop "$SY_PID"
baseline cache_aware
peers cache_aware " (varied)"
