"""The one-row GEMV's weight reads alone, against the GEMV itself: which of the two limits it (CUDA only).

``python -m bench.loads [--json PATH]`` times, for the decode step's GEMV shapes and a few tiles, in a CUDA graph:

* ``loads``: a kernel that reads the weight as ``gemv_mma`` does (a program per ``rows`` rows and split, steps of
  ``groups`` 128-element groups, 16 bytes per thread per load, the scales too) and only XORs the words together,
  so that nothing but the reads takes time;
* ``gemv``: the GEMV with the same config, on a row operand.

If ``loads`` runs near the copy rate and ``gemv`` well below, the loop's arithmetic and latency limit the GEMV;
if ``loads`` is itself far below, the access pattern (and how many bytes a program keeps in flight) does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click
import torch
import triton
import triton.language as tl

from bench.kernels import DECODE_SHAPES_32B, make_weights, measure_copy_bandwidth, time_in_graph
from compute.kernels.gemv import int4_gemv, row_operand, row_split
from compute.kernels.gemv_configs import MmaConfig, gemv_config


@triton.jit
def _loads_kernel(w_ptr, s_ptr, out_ptr, N, KG, groups_per_split, KW: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUPS: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    g = tl.arange(0, GROUPS)
    word_in_tile = g[:, None] * 16 + tl.arange(0, 16)[None, :]
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None, None] * KW + word_in_tile[None, :, :]
    s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * KG + g[None, :]
    acc = tl.zeros((BLOCK_N, GROUPS, 16), dtype=tl.int32)
    for step in range(0, groups_per_split, GROUPS):
        g0 = tl.minimum(pid_k * groups_per_split + step, KG - GROUPS)  # the last step of an odd split reads one again
        scales = tl.load(s_ptrs + g0).to(tl.int16, bitcast=True).to(tl.int32)
        acc ^= tl.load(w_ptrs + g0 * 16) ^ scales[:, :, None]
    total = tl.reduce(acc, 2, _xor)
    total = tl.reduce(total, 1, _xor)
    tl.store(out_ptr + pid_k * N + pid_n * BLOCK_N + tl.arange(0, BLOCK_N), total)


@triton.jit
def _xor(a, b):
    return a ^ b


def loads_calls(weights, cfg: MmaConfig, n: int, k: int) -> list:
    per_split, split = row_split(k // 128, cfg)  # as int4_gemv splits K
    out = torch.empty((split, triton.cdiv(n, cfg.rows) * cfg.rows), dtype=torch.int32, device="cuda")
    grid = (triton.cdiv(n, cfg.rows), split)

    def call(q, s):
        _loads_kernel[grid](q.view(torch.int32), s, out, n, k // 128, per_split, KW=k // 8,
                            BLOCK_N=cfg.rows, GROUPS=cfg.groups, num_warps=cfg.warps)  # fmt: skip

    return [(lambda q=q, s=s: call(q, s)) for q, s in zip(weights.qweights, weights.scales)]


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench_loads.json"),
              show_default=True, help="Where to write the measurements.")  # fmt: skip
def main(json_path: Path) -> None:
    """Time the GEMV's weight reads alone beside the GEMV, per decode shape and tile."""
    copy_bw = measure_copy_bandwidth()
    click.echo(f"device->device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for name, n, k, _, partials in DECODE_SHAPES_32B:
        weights = make_weights(n, k)
        operand = row_operand(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        in_force = gemv_config("mma", n, k)
        tiles = {(in_force.tiles, in_force.warps, in_force.groups)} | {(1, 1, 1), (1, 1, 2), (2, 1, 2), (4, 1, 2), (1, 4, 2)}
        for t, warps, groups in sorted(tiles):
            cfg = dataclasses.replace(in_force, tiles=t, warps=warps, groups=groups)
            if math.ceil(n / cfg.rows) * cfg.splits < 132:
                cfg = dataclasses.replace(cfg, splits=cfg.splits * 4)
            loads = time_in_graph(loads_calls(weights, cfg, n, k), replays=10)
            gemv = time_in_graph(
                [(lambda q=q, s=s: int4_gemv(operand, q, s, None, cfg, partials=True))
                 for q, s in zip(weights.qweights, weights.scales)], replays=10,
            )  # fmt: skip
            row = dict(shape=name, n=n, k=k, config=dataclasses.asdict(cfg), in_force=cfg == in_force,
                       loads_us=loads * 1e6, loads_gbps=weights.nbytes / loads / 1e9,
                       gemv_us=gemv * 1e6, gemv_gbps=weights.nbytes / gemv / 1e9)  # fmt: skip
            rows.append(row)
            click.echo(
                f"{name:22} {cfg.rows:3} rows x {groups} groups, {warps} warp(s), split {cfg.splits:2}: loads "
                f"{row['loads_gbps']:5.0f} GB/s ({row['loads_gbps'] / copy_bw * 1e9:4.0%}), GEMV {row['gemv_gbps']:5.0f} "
                f"GB/s ({row['gemv_gbps'] / copy_bw * 1e9:4.0%}){'  <- in force' if row['in_force'] else ''}"
            )
        del weights
    json_path.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), copy_gbps=copy_bw / 1e9, rows=rows), indent=1))
    click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
