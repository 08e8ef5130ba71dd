#!/usr/bin/env bash
# The whole test suite, Rust and Python, from a fresh clone: `bash scripts/test.sh`.
# Installs the package (release build) with its test extras first.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
PY="${PYTHON:-python3}"

step() { printf '\n== %s\n' "$*"; }

step "install (release build) with test extras"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"

step "rust: format, lint, unit and property tests"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --release --locked

step "python: lint, stubs"
"$PY" -m ruff check python tests benches
"$PY" -m mypy.stubtest deepseek_rs._core

step "python: tests"
"$PY" -m pytest tests -q -p no:cacheprovider

step "benchmarks: smoke run (timings disabled)"
"$PY" -m pytest benches -q -p no:cacheprovider --benchmark-disable
