"""Launch configs of the INT4 GEMV kernels (``compute.kernels.gemv``): the ones measured on the H200 per shape, a
heuristic for other shapes, and the tables a sweep on another GPU writes (``python -m bench.kernels --sweep``).

``$SPILLOVER_GEMV_CONFIGS`` names such a table to merge in at import. Nothing is autotuned at run time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import triton

from quantizer.format import BLOCK_SIZE

__all__ = ["TUNED_CONFIGS", "GemvConfig", "gemv_config", "load_tuned_configs"]


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of one GEMV kernel call."""

    block_n: int  # weight rows (output features) per program
    groups: int  # 128-element groups per K step: each step reads groups * 64 bytes of every row
    split_k: int  # programs sharing one row block along K; > 1 writes fp32 partials, summed by a second kernel
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop (the dot kernel; the FMA kernel's loads feed no dot)
    prefetch: bool = False  # FMA kernel: load the next K step's words before this step's arithmetic
    # Registers per thread the compiler may use (ptxas -maxrregcount); None lets it choose. Fewer registers fit more
    # warps on an SM (the one-warp FMA programs take up to 128: 16 warps), but the compiler then spends more
    # instructions; on the H200 that paid off for one shape (docs/kernels.md).
    maxnreg: int | None = None


# Measured on the H200 with `python -m bench.kernels --sweep` (docs/kernels.md): the best config per
# (kernel, N, K) for the 32B model's shapes. Other shapes get the heuristic in `gemv_config`.
TUNED_CONFIGS: dict[tuple[str, int, int], GemvConfig] = {
    ("dot", 1024, 5120): GemvConfig(block_n=32, groups=1, split_k=8, num_warps=4, num_stages=3),
    ("dot", 5120, 5120): GemvConfig(block_n=64, groups=1, split_k=8, num_warps=4, num_stages=2),
    ("dot", 5120, 27648): GemvConfig(block_n=64, groups=1, split_k=8, num_warps=4, num_stages=3),
    ("dot", 27648, 5120): GemvConfig(block_n=64, groups=2, split_k=8, num_warps=4, num_stages=2),
    ("dot", 152064, 5120): GemvConfig(block_n=64, groups=2, split_k=1, num_warps=4, num_stages=3),
    ("fma", 1024, 5120): GemvConfig(block_n=16, groups=4, split_k=8, num_warps=1, num_stages=1),
    ("fma", 27648, 5120): GemvConfig(block_n=32, groups=1, split_k=2, num_warps=1, num_stages=1, prefetch=True),
    # The decode step's GEMVs (compute.decode) on the row operand, swept on 2026-12-01 and 02 (bench/results/
    # 2026-12-01-h200-kernels-operand-sweep.json, 2026-12-02-h200-kernels-operand-register-sweep.json); q|k|v, o
    # and down leave their partial sums to the kernel that consumes them, which sets a limit on o's split (one
    # program sums it, with the norm). A register cap helps o only: the others ran slower under any.
    ("fma", 7168, 5120): GemvConfig(block_n=32, groups=1, split_k=8, num_warps=2, num_stages=1),
    ("fma", 5120, 5120): GemvConfig(block_n=16, groups=1, split_k=8, num_warps=1, num_stages=1, maxnreg=96),
    ("fma", 55296, 5120): GemvConfig(block_n=16, groups=2, split_k=2, num_warps=1, num_stages=1),
    ("fma", 5120, 27648): GemvConfig(block_n=16, groups=2, split_k=16, num_warps=1, num_stages=1),
    ("fma", 152064, 5120): GemvConfig(block_n=32, groups=2, split_k=1, num_warps=2, num_stages=1),
}

def load_tuned_configs(path: str | os.PathLike) -> int:
    """Merge the configs a ``python -m bench.kernels --sweep`` run wrote (its ``--json``'s "tuned" table, keys
    "kernel N K") into ``TUNED_CONFIGS``, for a GPU other than the one the table was measured on. Returns how many.
    Read at import from the file ``$SPILLOVER_GEMV_CONFIGS`` names, when it is set."""
    try:
        tuned = json.loads(Path(path).read_text())["tuned"]
        configs = {}
        for key, fields in tuned.items():
            kernel, n, k = key.split()
            configs[(kernel, int(n), int(k))] = GemvConfig(**fields)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a GEMV config table written by bench.kernels --sweep ({e})") from None
    TUNED_CONFIGS.update(configs)
    return len(configs)


if os.environ.get("SPILLOVER_GEMV_CONFIGS"):
    load_tuned_configs(os.environ["SPILLOVER_GEMV_CONFIGS"])

_TARGET_PROGRAMS = 1024  # enough resident programs to keep every SM's loads in flight (132 SMs on an H200)


def gemv_config(kernel: str, n: int, k: int) -> GemvConfig:
    """The config for ``kernel`` ("fma" or "dot") on an ``[n, k]`` weight: the measured one, else a heuristic."""
    tuned = TUNED_CONFIGS.get((kernel, n, k))
    if tuned is not None:
        return tuned
    if kernel == "fma":  # the shape of most winners of the H200 sweep: one warp, 16 rows, 128 bytes per row
        block_n, groups, num_warps, num_stages = 16, 2, 1, 1
    else:
        block_n, groups, num_warps, num_stages = 64, 1, 4, 2
    n_tiles = triton.cdiv(k // BLOCK_SIZE, groups)
    split_k = 1
    # Few row blocks (small N, long K) leave SMs idle: share K among more programs, in powers of two.
    while triton.cdiv(n, block_n) * split_k * 2 <= _TARGET_PROGRAMS and split_k * 2 <= n_tiles // 2:
        split_k *= 2
    return GemvConfig(block_n=block_n, groups=groups, split_k=split_k, num_warps=num_warps, num_stages=num_stages)
