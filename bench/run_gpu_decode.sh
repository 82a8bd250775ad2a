#!/usr/bin/env bash
# The GPU run behind the decode steps of docs/performance.md: the GPU tests of the decode-step kernels, the
# pipeline benchmark at one budget, and the GEMV microbenchmark with a sweep of the one-row kernel's configs.
# Run from the repository root on a machine with a CUDA GPU:
#   bench/run_gpu_decode.sh OUTDIR [BUDGET]
set -u
out=${1:?usage: bench/run_gpu_decode.sh OUTDIR [BUDGET]}
budget=${2:-24GiB}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1

echo "== decode-step kernel tests" >&2
timeout "${TESTS_TIMEOUT:-150}" "$python" -m pytest -q -m gpu -p no:cacheprovider -o addopts= \
    tests/test_attention_kernels.py tests/test_decode.py tests/test_fused.py >"$out/tests.log" 2>&1
echo "exit $?" >>"$out/tests.log"
tail -n 25 "$out/tests.log" >&2

echo "== pipeline benchmark at $budget" >&2
timeout "${BENCH_TIMEOUT:-200}" "$python" -m compute.cli bench --gpu-memory "$budget" --decode-tokens 64 \
    --json "$out/bench.json" >"$out/bench.log" 2>&1
echo "exit $?" >>"$out/bench.log"
tail -n 25 "$out/bench.log" >&2

echo "== GEMV microbenchmark" >&2
timeout "${KERNELS_TIMEOUT:-140}" "$python" -m bench.kernels --sweep --sweep-kernels fma \
    --sweep-seconds "${SWEEP_SECONDS:-80}" --no-crossover --json "$out/kernels.json" >"$out/kernels.log" 2>&1
echo "exit $?" >>"$out/kernels.log"
grep -v "^INFO" "$out/kernels.log" | tail -n 40 >&2
