#!/bin/bash
# The README's examples of issue 25, from real jobs: a ledger (a 2-worker job whose rank 1 is killed
# at step 9, with a slow save and an evaluation pass) and the merged console of 16 ranks on 4
# simulated nodes:
#   python -m benchmarks.record account-examples -- bash scripts/account-examples.sh
set -u
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/ledger" "$out/console"
args=(--steps 20 --step-time 0.2 --checkpoint-every 5 --kill-at 9 --save-stall 1 --save-at 12 --eval-at 15 --eval-time 1)
echo "\$ launch --gpus 2 --max-restarts 1 tests/scripts/ledger_train.py OUT ${args[*]}"
.venv/bin/launch --gpus 2 --max-restarts 1 --log-dir "$out/ledger/logs" tests/scripts/ledger_train.py "$out/ledger" \
  "${args[@]}" 2>&1 | grep -v "no CUDA devices in use" | grep -Ev "^  \| +[0-9]+ [^ ]+ +[0-9]|ms \(median of|^  \| rank host"
echo "(exit code ${PIPESTATUS[0]})"
echo
echo "\$ launch --nodes 4 --gpus 4 tests/scripts/console_lines.py OUT --rounds 2     # the console (stdout)"
.venv/bin/launch --nodes 4 --gpus 4 --log-dir "$out/console/logs" tests/scripts/console_lines.py "$out/console" \
  --rounds 2 2>/dev/null
echo "(exit code $?)"
