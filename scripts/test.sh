#!/usr/bin/env bash
# Runs every test: environment and build (scripts/setup_env.sh, quick when nothing changed), pytest, then the
# GoogleTest suite (ctest) plain and under AddressSanitizer + UndefinedBehaviorSanitizer, each with the C++
# deployment tests (TorchScript and AOTInductor from C++). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCHMOE_PURPOSE=test
source "$ROOT/scripts/setup_env.sh"

if ! [ -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null; then
  echo "== installing GoogleTest and CMake (Debian packages)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgtest-dev cmake >/dev/null
fi

# One folder of deployment artifacts for test_export.py and both ctest runs: one AOTInductor compile, redone
# only when torchmoe or torch changed.
export TORCHMOE_DEPLOY_ARTIFACTS="$ROOT/build/deploy-artifacts"

echo "== pytest (the whole suite: about 4 min on 2 cores, one AOTInductor compile included)"
start=$(date +%s)
(cd "$ROOT" && "$PY" -m pytest -q -ra tests/python "$@")
echo "   (took $(seconds_since "$start") s)"

TORCH_CMAKE="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
export PATH="$VENV/bin:$PATH"  # the venv's ninja
for variant in plain sanitize; do
  build="$ROOT/build/cmake-$variant"
  sanitize=OFF; [ "$variant" = sanitize ] && sanitize=ON
  if [ -f "$build/build.ninja" ]; then
    how="incremental build in $build"
  else
    how="first build of libtorchmoe and the tests: about 4 min on 2 cores; later runs are incremental"
  fi
  echo "== GoogleTest ($variant: $how)"
  start=$(date +%s)
  cmake -S "$ROOT" -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" -DTORCHMOE_SANITIZE=$sanitize \
    -DTORCHMOE_PYTHON="$PY" -DTORCHMOE_DEPLOY_ARTIFACTS="$TORCHMOE_DEPLOY_ARTIFACTS" >/dev/null
  cmake --build "$build" -j "$MAX_JOBS"
  # libtorch itself is not instrumented and keeps allocations alive until exit: no leak reports.
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir "$build" --output-on-failure
  echo "   (took $(seconds_since "$start") s)"
done
