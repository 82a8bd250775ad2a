#!/usr/bin/env bash
# Speculative decoding on the GPU, in one command: the cost of a target pass against the rows it checks (1 … 512) on
# the synthetic 32B under 24, 12 and 8 GiB, the draft's (synthetic 0.5B) cost per tree, and, given the real pair's
# tokens per pass measured on CPU (bench/results/*-cpu-speculate-pair.json), the projected tok/s. From the
# repository root on a machine with a CUDA GPU:
#   bench/run_gpu_speculate.sh OUTDIR [PAIR_JSON]
set -u
out=${1:?usage: bench/run_gpu_speculate.sh OUTDIR [PAIR_JSON]}
pair=${2:-$(ls bench/results/*-cpu-speculate-pair.json 2>/dev/null | tail -n 1)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
timeout "${SPECULATE_TIMEOUT:-900}" "$python" -m bench.speculate passes \
    --checkpoint "${CHECKPOINT:-/tmp/spillover-synth-qwen2-32b}" \
    --draft-checkpoint "${DRAFT_CHECKPOINT:-/tmp/spillover-synth-qwen2-0.5b}" \
    ${pair:+--tokens-per-pass "$pair"} --json "$out/speculate_passes.json" >"$out/speculate_passes.log" 2>&1
echo "exit $?" >>"$out/speculate_passes.log"
tail -n 60 "$out/speculate_passes.log" >&2
