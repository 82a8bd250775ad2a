#!/usr/bin/env bash
# The GPU run behind docs/performance.md: every GPU test, the demo on CUDA, hardware counters of the one-row
# GEMV (ncu), then the pipeline benchmark on a synthetic 32B-shaped checkpoint. Run from the repository root on a machine with a CUDA GPU:
#   bench/run_gpu.sh OUTDIR
# Each step has its own time limit; every log and result lands in OUTDIR.
set -u
out=${1:?usage: bench/run_gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
checkpoint=${CHECKPOINT:-/tmp/spillover-synth-qwen2-32b}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
"$python" -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' >>"$out/gpu.txt" 2>&1

echo "== GPU tests" >&2
timeout "${TESTS_TIMEOUT:-240}" "$python" -m pytest -q -m gpu -p no:cacheprovider -o addopts= tests >"$out/gpu_tests.log" 2>&1
echo "exit $?" >>"$out/gpu_tests.log"
tail -n 3 "$out/gpu_tests.log" >&2

echo "== the demo on CUDA" >&2
timeout 90 "$python" -m compute.cli run -p "Hello" -n 16 --device cuda --output-format json \
    >"$out/demo_cuda.json" 2>"$out/demo_cuda.err"
echo "exit $?" >>"$out/demo_cuda.err"

echo "== hardware counters of the one-row GEMV (gate|up)" >&2
timeout "${NCU_TIMEOUT:-90}" ncu --clock-control none -k regex:_gemv_mma --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section LaunchStats "$python" -m bench.profile_gemv >"$out/ncu_gemv.txt" 2>&1
echo "exit $?" >>"$out/ncu_gemv.txt"
tail -n 5 "$out/ncu_gemv.txt" >&2

echo "== pipeline benchmark" >&2
timeout "${BENCH_TIMEOUT:-360}" "$python" -m compute.cli bench --checkpoint "$checkpoint" \
    --decode-tokens "${DECODE_TOKENS:-64}" --json "$out/bench.json" >"$out/bench.log" 2>&1
echo "exit $?" >>"$out/bench.log"
grep -v "^synth" "$out/bench.log" | tail -n 40 >&2
