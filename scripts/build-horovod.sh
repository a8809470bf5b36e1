#!/usr/bin/env bash
# Install Horovod 0.28.1 (PyTorch + gloo) into .venv, building its wheel once and caching it.
#
#   scripts/build-horovod.sh           CPU operations over gloo (what this project tests)
#   TRAINFLEET_HOROVOD_GPU=1 scripts/build-horovod.sh
#                                      GPU operations over NCCL; needs a CUDA toolkit (nvcc) and NCCL
#
# Horovod 0.28.1 is the last release and does not build against torch >= 2.1 as shipped; three
# patches make it build: C++17 instead of C++14 (torch's headers need it), CMake policy 3.5
# (CMake 4 rejects the CMakeLists of the bundled gloo), and, for a CPU build against torch's CUDA
# wheel on a machine without a CUDA toolkit, Pytorch_CUDA forced off in FindPytorch.cmake.
# The wheel is cached in $TRAINFLEET_WHEEL_CACHE (default ~/.cache/trainfleet/wheels), keyed by
# torch version and flavour, and rebuilt only when missing (2-6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.28.1
PY=.venv/bin/python
[ -x "$PY" ] || { echo "build-horovod: run scripts/setup.sh first" >&2; exit 2; }
log() { echo "build-horovod: $*" >&2; }

GPU=${TRAINFLEET_HOROVOD_GPU:-0}
TORCH=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
FLAVOUR=$([ "$GPU" = 1 ] && echo nccl || echo gloo)
CACHE=${TRAINFLEET_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trainfleet/wheels}/horovod-$VERSION-torch$TORCH-$FLAVOUR

# TRAINFLEET_HOROVOD_REBUILD=1: build again even if installed and cached (the build prints its time).
REBUILD=${TRAINFLEET_HOROVOD_REBUILD:-0}
if [ "$REBUILD" != 1 ] && "$PY" -c "import horovod, horovod.torch as h; assert horovod.__version__ == '$VERSION' and h.gloo_built()" 2>/dev/null; then
  log "horovod $VERSION ($FLAVOUR) already installed"
  exit 0
fi

wheel=""
[ "$REBUILD" = 1 ] || wheel=$(ls "$CACHE"/horovod-$VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  command -v cmake >/dev/null || { log "installing cmake"; apt-get install -y -q cmake >/dev/null; }
  command -v g++ >/dev/null || { log "installing g++"; apt-get install -y -q g++ >/dev/null; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  log "building horovod $VERSION ($FLAVOUR) from its sdist; a few minutes on 2 cores"
  build_started=$SECONDS
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$PY" -m pip download -q --no-deps --no-binary :all: \
    "horovod==$VERSION" -d "$work"
  tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
  src="$work/horovod-$VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)"
  if [ "$GPU" = 1 ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CPU_OPERATIONS=GLOO
  else
    export HOROVOD_CPU_OPERATIONS=GLOO
    # Against torch's CUDA wheel without a toolkit, FindPytorch would try a CUDA extension.
    sed -i 's/^string(TOUPPER "${Pytorch_CUDA}" Pytorch_CUDA)$/set(Pytorch_CUDA FALSE)/' \
      "$src/cmake/Modules/FindPytorch.cmake"
    grep -q '^set(Pytorch_CUDA FALSE)$' "$src/cmake/Modules/FindPytorch.cmake" \
      || { log "could not patch FindPytorch.cmake"; exit 1; }
  fi
  "$PY" -m pip install -q --disable-pip-version-check setuptools wheel cffi 2> >(grep -v "is ignored" >&2)
  mkdir -p "$CACHE"
  "$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$CACHE" "$src" \
    > "$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; log "build failed"; exit 1; }
  wheel=$(ls "$CACHE"/horovod-$VERSION-*.whl | head -n 1)
  log "built $wheel in $((SECONDS - build_started)) s ($(nproc) cores)"
fi
"$PY" -m pip install -q --disable-pip-version-check "$wheel" 2> >(grep -v "is ignored" >&2)
"$PY" -c "import horovod.torch as h; assert h.gloo_built(), 'horovod built without gloo'"
log "horovod $VERSION ($FLAVOUR) installed from $wheel"
