"""A real, independent client against the simulator and through the router.

Starts `switchyard --sim-workers 2` (port 0), then drives it with the OpenAI Python SDK,
unchanged: chat, completions, streaming with usage, and prefix-cache hits. Reports TTFT and
inter-token latency as a client measures them. Then starts a router serving HTTPS with a
certificate from a throwaway CA (trustme) and drives that through the SDK too. Prints
'N passed, M failed' and exits non-zero on any failure.

Usage: python tests/clients/openai_sdk.py path/to/switchyard
"""

import faulthandler
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

import openai
from procs import stop

TIME_SCALE = 10.0


def start_router(binary, count=2, extra=()):
    proc = subprocess.Popen(
        [binary, "--sim-workers", str(count), "--sim-time-scale", str(TIME_SCALE), "--port", "0", "--log-level", "warn", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    router, workers = None, []
    deadline = time.time() + 60
    for line in proc.stdout:
        m = re.match(r"switchyard listening on (https?://\S+)", line)
        if m:
            router = m.group(1)
        m = re.match(r"\s+(http://127\.0\.0\.1:\d+)$", line)
        if m:
            workers.append(m.group(1))
        if line.startswith("try:") or time.time() > deadline:
            break
    if router is None or len(workers) != count:
        proc.kill()
        raise SystemExit(f"router did not start (router={router}, workers={workers})")
    return proc, router, workers


def tls_checks(binary, check):
    """A router serving HTTPS (--tls-cert-path/--tls-key-path) with a certificate from a
    throwaway CA: the SDK reaches it when it trusts the CA, and not otherwise."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{name}.pem") for name in ("ca", "cert", "key")}
        ca.cert_pem.write_to_path(paths["ca"])
        issued.cert_chain_pems[0].write_to_path(paths["cert"])
        issued.private_key_pem.write_to_path(paths["key"])
        proc, router, _ = start_router(binary, 1, ["--tls-cert-path", paths["cert"], "--tls-key-path", paths["key"]])
        try:
            # The SDK's own HTTP client class (httpx2 in newer SDKs, httpx in older ones).
            client_class = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient
            trusting = client_class(verify=ssl.create_default_context(cafile=paths["ca"]))
            client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=30, http_client=trusting)

            def https_url():
                assert router.startswith("https://"), router

            def chat():
                r = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True}
                )
                assert r.usage.completion_tokens == 4, r.usage

            def stream():
                s = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
                    extra_body={"ignore_eos": True},
                )
                pieces = [c.choices[0].delta.content for c in s if c.choices and c.choices[0].delta.content]
                assert len(pieces) == 8, pieces

            def untrusted():
                other = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=10)
                try:
                    other.models.list()
                except openai.APIConnectionError:
                    return
                raise AssertionError("a client that does not trust the CA got an answer")

            for name, fn in (("https url", https_url), ("chat", chat), ("stream", stream), ("untrusted client refused", untrusted)):
                check(f"tls: {name}", fn)
        finally:
            code = stop(proc)

            def exits_cleanly():
                assert code == 0, code

            check("tls: router exits 0 on SIGTERM", exits_cleanly)


def main():
    # Nothing here may hang CI: past this the stacks are printed and the script exits non-zero.
    faulthandler.dump_traceback_later(600, exit=True)
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
        code = stop(proc)
        if code != 0:
            failed += 1
            print(f"FAIL router exit status after SIGTERM: {code}")
        else:
            passed += 1
            print("ok   router exits 0 on SIGTERM")
    tls_checks(binary, check)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
