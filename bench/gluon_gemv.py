"""Prototype of the next one-row INT4 GEMV: tensor-core ``mma.m16n8k16`` with explicit layouts (Triton's Gluon).

Not used by the engine. ``python -m bench.gluon_gemv --sass`` counts its loop's SASS instructions per weight byte
without a GPU; ``python -m bench.gluon_gemv`` checks it against the torch reference and times it beside
``int4_gemv`` on the decode step's shapes (a CUDA GPU of compute capability 8 or later). As of 2026-12-02 it has
only been compiled (Triton 3.6 and 3.9): 3.05-3.88 instructions per weight byte against 6.1-6.8 for
``_gemv_fma_kernel``, and no layout conversion in the loop. Its numerics and speed are unmeasured.

Why: the FMA kernel keeps too few loads in flight (docs/kernels.md): 124 registers a thread hold an SM to 16
one-warp programs. Here a warp's 32 rows take 66 registers, and an ``mma`` does 256 multiply-adds of a nibble
and an activation per instruction where the FMA loop spends one FFMA and one LOP3 per nibble.

How, per 128-element group and 16-row tile (one warp, ``TILES`` tiles a program):

* Thread ``(g, t)`` (lane ``4g + t``) loads 16 bytes of rows ``g`` and ``g + 8``: words ``4t … 4t + 3``.
* Each word becomes four int32s of two bf16 ``128 + u`` (``u = q + 8``): a shift and one LOP3
  ``(w >> 4p) & 0x000F000F | 0x43004300`` for p = 0 … 3 (nibbles 1|5, 0|4, 3|7, 2|6 of the word), with the mask
  and 1.0's bits passed at run time so that ptxas keeps them in registers and fuses the AND and the OR.
* Joined, reshaped and permuted, those registers are already the ``mma`` A fragment (``convert_layout`` is free):
  the tile's k order is ``k = 32 i + 16 ph + 8 pl + 2 t + h`` for word ``4t + i``, pair ``p = pl + 2 ph``, half
  ``h``. The activation is read in that order (``mma_operand``), broadcast over the 8 columns of B.
* ``sum_k x_k (128 + u_k) = sum_k x_k q_k + 136 X`` with ``X`` the group's sum of x, so each tile's fp32 ``mma``
  result becomes ``scale * (c - 136 X)``.
"""

from __future__ import annotations

import collections

import click
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

_MASK = 0x000F000F  # the nibbles at bits 0 and 16
_BF16_128_PAIR = 0x43004300  # two bf16 128.0: OR-ed with a nibble in the low mantissa bits, 128 + u exactly
# Element of a word (8 nibbles, element e at bit 8 * (e // 2) + 4 * (1 - e % 2)) in each half of pair p.
_PAIR_ELEMENTS = ((1, 5), (0, 4), (3, 7), (2, 6))


