#!/usr/bin/env bash
# Sourced by scripts/test.sh (TORCHMOE_PURPOSE=test) and scripts/demo.sh (TORCHMOE_PURPOSE=demo): makes sure
# the project's virtual environment (.venv, or $TORCHMOE_VENV) holds the pinned torch, the tools and an
# up-to-date build of torchmoe, doing only what is missing or out of date:
#  - the venv is created once;
#  - pip and the build run only when the build's fingerprint changed (scripts/build_stamp.py: the files under
#    csrc/, setup.py, pyproject.toml, the torch and Python versions), or the torch requested, the build variant
#    or the extras; the stamp lives in the venv. The package's Python files need no step (editable install);
#  - a build recompiles only what changed: ninja keeps the objects in build/<variant>-pyXY.
# Build variant: the test command compiles and links every .cu file whenever torch is a CUDA build and nvcc is
# found (TORCHMOE_REQUIRE_CUDA=1, as in CI, makes a missing nvcc an error); the demo builds the CPU kernels
# only (TORCHMOE_CPU_ONLY=1) unless a GPU is visible, and uses an up-to-date CUDA build when there is one.
# TORCHMOE_BUILD=cpu|cuda chooses.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCHMOE_VENV:-$ROOT/.venv}"
# 2.14.1 is a CUDA 13.0 build: the CUDA kernels compile and link against it even on a machine without a GPU.
TORCH_SPEC="${TORCHMOE_TORCH:-torch==2.14.1}"
PURPOSE="${TORCHMOE_PURPOSE:-test}"
PY="$VENV/bin/python"
STAMP="$VENV/.torchmoe-build-stamp"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [ "$PURPOSE" = test ]; then EXTRAS="demo,test"; else EXTRAS="demo"; fi

seconds_since() { echo $(( $(date +%s) - $1 )); }

if [ ! -x "$PY" ]; then
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "torchmoe needs Python 3.10 or newer; python3 is $(python3 --version 2>&1)" >&2
    exit 1
  fi
  echo "== creating $VENV ($(python3 --version))"
  python3 -m venv "$VENV"
  "${PIP[@]}" --upgrade pip setuptools wheel
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# The torch requested: install it (and the build tools) when the venv does not hold it yet.
eval "$("$PY" "$ROOT/scripts/build_stamp.py")"
torch_wanted="${TORCH_SPEC#torch==}"
# A spec other than torch==X (e.g. torch>=2.13) is satisfied by any installed torch; 2.13.0 by 2.13.0+cpu.
torch_ok=0
if [ -n "$torch_version" ]; then
  if [ "$torch_wanted" = "$TORCH_SPEC" ] || [ "$torch_version" = "$torch_wanted" ] || [ "${torch_version%%+*}" = "$torch_wanted" ]; then
    torch_ok=1
  fi
fi
if [ "$torch_ok" = 0 ] || ! [ -x "$VENV/bin/ninja" ]; then
  if [ "$TORCH_SPEC" = "torch==2.14.1" ]; then
    echo "== installing torch==2.14.1 (a CUDA 13.0 build: about 3 GB of wheels with its nvidia-* libraries, 4.5 GB"
    echo "   installed; minutes to download, under a minute from pip's cache) and the build tools into $VENV"
  else
    echo "== installing $TORCH_SPEC and the build tools into $VENV"
  fi
  start=$(date +%s)
  "${PIP[@]}" "$TORCH_SPEC" numpy setuptools wheel ninja
  echo "   (took $(seconds_since "$start") s)"
  eval "$("$PY" "$ROOT/scripts/build_stamp.py")"
fi

# The variant this command needs.
have_nvcc=0; [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && have_nvcc=1
have_gpu=0; { [ -e /dev/nvidia0 ] || [ -e /dev/dxg ]; } && have_gpu=1
if [ -n "${TORCHMOE_BUILD:-}" ]; then
  variant="$TORCHMOE_BUILD"
elif [ -n "$torch_cuda" ] && [ "$have_nvcc" = 1 ] && { [ "$PURPOSE" = test ] || [ "$have_gpu" = 1 ]; }; then
  variant=cuda
else
  variant=cpu
fi
if [ "$variant" = cpu ] && [ "$PURPOSE" = test ] && [ "${TORCHMOE_REQUIRE_CUDA:-0}" = 1 ]; then
  echo "TORCHMOE_REQUIRE_CUDA=1, but the CUDA kernels cannot be built: torch ${torch_version} (CUDA: ${torch_cuda:-none}), nvcc: ${CUDA_HOME:-not found}" >&2
  exit 1
fi

# The stamp of the last build: fingerprint variant extras torch-spec. A CUDA build also serves a CPU need, and a
# build with the test extras also serves the demo.
stamp_fp="" stamp_variant="" stamp_extras="" stamp_torch=""
[ -f "$STAMP" ] && read -r stamp_fp stamp_variant stamp_extras stamp_torch < "$STAMP"
up_to_date=0
if [ "$installed" = 1 ] && [ "$stamp_fp" = "$fingerprint" ] && [ "$stamp_torch" = "$TORCH_SPEC" ] \
    && { [ "$stamp_variant" = "$variant" ] || { [ "$variant" = cpu ] && [ "$stamp_variant" = cuda ]; }; } \
    && { [ "$stamp_extras" = "$EXTRAS" ] || [ "$stamp_extras" = "demo,test" ]; }; then
  up_to_date=1
fi

if [ "$up_to_date" = 1 ]; then
  echo "== torchmoe is built and up to date ($stamp_variant kernels, torch $torch_version, $VENV)"
else
  objects="$ROOT/build/$variant-py$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  if [ -d "$objects" ]; then
    how="incremental: ninja recompiles only what changed"
  elif [ "$variant" = cuda ]; then
    how="a first CUDA build, every kernel for sm_80 and sm_90: about 7 min on 2 cores"
  else
    how="a first CPU-only build: about 3 min on 2 cores"
  fi
  echo "== building torchmoe ($variant kernels, $how) and installing it with the [$EXTRAS] extras"
  start=$(date +%s)
  build_env=(TORCHMOE_CPU_ONLY=1)
  [ "$variant" = cuda ] && build_env=(FORCE_CUDA=1)
  (cd "$ROOT" && env "${build_env[@]}" "${PIP[@]}" --no-build-isolation -e ".[$EXTRAS]")
  echo "   (took $(seconds_since "$start") s)"
  built_cuda="$("$PY" -c "import torchmoe; print(int(torchmoe.built_with_cuda()))")"
  [ "$built_cuda" = 1 ] && stamp_variant=cuda || stamp_variant=cpu
  eval "$("$PY" "$ROOT/scripts/build_stamp.py")"
  echo "$fingerprint $stamp_variant $EXTRAS $TORCH_SPEC" > "$STAMP"
  echo "== torchmoe built ($stamp_variant kernels, torch $torch_version)"
fi
