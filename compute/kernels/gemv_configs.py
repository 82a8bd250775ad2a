"""Launch configs of the INT4 GEMV kernels (``compute.kernels.gemv``): the ones measured on the H200 per shape, a
heuristic for other shapes, and the tables a sweep on another GPU writes (``python -m bench.kernels --sweep``).

A process merges such a table in once, at its start (``compute.config.KernelOptions``). Nothing is autotuned at run
time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import triton

from quantizer.format import BLOCK_SIZE

__all__ = ["TUNED_CONFIGS", "GemvConfig", "MmaConfig", "gemv_config", "load_tuned_configs"]


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of one GEMV kernel call."""

    block_n: int  # weight rows (output features) per program
    groups: int  # 128-element groups per K step: each step reads groups * 64 bytes of every row
    split_k: int  # programs sharing one row block along K; > 1 writes fp32 partials, summed by a second kernel
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop


@dataclasses.dataclass(frozen=True)
class MmaConfig:
    """Launch parameters of one call of the one-row tensor-core GEMV (``compute.kernels.gemv_mma``)."""

    tiles: int = 1  # 16-row tiles a warp: 1, 2 or 4
    warps: int = 1  # warps a program: 1, 2 or 4; a program's rows are 16 * tiles * warps
    groups: int = 2  # 128-element groups a loop step, 1 or 2: their loads are issued a step ahead
    splits: int = 1  # programs sharing each row block along K, at most; > 1 writes fp32 partial sums

    def __post_init__(self):
        if self.tiles not in (1, 2, 4) or self.warps not in (1, 2, 4) or self.groups not in (1, 2) or self.splits < 1:
            raise ValueError(f"{self} needs tiles and warps of 1, 2 or 4, groups of 1 or 2 and splits of at least 1")

    @property
    def rows(self) -> int:
        return 16 * self.tiles * self.warps


# The best config per (kernel, N, K) for the 32B model's shapes, measured on the H200 with
# `python -m bench.kernels --sweep` (docs/performance.md). Other shapes get the heuristic in `gemv_config`.
TUNED_CONFIGS: dict[tuple[str, int, int], GemvConfig | MmaConfig] = {
    ("dot", 1024, 5120): GemvConfig(block_n=32, groups=1, split_k=8, num_warps=4, num_stages=3),
    ("dot", 5120, 5120): GemvConfig(block_n=64, groups=1, split_k=8, num_warps=4, num_stages=2),
    ("dot", 5120, 27648): GemvConfig(block_n=64, groups=1, split_k=8, num_warps=4, num_stages=3),
    ("dot", 27648, 5120): GemvConfig(block_n=64, groups=2, split_k=8, num_warps=4, num_stages=2),
    ("dot", 152064, 5120): GemvConfig(block_n=64, groups=2, split_k=1, num_warps=4, num_stages=3),
    # The decode step's GEMVs (compute.decode): q|k|v, o, gate|up, down, lm_head. q|k|v, o and down leave their
    # partial sums to the kernel that consumes them; down's 12 splits of its 216 groups make one full wave.
    ("mma", 7168, 5120): MmaConfig(tiles=1, warps=2, groups=1, splits=8),
    ("mma", 5120, 5120): MmaConfig(tiles=1, warps=4, groups=1, splits=8),
    ("mma", 55296, 5120): MmaConfig(tiles=2, warps=2, groups=2, splits=1),
    ("mma", 5120, 27648): MmaConfig(tiles=2, warps=2, groups=2, splits=12),
    ("mma", 152064, 5120): MmaConfig(tiles=2, warps=2, groups=2, splits=2),
}
_CONFIG_TYPES = {"dot": GemvConfig, "mma": MmaConfig, "mma-rows": MmaConfig}


def read_tuned_configs(path: str | os.PathLike) -> dict[tuple[str, int, int], GemvConfig | MmaConfig]:
    """The configs a ``python -m bench.kernels --sweep`` run wrote (its ``--json``'s "tuned" table, keys
    "kernel N K"); ValueError, naming the file, for anything else."""
    try:
        tuned = json.loads(Path(path).read_text())["tuned"]
        configs = {}
        for key, fields in tuned.items():
            kernel, n, k = key.split()
            configs[(kernel, int(n), int(k))] = _CONFIG_TYPES[kernel](**fields)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a GEMV config table written by bench.kernels --sweep ({e})") from None
    return configs


def load_tuned_configs(path: str | os.PathLike) -> int:
    """Merge the table at ``path`` (``read_tuned_configs``) into ``TUNED_CONFIGS``, for a GPU other than the one the
    built-in table was measured on. Returns how many configs it holds."""
    configs = read_tuned_configs(path)
    TUNED_CONFIGS.update(configs)
    return len(configs)

_TARGET_PROGRAMS = 1024  # enough resident programs to keep every SM's loads in flight (132 SMs on an H200)
H200_SMS = 132
# The one-row heuristic's config holds 128 registers a thread (python -m bench.sass): 16 warps in an SM's 64K.
_MMA_HEURISTIC = MmaConfig(tiles=2, warps=2, groups=2)
_MMA_HEURISTIC_WARPS_PER_SM = 16


def gemv_config(kernel: str, n: int, k: int, sms: int = H200_SMS) -> GemvConfig | MmaConfig:
    """The config for ``kernel`` ("mma": the tensor-core kernel for one row, "mma-rows": for 2 … 16, or "dot": the
    dot kernel) on an ``[n, k]`` weight: the measured one, else a heuristic (for a GPU of ``sms`` multiprocessors;
    for "mma-rows", the one-row kernel's config)."""
    tuned = TUNED_CONFIGS.get((kernel, n, k))
    if tuned is not None:
        return tuned
    if kernel == "mma-rows":
        return gemv_config("mma", n, k, sms)
    n_groups = k // BLOCK_SIZE
    splits = 1
    if kernel == "mma":
        return dataclasses.replace(_MMA_HEURISTIC, splits=_one_wave_splits(n, n_groups, sms))
    block_n, groups, num_warps, num_stages = 64, 1, 4, 2
    n_tiles = triton.cdiv(n_groups, groups)
    while triton.cdiv(n, block_n) * splits * 2 <= _TARGET_PROGRAMS and splits * 2 <= n_tiles // 2:
        splits *= 2
    return GemvConfig(block_n=block_n, groups=groups, split_k=splits, num_warps=num_warps, num_stages=num_stages)


@functools.cache  # gemv_config runs at every launch; this loops over K's groups
def _one_wave_splits(n: int, n_groups: int, sms: int) -> int:
    """K splits (of at least two groups each) for the one-row heuristic config: the most whose programs still fit in
    one wave, or one when the row blocks alone fill a wave: the H200 sweeps favour this config for the large shapes,
    and a full wave over a wave and a bit (docs/performance.md, "Measurements behind the code")."""
    blocks = triton.cdiv(n, _MMA_HEURISTIC.rows)
    wave = sms * _MMA_HEURISTIC_WARPS_PER_SM // _MMA_HEURISTIC.warps  # programs that fit at once: 1056 on an H200
    splits = 1
    for asked in range(2, n_groups // 2 + 1):
        made = triton.cdiv(n_groups, triton.cdiv(n_groups, asked))  # the splits row_split makes of it
        if blocks * made <= wave:
            splits = max(splits, made)
    return splits