@gluon.jit
def _pair(words, SHIFT: gl.constexpr, mask, one):
    """Words -> bf16 [.., 2]: the two nibbles at bits SHIFT and SHIFT + 16 as 128 + u, one LOP3 (and a shift)."""
    if SHIFT > 0:
        moved = words >> SHIFT
    else:
        moved = words
    packed = (moved & mask) | one
    # Two bf16 elements are one 32-bit register: the asm, two elements at a time, returns the packed word as is.
    both = gl.join(packed, packed)
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [both], dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _gemv_mma_kernel(xm_ptr, xsum_ptr, w_ptr, s_ptr, out_ptr, N, KG, groups_per_split, mask, one,
                     KW: gl.constexpr, TILES: gl.constexpr):  # fmt: skip
    """Rows ``program_id(0) * 16 * TILES …`` over groups ``program_id(1) * groups_per_split …``: fp32 partial sums
    into ``out [splits, N]``. N a multiple of 16 * TILES and K of 128 (no masks: a prototype)."""
    BN: gl.constexpr = 16 * TILES
    words_layout: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, 1], [1, 0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, words_layout))
    j = gl.arange(0, 16, layout=gl.SliceLayout(0, words_layout))
    w_ptrs = w_ptr + rows.to(gl.int64)[:, None] * KW + j[None, :]
    out_rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    s_ptrs = s_ptr + out_rows.to(gl.int64) * KG
    k = gl.arange(0, 128, layout=gl.SliceLayout(1, b_layout))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    b_zeros = gl.zeros([128, 8], gl.bfloat16, layout=b_layout)
    acc = gl.zeros([BN, 8], gl.float32, layout=mma)
    for step in range(groups_per_split):
        group = pid_k * groups_per_split + step
        words = gl.load(w_ptrs + group * 16) ^ -0x77777778  # offset binary: u = q + 8
        halves = gl.join(
            gl.join(_pair(words, 0, mask, one), _pair(words, 4, mask, one)),
            gl.join(_pair(words, 8, mask, one), _pair(words, 12, mask, one)),
        )  # [BN, 16 (word 4t + i), 2 (h), 2 (pl), 2 (ph)]
        a = gl.reshape(halves, [BN, 4, 4, 2, 2, 2])  # (row, t, i, h, pl, ph)
        a = gl.reshape(gl.permute(a, [0, 2, 5, 4, 1, 3]), [BN, 128])  # k = 32 i + 16 ph + 8 pl + 2 t + h
        a = gl.convert_layout(a, a_layout)
        x = gl.load(xm_ptr + group * 128 + k)
        b, _ = gl.broadcast(gl.expand_dims(x, 1), b_zeros)
        c = mma_v2(a, b, gl.zeros([BN, 8], gl.float32, layout=mma))
        scale = gl.load(s_ptrs + group).to(gl.float32)
        acc += (c - 136.0 * gl.load(xsum_ptr + group)) * scale[:, None]
    # every column of the product is the same row: keep column 0
    total = gl.sum(gl.where(cols[None, :] == 0, acc, 0.0), axis=1)
    gl.store(out_ptr + pid_k.to(gl.int64) * N + out_rows, total)


