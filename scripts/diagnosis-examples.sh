#!/bin/bash
# The README's example reports of issue 23, each from a real 2-worker job with one fault on rank 1:
#   python -m benchmarks.record diagnosis-examples -- bash scripts/diagnosis-examples.sh
set -u
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { echo "\$ launch --gpus 2 tests/scripts/fault_train.py OUT $*"; .venv/bin/launch --gpus 2 --log-dir "$out/logs" \
          tests/scripts/fault_train.py "$out" "$@" 2>&1 | grep -v "no CUDA devices in use"; echo "(exit code ${PIPESTATUS[0]})"; echo; }
run --fault sleep --step-sleep 0.1
run --fault skip --step-sleep 0.1
run --fault slow_forward --factor 3 --step-sleep 0.05
run --fault nan
