"""The pip-installed Switchyard: its commands, and `python -m switchyard.launch_router` with
sglang-router's launcher arguments.

Run with the Python of a venv the wheel was installed into (scripts/test.sh does):

    VENV/bin/python tests/clients/launcher_test.py

Table-driven: every argument sglang-router's launcher defines (the names below are read from
sglang-router's `router_args.py`, RouterArgs.add_cli_args) is translated, and the translation
is accepted by the installed `switchyard --print-config`; arguments Switchyard does not support
fail with an error naming them. Then a router started through the launcher serves a request.
"""

import json
import os
import re
import subprocess
import sys
import unittest
import urllib.request

from switchyard import launch_router
from switchyard.launch_router import UnsupportedArguments, translate

BIN = os.path.dirname(sys.executable)
SWITCHYARD = os.path.join(BIN, "switchyard")

# sglang-router's launcher arguments, each with sample values and what Switchyard must get
# (None: refused with an error naming the argument).
TABLE = [
    (["--host", "0.0.0.0"], ["--host", "0.0.0.0"]),
    (["--port", "31000"], ["--port", "31000"]),
    (["--worker-urls", "http://127.0.0.1:1", "http://127.0.0.1:2"], ["--worker-urls", "http://127.0.0.1:1", "http://127.0.0.1:2"]),
    (["--policy", "power_of_two"], ["--policy", "power_of_two"]),
    (["--prefill-policy", "cache_aware"], ["--prefill-policy", "cache_aware"]),
    (["--decode-policy", "round_robin"], ["--decode-policy", "round_robin"]),
    (["--mini-lb"], None),
    (
        ["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "9000", "--prefill", "http://127.0.0.1:3", "--decode", "http://127.0.0.1:2"],
        ["--pd-disaggregation", "--prefill", "http://127.0.0.1:1", "9000", "--prefill", "http://127.0.0.1:3", "--decode", "http://127.0.0.1:2"],
    ),
    (["--worker-startup-timeout-secs", "30"], ["--worker-startup-timeout-secs", "30"]),
    (["--worker-startup-check-interval", "5"], []),
    (["--cache-threshold", "0.4"], ["--cache-threshold", "0.4"]),
    (["--balance-abs-threshold", "32"], ["--balance-abs-threshold", "32"]),
    (["--balance-rel-threshold", "1.2"], ["--balance-rel-threshold", "1.2"]),
    (["--eviction-interval-secs", "30"], ["--eviction-interval", "30"]),
    (["--max-tree-size", "1000"], ["--max-tree-size", "1000"]),
    (["--max-payload-size", "1048576"], ["--max-payload-size", "1048576"]),
    (["--dp-aware"], ["--dp-aware"]),
    (["--enable-igw"], []),
    (["--api-key", "secret"], ["--worker-api-key", "secret"]),
    (["--log-dir", "/tmp/switchyard-launcher-logs"], ["--log-dir", "/tmp/switchyard-launcher-logs"]),
    (["--log-level", "warning"], ["--log-level", "warn"]),
    (["--log-level", "critical"], ["--log-level", "error"]),
    (
        ["--service-discovery", "--selector", "app=sglang", "tier=gpu", "--service-discovery-port", "8000", "--service-discovery-namespace", "llm"],
        ["--service-discovery", "--selector", "app=sglang", "tier=gpu", "--service-discovery-port", "8000", "--service-discovery-namespace", "llm"],
    ),
    (
        ["--service-discovery", "--pd-disaggregation", "--prefill-selector", "role=prefill", "--decode-selector", "role=decode", "--bootstrap-port-annotation", "x/port"],
        ["--pd-disaggregation", "--service-discovery", "--prefill-selector", "role=prefill", "--decode-selector", "role=decode", "--bootstrap-port-annotation", "x/port"],
    ),
    (["--prometheus-port", "29001", "--prometheus-host", "0.0.0.0"], ["--prometheus-port", "29001", "--prometheus-host", "0.0.0.0"]),
    (["--request-id-headers", "x-trace-id"], None),
    (["--request-timeout-secs", "60"], ["--request-timeout-secs", "60"]),
    (["--retry-max-retries", "3"], ["--retry-max-retries", "3"]),
    (["--retry-initial-backoff-ms", "10"], ["--retry-initial-backoff-ms", "10"]),
    (["--retry-max-backoff-ms", "1000"], ["--retry-max-backoff-ms", "1000"]),
    (["--retry-backoff-multiplier", "2.0"], ["--retry-backoff-multiplier", "2.0"]),
    (["--retry-jitter-factor", "0.1"], ["--retry-jitter-factor", "0.1"]),
    (["--disable-retries"], ["--retry-max-retries", "1"]),
    (["--cb-failure-threshold", "5"], ["--cb-failure-threshold", "5"]),
    (["--cb-success-threshold", "2"], ["--cb-success-threshold", "2"]),
    (["--cb-timeout-duration-secs", "30"], ["--cb-timeout-duration-secs", "30"]),
    (["--cb-window-duration-secs", "60"], None),
    (["--disable-circuit-breaker"], ["--cb-failure-threshold", "4294967295"]),
    (["--health-failure-threshold", "4"], ["--health-failure-threshold", "4"]),
    (["--health-success-threshold", "1"], ["--health-success-threshold", "1"]),
    (["--health-check-timeout-secs", "3"], ["--health-check-timeout-secs", "3"]),
    (["--health-check-interval-secs", "10"], ["--health-check-interval-secs", "10"]),
    (["--health-check-endpoint", "/health_generate"], ["--health-check-endpoint", "/health_generate"]),
    (["--max-concurrent-requests", "64"], ["--max-concurrent-requests", "64"]),
    (["--queue-size", "10"], ["--queue-size", "10"]),
    (["--queue-timeout-secs", "5"], ["--queue-timeout-secs", "5"]),
    (["--rate-limit-tokens-per-second", "100"], None),
    (["--cors-allowed-origins", "http://x"], None),
    (["--model-path", "/models/Llama-3.1-8B-Instruct"], ["--model-path", "/models/Llama-3.1-8B-Instruct"]),
    (["--tokenizer-path", "/models/tok"], ["--tokenizer-path", "/models/tok"]),
]

# Every argument name in sglang-router's RouterArgs.add_cli_args.
SGLANG_ROUTER_ARGUMENTS = """
--host --port --worker-urls --policy --prefill-policy --decode-policy --mini-lb
--pd-disaggregation --prefill --decode --worker-startup-timeout-secs
--worker-startup-check-interval --cache-threshold --balance-abs-threshold
--balance-rel-threshold --eviction-interval-secs --max-tree-size --max-payload-size --dp-aware
--enable-igw --api-key --log-dir --log-level --service-discovery --selector
--service-discovery-port --service-discovery-namespace --prefill-selector --decode-selector
--prometheus-port --prometheus-host --request-id-headers --request-timeout-secs
--retry-max-retries --retry-initial-backoff-ms --retry-max-backoff-ms --retry-backoff-multiplier
--retry-jitter-factor --disable-retries --cb-failure-threshold --cb-success-threshold
--cb-timeout-duration-secs --cb-window-duration-secs --disable-circuit-breaker
--health-failure-threshold --health-success-threshold --health-check-timeout-secs
--health-check-interval-secs --health-check-endpoint --max-concurrent-requests --queue-size
--queue-timeout-secs --rate-limit-tokens-per-second --cors-allowed-origins --model-path
--tokenizer-path
""".split()


class Launcher(unittest.TestCase):
    def test_every_sglang_router_argument_is_mapped(self):
        self.assertEqual(set(SGLANG_ROUTER_ARGUMENTS) - set(launch_router.ARGUMENTS), set())
        covered = {a for args, _ in TABLE for a in args if a.startswith("--")}
        self.assertEqual(set(SGLANG_ROUTER_ARGUMENTS) - covered, set(), "every argument has a table row")

    def test_each_argument_translates_and_switchyard_accepts_it(self):
        for args, want in TABLE:
            with self.subTest(args=args):
                if want is None:
                    with self.assertRaises(UnsupportedArguments) as e:
                        translate(args)
                    self.assertIn(args[0], str(e.exception))
                    continue
                got = translate(args)
                self.assertEqual(got, want)
                run = subprocess.run([SWITCHYARD, "--print-config", *got], capture_output=True, text=True)
                self.assertEqual(run.returncode, 0, run.stderr)

    def test_unsupported_arguments_are_named_together_and_exit_2(self):
        run = subprocess.run(
            [sys.executable, "-m", "switchyard.launch_router", "--worker-urls", "http://127.0.0.1:1",
             "--cors-allowed-origins", "x", "--cb-window-duration-secs", "9"],
            capture_output=True, text=True,
        )
        self.assertEqual(run.returncode, 2)
        self.assertIn("--cors-allowed-origins", run.stderr)
        self.assertIn("--cb-window-duration-secs", run.stderr)

    def test_switchyard_flags_pass_through(self):
        self.assertEqual(
            translate(["--policy", "marginal_utility", "--mu-epsilon", "0.05"]),
            ["--policy", "marginal_utility", "--mu-epsilon", "0.05"],
        )
        run = subprocess.run([sys.executable, "-m", "switchyard.launch_router", "--no-such-flag"],
                             capture_output=True, text=True)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("--no-such-flag", run.stderr)

    def test_installed_commands_run(self):
        for command in ["switchyard", "switchyard-sim", "switchyard-bench"]:
            run = subprocess.run([os.path.join(BIN, command), "--help"], capture_output=True, text=True)
            self.assertEqual(run.returncode, 0, f"{command}: {run.stderr}")

    def test_a_router_started_through_the_launcher_serves(self):
        proc = subprocess.Popen(
            [sys.executable, "-m", "switchyard.launch_router", "--port", "0", "--log-level", "warning",
             "--policy", "round_robin", "--sim-workers", "1", "--sim-time-scale", "50"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            url = None
            for line in proc.stdout:
                m = re.match(r"switchyard listening on (\S+)", line)
                if m:
                    url = m.group(1)
                    break
            self.assertIsNotNone(url, "the router did not start")
            body = json.dumps({"text": "hello", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
            req = urllib.request.Request(f"{url}/generate", data=body.encode(), headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = json.loads(resp.read())
            self.assertEqual(answer["meta_info"]["completion_tokens"], 3)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stdout.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
