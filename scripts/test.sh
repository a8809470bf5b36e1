#!/usr/bin/env bash
# Install everything the tests need (scripts/setup.sh --test) and run them.
#   scripts/test.sh [pytest args]      e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
