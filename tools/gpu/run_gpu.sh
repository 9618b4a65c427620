#!/usr/bin/env bash
# Builds torchmoe with its CUDA kernels on a GPU machine, runs the CUDA tests and the op benchmark in one
# go, and writes every log under $OUT (default /tmp/torchmoe-gpu).
#
#   tools/gpu/run_gpu.sh [build] [test] [mybench] [bench] [suite]     # default: build test mybench
#   PYTEST_ARGS="-k topk" tools/gpu/run_gpu.sh build test
#
# build: python3 setup.py build_ext --inplace for sm_90 (TORCH_CUDA_ARCH_LIST overrides)
# test:  tests/python/test_cuda.py;  suite: the whole pytest suite;
# mybench: tools/gpu/bench_cuda.py (forward and backward ops timed directly);  bench: benchmarks/bench_ops.py --device cuda
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/torchmoe-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=python
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test mybench)
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/device.txt"

for step in "${steps[@]}"; do
  case "$step" in
    build)
      start=$(date +%s)
      if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
          python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
        tail -60 "$OUT/build.log"
        echo "BUILD FAILED"
        exit 1
      fi
      echo "build: $(( $(date +%s) - start )) s"
      ;;
    test)
      python3 -m pytest -q -rs --durations=15 tests/python/test_cuda.py ${PYTEST_ARGS:-} 2>&1 \
        | tee "$OUT/test_cuda.log" | grep -v -E '^(\.|s|F|E)+ *\[' ; status=$(( status | ${PIPESTATUS[0]} ))
      tail -n 40 "$OUT/test_cuda.log" | grep -E "passed|failed|error" | tail -3
      ;;
    suite)
      python3 -m pytest -q tests/python ${PYTEST_ARGS:-} >"$OUT/test_suite.log" 2>&1; status=$(( status | $? ))
      grep -E "^(FAILED|ERROR)" "$OUT/test_suite.log" | head -30
      tail -1 "$OUT/test_suite.log"
      ;;
    mybench)
      python3 tools/gpu/bench_cuda.py --json "$OUT/bench_cuda.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cuda.log"
      status=$(( status | ${PIPESTATUS[0]} ))
      ;;
    bench)
      python3 benchmarks/bench_ops.py --device cuda ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
      status=$(( status | ${PIPESTATUS[0]} ))
      ;;
    *)
      echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
