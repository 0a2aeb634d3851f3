#!/usr/bin/env python3
"""Mid-stream failover, measured (issue #20's benchmark): streams through the router while one
worker of three cuts every stream after a few tokens, with failover off and on, in one run.

    python3 bench/failover.py [--requests 300] [--tokens 64] [--cut-after 16]

Starts `switchyard-sim` (3 workers, one with --die-after-tokens) and `switchyard` from
target/release (build them first: cargo build --release), then for each setting of
--stream-failover-max (0, 1) sends streamed /v1/completions requests 4 at a time and reports:
streams that ended with an error event or without `[DONE]`, and for each stream the longest
gap between two events against its median gap — the time a continuation adds shows as the
excess of the longest gap (p50 / p99 over the streams that were continued, counted from the
router's switchyard_stream_failovers_total). Only the standard library; loopback only.
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on {port}")


def one_stream(port, tokens, prompt):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True})
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    stamps, error, done = [], False, False
    for raw in resp:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        if '"error"' in data:
            error = True
            continue
        stamps.append(time.perf_counter())
    conn.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    excess = (max(gaps) - statistics.median(gaps)) if len(gaps) >= 2 else 0.0
    return {"cut": error or not done, "excess": excess, "events": len(stamps)}


def failovers(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(r'switchyard_stream_failovers_total\{outcome="continued"\} (\d+)', text)
    return int(m.group(1)) if m else 0


def run(setting, sim_ports, args):
    port = free_port()
    router = subprocess.Popen(
        [os.path.join(BIN, "switchyard"), "--port", str(port), "--policy", "round_robin",
         "--worker-urls", *[f"http://127.0.0.1:{p}" for p in sim_ports],
         "--stream-failover-max", str(setting), "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        time.sleep(0.5)  # first health probes
        results, lock = [], threading.Lock()

        def client(c):
            for i in range(c, args.requests, 4):
                r = one_stream(port, args.tokens, f"request {i}: tell me a story")
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        continued = failovers(port)
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(timeout=30)
    cut = sum(r["cut"] for r in results)
    # The continued streams are the ones with the largest excess gap.
    excess = sorted((r["excess"] for r in results if not r["cut"]), reverse=True)[:continued]
    line = f"--stream-failover-max {setting}: {len(results)} streams, {cut} cut or ended by an error event, {continued} continued"
    if excess:
        excess.sort()
        p = lambda q: excess[min(len(excess) - 1, int(q * len(excess)))] * 1e3
        line += f"; time a continuation adds p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms"
    print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cut-after", type=int, default=16)
    parser.add_argument("--time-scale", type=float, default=4.0)
    args = parser.parse_args()
    sims, ports = [], []
    for i in range(3):
        port = free_port()
        cmd = [os.path.join(BIN, "switchyard-sim"), "--workers", "1", "--base-port", str(port),
               "--time-scale", str(args.time_scale), "--seed", str(i)]
        if i == 0:
            cmd += ["--die-after-tokens", str(args.cut_after)]
        sims.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ports.append(port)
    try:
        for p in ports:
            wait_port(p)
        print(f"# 3 simulated workers (time scale {args.time_scale}), one cutting every stream after "
              f"{args.cut_after} tokens; {args.tokens}-token streams, 4 at a time, round_robin", flush=True)
        for setting in (0, 1):
            run(setting, ports, args)
    finally:
        for s in sims:
            s.send_signal(signal.SIGTERM)
            s.wait(timeout=30)


if __name__ == "__main__":
    main()
