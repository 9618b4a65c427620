#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: creates the project's virtual environment (.venv, or
# $TORCHMOE_VENV), installs the pinned torch wheel and the tools, and builds torchmoe into it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCHMOE_VENV:-$ROOT/.venv}"
# 2.14.1 is a CUDA 13.0 build: the CUDA kernels compile and link against it even on a machine without a GPU.
TORCH_SPEC="${TORCHMOE_TORCH:-torch==2.14.1}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
echo "== installing $TORCH_SPEC and tools into $VENV"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" numpy ninja pytest expecttest tqdm matplotlib

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "== building torchmoe"
(cd "$ROOT" && "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e .)
"$PY" -c "import torchmoe; print('torchmoe', torchmoe.__version__, 'CUDA kernels:', torchmoe.built_with_cuda())"
