#!/usr/bin/env bash
# The project's test command (README): formatting, lints, the Rust test suite, and a real,
# independent client (the OpenAI Python SDK) against the simulator and through the router.
# Installs what it needs (a fresh Python venv with `openai`, `trustme`, `pyzmq`, `msgspec`,
# `transformers` and the built wheel; a real model's tokenizer.json from the litellm package).
set -euo pipefail
cd "$(dirname "$0")/.."
# A hung step must fail the run, not eat CI's time limit: each step below has a bound far above
# its normal duration on a 2-core machine (the whole script takes ~20 min there from a cold build).
bounded() { timeout --kill-after=15 "$@"; }

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The router builds without the simulator (the demo feature) too.
cargo check -p switchyard --no-default-features --quiet
bounded 3000 cargo test --workspace

# The pip package: the wheel (from the debug build the tests made), installed into a fresh
# venv; the OpenAI SDK test then runs the installed `switchyard` command, and the launcher test
# checks `python -m switchyard.launch_router` against sglang-router's arguments. `cargo test`
# built the three binaries (the integration tests run them); a `cargo build` here would resolve
# features without the dev-dependencies and recompile ~30 crates (4.6 min on 2 cores) for the
# same programs. build_wheel.py fails if one is missing.
wheel=$(python3 scripts/build_wheel.py --profile dev --no-build --strip)
python3 -m venv --clear target/wheel-venv
bounded 900 target/wheel-venv/bin/pip install --quiet --disable-pip-version-check openai trustme pyzmq msgspec transformers jinja2 "$wheel"
bounded 300 target/wheel-venv/bin/python tests/clients/launcher_test.py
bounded 900 target/wheel-venv/bin/python tests/clients/openai_sdk.py target/wheel-venv/bin/switchyard
# KV events against real ZeroMQ (pyzmq/libzmq) and the engines' msgspec encoding, both ways.
bounded 300 target/wheel-venv/bin/python tests/clients/kv_events_interop.py target/debug/switchyard target/debug/switchyard-sim
# Tokenizer parity with transformers on a real model's tokenizer (DeepSeek's tokenizer.json, which
# the litellm package ships; nothing is fetched from a model hub).
mkdir -p target/parity
if [ ! -f target/parity/deepseek_tokenizer.json ]; then
  bounded 600 target/wheel-venv/bin/pip download --quiet --disable-pip-version-check --no-deps litellm==1.110.2 -d target/parity
  python3 -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('target/parity/litellm-*.whl')[0]); open('target/parity/deepseek_tokenizer.json', 'wb').write(z.read('litellm/litellm_core_utils/tokenizers/deepseek_tokenizer.json'))"
fi
bounded 900 target/wheel-venv/bin/python tests/clients/tokenizer_parity.py target/debug/switchyard target/parity/deepseek_tokenizer.json
