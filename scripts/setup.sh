#!/usr/bin/env bash
# Set up trainfleet in ./.venv; idempotent, and a no-op (about a second) when nothing changed.
#
#   scripts/setup.sh            torch + torchvision + trainfleet
#   scripts/setup.sh --test     ... plus what the test suite needs
#
# torch: the registry's regular 2.13.0 build (CUDA libraries included, ~5 GB; it runs
# fine without a GPU). The CPU wheel some machines keep in pip's find-links cannot be
# used: no CPU build of torchvision exists, and the registry's torchvision fails to
# import next to a CPU torch ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="torch==2.13.0 torchvision==0.28.0"
EXTRAS="bench"
for arg in "$@"; do
  case "$arg" in
    --test) EXTRAS="test,bench" ;;
    *) echo "setup.sh: unknown option '$arg' (expected --test)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
VENV=.venv
log() { echo "setup: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

check_torch() {
  "$PY" -c 'import torch, torchvision
assert (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]) == ("2.13.0", "0.28.0")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")' 2>/dev/null
}
if ! versions=$(check_torch); then
  log "installing $TORCH_SPEC from the package index (a few minutes the first time)"
  # Bypass the local CPU wheel in find-links (see above).
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= \
    "$PY" -m pip install --disable-pip-version-check -q $TORCH_SPEC
  versions=$(check_torch) || { log "torch/torchvision do not import after the install"; exit 1; }
fi

stamp="$VENV/.trainfleet-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)-${EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  log "installing trainfleet[$EXTRAS] (editable)"
  "$PY" -m pip install --disable-pip-version-check -q -e ".[$EXTRAS]" 2> >(grep -v "is ignored: it is neither" >&2)
  rm -f "$VENV"/.trainfleet-*
  touch "$stamp"
fi
"$PY" -c "import trainfleet" || { log "trainfleet does not import"; exit 1; }
log "ready: $versions, trainfleet in $VENV"
