#!/usr/bin/env bash
# Speculative decoding on the GPU, in one command: the cost of a target pass against the rows it checks on the
# synthetic 32B under 24, 12 and 8 GiB, the draft's (synthetic 0.5B) cost per tree (16, 64, 128 nodes) and per chain
# (4, 8, 16, 32 tokens, its decode steps replayed from CUDA graphs), and, given the real pair's tokens per pass
# measured on CPU (default: the chains and trees measured on 2026-12-06), the projected tok/s of each draft that
# result measured (its rows and draft sizes are timed too). From the repository root on a machine with a CUDA GPU:
#   bench/run_gpu_speculate.sh OUTDIR [PAIR_JSON]
# It stops after SPECULATE_TIMEOUT seconds (480, writing the synthetic checkpoints first included when they are
# missing); the JSON holds every budget finished by then. BUDGETS (e.g. "24GiB 8GiB"), ROWS, TREES and CHAINS
# (comma-separated) narrow the run.
set -u
out=${1:?usage: bench/run_gpu_speculate.sh OUTDIR [PAIR_JSON]}
pair=${2:-bench/results/2026-12-06-cpu-speculate-pair-chain.json}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
timeout "${SPECULATE_TIMEOUT:-480}" "$python" -m bench.speculate passes \
    --checkpoint "${CHECKPOINT:-/tmp/spillover-synth-qwen2-32b}" \
    --draft-checkpoint "${DRAFT_CHECKPOINT:-/tmp/spillover-synth-qwen2-0.5b}" \
    $(for b in ${BUDGETS:-24GiB 12GiB 8GiB}; do echo --gpu-memory "$b"; done) \
    ${ROWS:+--rows "$ROWS"} ${TREES:+--trees "$TREES"} ${CHAINS:+--chains "$CHAINS"} \
    ${pair:+--tokens-per-pass "$pair"} --json "$out/speculate_passes.json" >"$out/speculate_passes.log" 2>&1
echo "exit $?" >>"$out/speculate_passes.log"
tail -n 80 "$out/speculate_passes.log" >&2