def k_order() -> torch.Tensor:
    """For each k of a group's tile (0 … 127), the element of the group it multiplies (module docstring)."""
    index = torch.empty(128, dtype=torch.long)
    for k in range(128):
        h, t, pl, ph, i = k % 2, (k // 2) % 4, (k // 8) % 2, (k // 16) % 2, k // 32
        index[k] = 8 * (4 * t + i) + _PAIR_ELEMENTS[pl + 2 * ph][h]
    return index


def mma_operand(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bf16 row ``x [K]`` -> (x in each group's k order [K] bf16, each group's sum of x [K / 128] fp32)."""
    groups = x.reshape(-1, 128)
    return groups[:, k_order().to(x.device)].reshape(-1).contiguous(), groups.float().sum(1)


def gemv_mma(
    operand: tuple[torch.Tensor, torch.Tensor], qweight: torch.Tensor, scales: torch.Tensor, tiles: int = 2,
    splits: int = 1,
) -> torch.Tensor:
    """fp32 ``[splits, N]`` partial sums of ``x @ dequantize(qweight, scales).T`` by the prototype, ``operand`` being
    ``mma_operand(x)``."""
    xm, xsum = operand
    n, k = qweight.shape[0], xm.shape[0]
    groups = k // 128
    if n % (16 * tiles) or groups % splits:
        raise ValueError(f"the prototype takes N a multiple of {16 * tiles} and K / 128 of the splits (N={n}, K={k})")
    out = torch.empty((splits, n), dtype=torch.float32, device=xm.device)
    _gemv_mma_kernel[(n // (16 * tiles), splits)](
        xm, xsum, qweight.view(torch.int32), scales, out, n, groups, groups // splits, _MASK, _BF16_128_PAIR,
        KW=k // 8, TILES=tiles, num_warps=1,
    )  # fmt: skip
    return out


def emulate(operand: tuple[torch.Tensor, torch.Tensor], qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64 torch, with its tensor operations in the same order (join, reshape,
    permute): what the tile's k order and the 136 X correction give, checked without a GPU."""
    xm, xsum = operand
    words = qweight.view(torch.int32).long() & 0xFFFFFFFF
    words = words ^ 0x88888888
    n = words.shape[0]
    pairs = []
    for p in range(4):
        packed = ((words >> (4 * p)) & _MASK) | _BF16_128_PAIR
        low, high = packed & 0xFFFF, packed >> 16  # element 0 of a 32-bit register is its low half
        pairs.append(torch.stack([low, high], -1))  # gl.join
    halves = torch.stack([torch.stack(pairs[:2], -1), torch.stack(pairs[2:], -1)], -1)  # [N, KW, 2, 2, 2]
    groups = words.shape[1] // 16
    tiles = halves.reshape(n, groups, 4, 4, 2, 2, 2).permute(0, 1, 3, 6, 5, 2, 4).reshape(n, groups, 128)
    values = (tiles.to(torch.int32).to(torch.int16).view(torch.bfloat16)).double()  # 128 + u
    c = (values * xm.double().reshape(groups, 128)).sum(-1)  # [N, groups]
    return ((c - 136.0 * xsum.double()) * scales.double()).sum(-1)


def count_sass(tiles: int, k: int = 5120, capability: int = 90) -> dict:
    """The loop's SASS instructions per weight byte for ``tiles`` 16-row tiles a warp, compiled here (no GPU)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from bench.sass import disassemble, loop_opcodes

    names = _gemv_mma_kernel.arg_names
    constexprs = dict(KW=k // 8, TILES=tiles)
    pointers = {"xm_ptr": "*bf16", "xsum_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in names}
    source = GluonASTSource(
        fn=_gemv_mma_kernel, signature=signature,
        constexprs={(names.index(key),): value for key, value in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in pointers},
    )  # fmt: skip
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=1))
    opcodes = loop_opcodes(disassemble(compiled))
    bytes_per_thread = 16 * tiles * 64 / 32
    return dict(instructions=len(opcodes), per_byte=len(opcodes) / bytes_per_thread,
                opcodes=collections.Counter(opcodes).most_common())  # fmt: skip


@click.command()
@click.option("--sass", "sass_only", is_flag=True, help="Only count the loop's SASS per weight byte (no GPU).")
@click.option("--tiles", type=int, multiple=True, default=(1, 2, 4), show_default=True, help="16-row tiles a warp.")
def main(sass_only: bool, tiles: tuple[int, ...]) -> None:
    """The mma GEMV prototype: SASS per weight byte, and on a GPU its error and time beside int4_gemv."""
    for t in tiles:
        loop = count_sass(t)
        click.echo(f"{16 * t} rows a warp: {loop['instructions']} instructions per group, {loop['per_byte']:.2f} per "
                   f"weight byte  ({', '.join(f'{op} {n}' for op, n in loop['opcodes'][:8])})")  # fmt: skip
    if sass_only:
        return
    from bench.kernels import DECODE_SHAPES_32B, make_weights, time_in_graph
    from compute.kernels import reference_int4_matmul
    from compute.kernels.gemv import int4_gemv, row_operand

    for name, n, k, _, _ in DECODE_SHAPES_32B:
        weights = make_weights(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = reference_int4_matmul(x.float(), weights.qweights[0], weights.scales[0])[0]
        operand, mma_x = row_operand(x), mma_operand(x[0])
        splits = 8 if n <= 8192 else 1
        for t in tiles:
            got = gemv_mma(mma_x, weights.qweights[0], weights.scales[0], t, splits).sum(0)
            error = float((got - ref).norm() / ref.norm())
            mma_s = time_in_graph([(lambda q=q, s=s: gemv_mma(mma_x, q, s, t, splits))
                                   for q, s in zip(weights.qweights, weights.scales)])  # fmt: skip
            click.echo(f"{name:22} {16 * t:3} rows: rel err {error:.1e}, {mma_s * 1e6:7.1f} us, "
                       f"{weights.nbytes / mma_s / 1e9:5.0f} GB/s")  # fmt: skip
        fma_s = time_in_graph([(lambda q=q, s=s: int4_gemv(operand, q, s, partials=True))
                               for q, s in zip(weights.qweights, weights.scales)])  # fmt: skip
        click.echo(f"{name:22} int4_gemv: {fma_s * 1e6:7.1f} us, {weights.nbytes / fma_s / 1e9:5.0f} GB/s")
        del weights


if __name__ == "__main__":
    main()
