#!/usr/bin/env bash
# The pass-key diagnosis of docs/long-context.md: evaluate a trained run at one context with
# per-window records, then attribute retrieval to layers, heads and patterns.
#   bash benchmarks/diagnose_passkey.sh [RUN_DIR] [CONTEXT]
# (default: the lc-longnet-w256-long run, trained by benchmarks/long_context.py, at 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/long-context/longnet-w256-long}
context=${2:-1024}
out=benchmarks/results/diagnosis
mkdir -p "$out"
name=$(basename "$run")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python launch/evaluate.py "$run" --tasks passkey --context-lengths "$context" --windows 40 \
    --output "$out/$name-eval.json"
python benchmarks/passkey_attribution.py "$run" --context "$context" --windows 40 \
    --eval "$out/$name-eval.json" --output "$out/$name-attribution.json"
