#!/usr/bin/env bash
# The full run of issue 16's experiments on the reference model, one process at a time, at the
# lowest CPU priority (the budgets of docs/reference-model.md). Results: docs/lm-results/*.json.
#   scripts/lm_experiments.sh [pea] [int8] [filter]      (default: all three, in this order)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/lm-results
mkdir -p "$OUT"
THREADS=${THREADS:-2}
TOKENS=${TOKENS:-61440}
EVAL=${EVAL:-32768}
run() { echo "== $* ($(date -u +%H:%M:%S))" >&2; nice -n 19 python3 -m deepseek_rs.cli "$@"; }
run train-reference --threads "$THREADS" -q  # kept when already trained by this recipe
for name in "${@:-pea int8 filter}"; do
  for n in $name; do
    run lm-experiment "$n" --threads "$THREADS" --tokens "$TOKENS" --eval-tokens "$EVAL" --json "$OUT/$n.json"
  done
done
