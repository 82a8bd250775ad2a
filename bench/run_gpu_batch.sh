#!/usr/bin/env bash
# The GPU run behind the continuous-batching rows of docs/performance.md, in one call:
#   1. the GPU tests of the paged decode attention kernel and of the multi-sequence engine (CUDA graphs per bucket);
#   2. `spillover bench --concurrency` at every budget on the synthetic 32B, beside the one-conversation engine
#      (BASELINE=no-baseline skips that one).
# Run from the repository root on a machine with a CUDA GPU:
#   bench/run_gpu_batch.sh OUTDIR
# Environment: LEVELS (default 1,4,16,64), BUDGETS (e.g. "24GiB 8GiB"; default: the bench's), MAX_BATCH, BASELINE.
# Each step has its own time limit; every log and result lands in OUTDIR (bench.json after every budget).
set -u
out=${1:?usage: bench/run_gpu_batch.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
checkpoint=${CHECKPOINT:-/tmp/spillover-synth-qwen2-32b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
"$python" -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' >>"$out/gpu.txt" 2>&1

echo "== GPU tests: paged attention, multi-sequence engine" >&2
timeout "${TESTS_TIMEOUT:-120}" "$python" -m pytest -q -m gpu -p no:cacheprovider -o addopts= \
    tests/test_paged_attention.py tests/test_batch_engine.py >"$out/gpu_tests.log" 2>&1
echo "exit $?" >>"$out/gpu_tests.log"
tail -n 15 "$out/gpu_tests.log" >&2

echo "== spillover bench --concurrency ${LEVELS:-1,4,16,64}" >&2
budgets=()
for budget in ${BUDGETS:-}; do budgets+=(--gpu-memory "$budget"); done
timeout "${BENCH_TIMEOUT:-330}" "$python" -m compute.cli bench --checkpoint "$checkpoint" "${budgets[@]}" \
    --concurrency "${LEVELS:-1,4,16,64}" --max-batch "${MAX_BATCH:-16}" --prompt-tokens "${PROMPT_TOKENS:-128}" \
    --new-tokens "${NEW_TOKENS:-32}" --decode-tokens 64 --prefill-tokens 512 "--${BASELINE:-baseline}" \
    --json "$out/bench.json" \
    >"$out/bench.log" 2>&1
echo "exit $?" >>"$out/bench.log"
grep -v "^synth" "$out/bench.log" | tail -n 30 >&2
