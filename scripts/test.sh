#!/usr/bin/env bash
# Install everything the tests need and run them: torch + torchvision + trainfleet[test]
# (scripts/setup.sh --test) and Horovod with gloo (scripts/build-horovod.sh, built once and cached).
#   scripts/test.sh [pytest args]      e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
scripts/build-horovod.sh
exec .venv/bin/python -m pytest "$@"
