#!/usr/bin/env bash
# The project's test command (README): formatting, lints, the Rust test suite, and a real,
# independent client (the OpenAI Python SDK) against the simulator and through the router.
# Installs what it needs (a Python venv with `openai`) on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The router builds without the simulator (the demo feature) too.
cargo check -p switchyard --no-default-features --quiet
cargo test --workspace

if ! .venv/bin/python -c "import openai, trustme" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check openai trustme
fi
cargo build --bin switchyard
.venv/bin/python tests/clients/openai_sdk.py target/debug/switchyard
