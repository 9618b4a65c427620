#!/usr/bin/env bash
# Runs every test on a fresh machine: environment, build, pytest, then the GoogleTest suite (ctest),
# plain and under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"

if ! [ -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null; then
  echo "== installing GoogleTest and CMake (Debian packages)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgtest-dev cmake >/dev/null
fi

echo "== pytest"
(cd "$ROOT" && "$PY" -m pytest -q -ra tests/python "$@")

TORCH_CMAKE="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
export PATH="$VENV/bin:$PATH"  # the venv's ninja
for variant in plain sanitize; do
  build="$ROOT/build/cmake-$variant"
  sanitize=OFF; [ "$variant" = sanitize ] && sanitize=ON
  echo "== GoogleTest ($variant)"
  cmake -S "$ROOT" -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" -DTORCHMOE_SANITIZE=$sanitize >/dev/null
  cmake --build "$build" -j "$MAX_JOBS"
  # libtorch itself is not instrumented and keeps allocations alive until exit: no leak reports.
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir "$build" --output-on-failure
done
