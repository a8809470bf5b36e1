#!/usr/bin/env bash
# Install everything the tests need and run them: torch + torchvision + trainfleet[test]
# (scripts/setup.sh --test), Horovod with gloo (scripts/build-horovod.sh, built once and cached),
# iproute2 for the two-host tests, and a local SLURM cluster (scripts/dev-slurm.sh).
#   scripts/test.sh [pytest args]      e.g. scripts/test.sh -m "not slow" -x, or -n 0 for one runner
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
scripts/build-horovod.sh
# The two-host tests put agents in network namespaces (ip netns), which needs iproute2; the
# launch --hosts tests run an OpenSSH server in each namespace.
if { ! command -v ip >/dev/null || [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null; } && [ "$(id -u)" = 0 ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 openssh-server openssh-client >/dev/null
fi
# A real two-node SLURM cluster for the tests marked slurm; stopped again on exit.
eval "$(scripts/dev-slurm.sh start)"
trap 'scripts/dev-slurm.sh stop' EXIT
# Every part installed above must be there: a test that needs a missing one fails, and so does any
# other skip (tests/parts.py). GPU tests are required only where a GPU is visible.
export TRAINFLEET_REQUIRE=horovod,slurm,multinode,ssh
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  TRAINFLEET_REQUIRE+=,gpu
fi
# Two runners: the tests that depend on time or share the machine's cluster, namespaces or sshd one
# after another on one, the rest beside them on the other (tests/conftest.py: runner_unit). A run
# of a few tests can take the runners back with -n 0 (a later option wins).
.venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
