#!/usr/bin/env bash
# The GPU run behind the decode-step rows of docs/performance.md, in one call of a few minutes:
#   1. the GEMV microbenchmark, sweeping the decode step's one-row configs (SWEEP_KERNELS=mma: the whole grid;
#      SWEEP_KERNELS=none skips it and keeps the built-in table); the best per shape go to OUTDIR/kernels.json;
#   2. the pipeline benchmark at every budget, its GEMVs configured from that table ($SPILLOVER_GEMV_CONFIGS);
#   3. the decode step of a 16-layer model, eager and graph, and the device time per kernel of a few graph-replayed
#      tokens (bench.decode --profile);
#   4. the GPU tests of the decode step, the kernels and the graphs.
# Run from the repository root on a machine with a CUDA GPU:
#   bench/run_gpu_decode.sh OUTDIR
set -u
out=${1:?usage: bench/run_gpu_decode.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1

if [ "${SWEEP_KERNELS:-mma}" != none ]; then
    echo "== GEMV microbenchmark, ${SWEEP_KERNELS:-mma} sweep" >&2
    timeout "${KERNELS_TIMEOUT:-200}" "$python" -m bench.kernels --sweep --sweep-kernels "${SWEEP_KERNELS:-mma}" \
        --sweep-seconds "${SWEEP_SECONDS:-130}" --no-crossover --json "$out/kernels.json" >"$out/kernels.log" 2>&1
    status=$?
    echo "exit $status" >>"$out/kernels.log"
    grep -v "^INFO" "$out/kernels.log" | tail -n 30 >&2
    if [ "$status" = 0 ]; then export SPILLOVER_GEMV_CONFIGS="$out/kernels.json"; fi
fi

echo "== pipeline benchmark" >&2
timeout "${BENCH_TIMEOUT:-250}" "$python" -m compute.cli bench --decode-tokens 64 --json "$out/bench.json" \
    >"$out/bench.log" 2>&1
echo "exit $?" >>"$out/bench.log"
grep -v "^synth" "$out/bench.log" | tail -n 8 >&2

echo "== decode step profile, 16 layers" >&2
timeout "${PROFILE_TIMEOUT:-120}" "$python" -m bench.decode --checkpoint "${TMPDIR:-/tmp}/spillover-decode16" --layers 16 \
    --decode-tokens 64 --profile "$out/decode16-profile.txt" --json "$out/decode16.json" >"$out/decode16.log" 2>&1
echo "exit $?" >>"$out/decode16.log"
tail -n 4 "$out/decode16.log" >&2
rm -rf "${TMPDIR:-/tmp}/spillover-decode16"

echo "== GPU tests" >&2
timeout "${TESTS_TIMEOUT:-150}" "$python" -m pytest -q -m gpu -p no:cacheprovider -o addopts= \
    tests/test_kernels.py tests/test_decode.py tests/test_graphs_gpu.py tests/test_engine.py tests/test_fused.py \
    tests/test_attention_kernels.py >"$out/tests.log" 2>&1
echo "exit $?" >>"$out/tests.log"
grep -E "passed|failed|FAILED" "$out/tests.log" | tail -n 12 >&2
