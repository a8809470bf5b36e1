#!/usr/bin/env bash
# Install everything the tests need and run them: torch + torchvision + trainfleet[test]
# (scripts/setup.sh --test) and Horovod with gloo (scripts/build-horovod.sh, built once and cached).
#   scripts/test.sh [pytest args]      e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
scripts/build-horovod.sh
# The two-host tests put agents in network namespaces (ip netns), which needs iproute2.
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -q >/dev/null && apt-get install -y -q iproute2 >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
