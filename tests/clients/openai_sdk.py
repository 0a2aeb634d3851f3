"""A real, independent client against the simulator and through the router.

Starts `switchyard --sim-workers 2` (port 0), then drives it with the OpenAI Python SDK,
unchanged: chat, completions, streaming with usage, and prefix-cache hits. Reports TTFT and
inter-token latency as a client measures them. Prints 'N passed, M failed' and exits non-zero
on any failure.

Usage: python tests/clients/openai_sdk.py path/to/switchyard
"""

import re
import statistics
import subprocess
import sys
import time

import openai

TIME_SCALE = 10.0


def start_router(binary):
    proc = subprocess.Popen(
        [binary, "--sim-workers", "2", "--sim-time-scale", str(TIME_SCALE), "--port", "0", "--log-level", "warn"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    router, workers = None, []
    deadline = time.time() + 60
    for line in proc.stdout:
        m = re.match(r"switchyard listening on (http://\S+)", line)
        if m:
            router = m.group(1)
        m = re.match(r"\s+(http://127\.0\.0\.1:\d+)$", line)
        if m:
            workers.append(m.group(1))
        if line.startswith("try:") or time.time() > deadline:
            break
    if router is None or len(workers) != 2:
        proc.kill()
        raise SystemExit(f"router did not start (router={router}, workers={workers})")
    return proc, router, workers


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/switchyard"
    proc, router, workers = start_router(binary)
    passed, failed = 0, 0

    def check(name, fn):
        nonlocal passed, failed
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failed += 1
            print(f"FAIL {name}: {e!r}")

    try:
        for label, base in (("router", router), ("worker", workers[0])):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)

            def chat():
                r = client.chat.completions.create(
                    model="meta-llama/Llama-3.1-8B-Instruct",
                    messages=[{"role": "user", "content": "Say something."}],
                    max_tokens=12,
                    extra_body={"ignore_eos": True},
                )
                assert r.choices[0].message.role == "assistant"
                assert r.usage.completion_tokens == 12, r.usage
                assert r.choices[0].finish_reason == "length"

            def completion():
                r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
                assert r.usage.completion_tokens == 5 and len(r.choices[0].text.split()) == 5, r

            def stream():
                ttfts, itls = [], []
                for _ in range(5):
                    start = time.perf_counter()
                    arrivals, usage = [], None
                    s = client.chat.completions.create(
                        model="m",
                        messages=[{"role": "user", "content": "Count to sixty-four."}],
                        max_tokens=64,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True},
                    )
                    for chunk in s:
                        if chunk.usage is not None:
                            usage = chunk.usage
                        if chunk.choices and chunk.choices[0].delta.content:
                            arrivals.append(time.perf_counter())
                    assert len(arrivals) == 64, len(arrivals)
                    assert usage is not None and usage.completion_tokens == 64, usage
                    ttfts.append((arrivals[0] - start) * 1e3)
                    itls.extend((b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:]))
                itls.sort()
                print(
                    f"     {label}: TTFT median {statistics.median(ttfts):.1f} ms, ITL mean {statistics.mean(itls):.2f} ms, "
                    f"p99 {itls[int(0.99 * len(itls))]:.2f} ms over 5 streams of 64 tokens "
                    f"(time scale {TIME_SCALE:g}x: simulated ITL mean {statistics.mean(itls) * TIME_SCALE:.1f} ms)"
                )

            def cached():
                system = "You are a careful assistant who answers briefly. " * 30
                seen = []
                for q in ("first?", "second?"):
                    r = client.chat.completions.create(
                        model="m",
                        messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
                        max_tokens=2,
                    )
                    details = r.usage.prompt_tokens_details
                    seen.append(details.cached_tokens if details else 0)
                # Through the router (round robin over 2 workers) the second request may land
                # on the other worker; a third always meets a warm cache on one of them.
                if label == "router" and seen[1] == 0:
                    r = client.chat.completions.create(
                        model="m",
                        messages=[{"role": "system", "content": system}, {"role": "user", "content": "third?"}],
                        max_tokens=2,
                    )
                    seen.append(r.usage.prompt_tokens_details.cached_tokens)
                assert max(seen[1:]) > 300, seen

            def bad_request():
                try:
                    client.chat.completions.create(model="m", messages=[], max_tokens=2)
                except openai.BadRequestError as e:
                    assert e.status_code == 400
                else:
                    raise AssertionError("empty messages accepted")

            for name, fn in (("chat", chat), ("completion", completion), ("stream", stream), ("cached prefix", cached), ("400", bad_request)):
                check(f"{label}: {name}", fn)
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        if code != 0:
            failed += 1
            print(f"FAIL router exit status after SIGTERM: {code}")
        else:
            passed += 1
            print("ok   router exits 0 on SIGTERM")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
