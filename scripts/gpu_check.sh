#!/usr/bin/env bash
# GPU acceptance check of lottery_ext's CUDA kernels, for a machine with an NVIDIA GPU, nvcc,
# and torch (CUDA build), pybind11, scikit-build-core, cmake (and ninja) already installed in
# the Python environment: no package index is used.
#
#   scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out/
#
# Steps (each logged to OUT_DIR; a failing step does not stop the later ones):
#   1. build + install: LOTTERY_EXT_CUDA=ON pip install --no-build-isolation . (warnings are
#      errors; LOTTERY_EXT_CUDA_ARCHS=90 in the environment builds for Hopper only, faster)
#   2. python -m pytest tests/test_cuda.py -q
#   3. compute-sanitizer memcheck and racecheck over the `quick` CUDA tests
#   4. the rest of the test suite (its `device` fixture also runs the CUDA device)
#   5. python -m benchmarks.bench_gpu > OUT_DIR/bench_gpu.md
# Exit status: 0 when every step passed; the summary at the end names the failed ones.
# Environment: PYTHON (default: python), SKIP_BUILD=1, SKIP_BENCH=1, SKIP_FULL=1.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
PY=${PYTHON:-python}
declare -a FAILED=()

step() {  # step NAME LOGFILE CMD...: run, tee to the log, record a failure
  local name=$1 log=$2
  shift 2
  echo "=== $name (log: $log)"
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc)"
    FAILED+=("$name")
  fi
  return 0
}

{
  date -u
  nvidia-smi || true
  command -v nvcc && nvcc --version
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available(), torch.cuda.device_count())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 1. build (LOTTERY_EXT_WERROR: csrc/ compiles with zero warnings, host and device)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build" "$OUT/build.log" env LOTTERY_EXT_CUDA=ON LOTTERY_EXT_WERROR=ON \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .
fi
step "build_info" "$OUT/build_info.txt" "$PY" -c "
import lottery_ext
info = lottery_ext.build_info()
print(info)
assert info['native'] and info['cuda'], 'the installed lottery_ext has no CUDA kernels'
"

# 2. the CUDA tests (from the repository root: tests/conftest.py provides the fixtures)
step "test_cuda" "$OUT/test_cuda.log" "$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider

# 3. compute-sanitizer on the quick subset. No caching allocator: memcheck then sees the real
#    bounds of every allocation (out-of-bounds inside a cached block would go unnoticed).
SAN=$(command -v compute-sanitizer || true)
if [ -z "$SAN" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then SAN="$d/bin/compute-sanitizer"; break; fi
  done
fi
if [ -n "$SAN" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" "$OUT/sanitizer_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 50 \
      "$PY" -m pytest tests/test_cuda.py -q -x -k quick -p no:cacheprovider
  done
else
  echo "=== compute-sanitizer not found: sanitizer steps FAILED"
  FAILED+=("sanitizer (not found)")
fi

# 4. the rest of the suite (CPU and, through the `device` fixture, CUDA parity tests)
if [ "${SKIP_FULL:-0}" != 1 ]; then
  step "test_suite" "$OUT/test_suite.log" "$PY" -m pytest tests -q -p no:cacheprovider \
    --ignore=tests/test_cuda.py
fi

# 5. the GPU benchmark (markdown table)
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "=== bench_gpu (output: $OUT/bench_gpu.md)"
  if ! "$PY" -m benchmarks.bench_gpu > "$OUT/bench_gpu.md" 2> "$OUT/bench_gpu.err"; then
    echo "=== bench_gpu FAILED"
    FAILED+=("bench_gpu")
  fi
  cat "$OUT/bench_gpu.md"
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "gpu_check: all steps passed (logs in $OUT)"
  exit 0
fi
echo "gpu_check: FAILED steps: ${FAILED[*]} (logs in $OUT)"
exit 1
