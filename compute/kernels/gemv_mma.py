"""The INT4 GEMV on tensor cores (``mma.m16n8k16``) for one row of x or a few (up to ``MAX_ROWS``), written in
Gluon, Triton's explicit-layout dialect.

``int4_gemv`` runs it for a ``RowOperand`` on CUDA devices of compute capability 8.0 and later
(``mma_supported``); elsewhere (the Triton interpreter: tests) the same operand goes to the portable kernel in
``compute.kernels.gemv``. Operands, as the kernel sees them:

    x        [K] or [M, K]  bf16 or fp16: the rows, each 8-element word's elements permuted (``stored_position``)
    sums     [K / 128] or [M, K / 128]  fp32: each group's sum of x (of the rounded values x holds)
    words    [N, K / 8]   int32: the uint8 ``qweight [N, K / 2]`` viewed as little-endian int32
    scales   [N, K / 128] bf16
    out      [M, N] in x's dtype, or fp32 partial sums [splits, M, N]

Per 128-element group and 16-row tile (one warp; a program has ``TILES`` tiles a warp and ``WARPS`` warps):

* Lane ``4g + t`` loads 16 bytes of rows ``g`` and ``g + 8``: words ``4t … 4t + 3`` of the group.
* Each word becomes four int32s holding two 16-bit floats ``M + u`` (``u = q + 8``, offset binary; ``M`` = 128 in
  bf16, 1024 in fp16), one shift and one LOP3 each: ``(w >> 4p) & 0x000F000F | bits(M, M)`` for p = 0 … 3, which
  takes elements (1, 5), (0, 4), (3, 7), (2, 6) of the word. The mask and ``M``'s bits are passed at run time so
  that ptxas keeps them in registers and fuses the AND and the OR.
* Joined, reshaped and permuted, those registers are already the ``mma``'s A fragment (the layout conversion is
  free, no shuffles): the tile's k order is ``k = 32 i + 16 ph + 8 pl + 2 t + h`` for word ``4t + i``, pair
  ``p = pl + 2 ph``, half ``h``. B is x broadcast over its 8 columns; lane ``t`` needs x at ``k = 16 s + 8 j + 2 t +
  h``, which the operand stores side by side (positions ``32 t + 4 s + 2 j + h``), so that x costs four 16-byte
  loads a group. Composed, element ``r`` of word ``w`` of a group sits at ``8 w + 2 ((r % 4) ^ 1) + r // 4``.
* With several rows of x (2 … 16), B's column ``g`` (and ``g + 8``, in a second n-tile, past 8 rows) is row ``g``
  of x instead of a copy of the one row: lane ``4g + t`` loads the same positions of row ``g``. The weights'
  loads and unpacking, the bulk of the work, serve every row, so a few rows cost little more than one.
* ``sum_k x_k (M + u_k) = sum_k x_k q_k + (M + 8) X``, ``X`` the group's sum of x (per column), so each tile's
  fp32 result becomes ``scale * (c - (M + 8) X)``; rows beyond N, rows of x beyond M and groups beyond K are read
  clamped and weighed by 0 or not stored.
* The next ``GROUPS`` groups' words and scales are loaded before this step's arithmetic, so their latency
  overlaps it; with ``EARLY`` (launched early, ``compute.kernels.pdl``) the first ones are issued before the
  program waits for the kernel that writes x, and the kernel after it may launch as soon as it starts.

Why tensor cores: an FMA loop spends a multiply-add and a LOP3 per nibble, about twice the instructions per weight
byte of this one (an ``HMMA`` does 256 multiply-adds), and the larger tiles keep 128 bytes of weights in flight a
thread (``python -m bench.sass`` counts them; docs/performance.md has the numbers).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from compute.kernels.gemv_configs import MmaConfig
from compute.kernels.pdl import pdl

__all__ = ["MAX_ROWS", "gemv_mma", "mma_supported", "stored_position"]

MAX_ROWS = 16  # rows of x one call takes: the columns of two mma tiles

_PAIR_MASK = 0x000F000F  # a nibble at bits 0 and 16 of a word
# Per x dtype: two 16-bit M side by side (OR-ed with a nibble in the low mantissa bits, M + u exactly), and M + 8.
_MAGIC = {torch.bfloat16: (0x43004300, 136.0), torch.float16: (0x64006400, 1032.0)}
_OFFSET_BINARY_XOR = gl.constexpr(-0x77777778)  # 0x88888888 as an int32: adds 8 to every two's complement nibble


def stored_position(e: torch.Tensor) -> torch.Tensor:
    """Where element ``e`` (0 … 127) of a group sits in the operand's x (module docstring)."""
    w, r = e // 8, e % 8
    return 8 * w + 2 * ((r % 4) ^ 1) + r // 4


@functools.cache
def mma_supported(index: int | None) -> bool:
    """Whether CUDA device ``index`` runs ``gemv_mma`` (bf16 ``mma.m16n8k16``: compute capability 8.0 on)."""
    return torch.cuda.get_device_capability(index)[0] >= 8


@functools.cache
def _words_layout(tiles: int, warps: int) -> gl.DistributedLinearLayout:
    """The words' layout [rows, 16]: lane 4 g + t holds words 4 t … 4 t + 3 of rows g and g + 8 of each of its
    warp's tiles, warp w the tiles at rows 16 w + 16 * warps * r: where the ``mma`` layout has those rows."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]] + [[16 * warps << r, 0] for r in range(tiles.bit_length() - 1)],
        lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << w, 0] for w in range(warps.bit_length() - 1)],
        block_bases=[],
        shape=[16 * tiles * warps, 16],
    )


@functools.cache
def _x_layout(warps: int) -> gl.DistributedLinearLayout:
    """One group of the operand's x [128]: lane 4 g + t holds positions 32 t … 32 t + 31, whatever g and warp."""
    return gl.DistributedLinearLayout(
        reg_bases=[[1], [2], [4], [8], [16]], lane_bases=[[32], [64], [0], [0], [0]],
        warp_bases=[[0]] * (warps.bit_length() - 1), block_bases=[], shape=[128],
    )  # fmt: skip


@functools.cache
def _x_rows_layout(cols: int, warps: int) -> gl.DistributedLinearLayout:
    """One group of ``cols`` rows of the operand's x [cols, 128]: lane 4 g + t holds positions 32 t … 32 t + 31 of
    row g (and g + 8): where the ``mma``'s B fragment has column g once x is permuted to the tile's k order."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]] + ([[8, 0]] if cols == 16 else []),
        lane_bases=[[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0]] * (warps.bit_length() - 1), block_bases=[], shape=[cols, 128],
    )  # fmt: skip


@gluon.jit
def _gdc_launch_dependents():
    """Let the kernel launched next start now (``griddepcontrol.launch_dependents``, ``compute.kernels.pdl``)."""
    gl.inline_asm_elementwise(
        "griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _gdc_wait():
    """Wait until the kernel before this one has finished (``griddepcontrol.wait``, ``compute.kernels.pdl``)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _pair(words, SHIFT: gl.constexpr, pair_mask, magic, FP16: gl.constexpr):
    """Words -> 16-bit floats [.., 2]: the nibbles at bits SHIFT and SHIFT + 16 as M + u, a shift and one LOP3."""
    if SHIFT > 0:
        moved = words >> SHIFT
    else:
        moved = words
    packed = (moved & pair_mask) | magic
    # Two 16-bit elements are one 32-bit register: the asm, two elements at a time, returns the packed word as is.
    both = gl.join(packed, packed)
    if FP16:
        pair = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [both], dtype=gl.float16, is_pure=True, pack=2)
    else:
        pair = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [both], dtype=gl.bfloat16, is_pure=True, pack=2)
    return pair


@gluon.jit
def _fetch(w_ptrs, s_ptrs, group, end):
    """A group's words and scales (fp32), the scales 0 for a group past ``end`` (read at ``end - 1``)."""
    at = gl.minimum(group, end - 1)
    scale = gl.load(s_ptrs + at).to(gl.float32)
    return gl.load(w_ptrs + at * 16), gl.where(group < end, scale, 0.0)


@gluon.jit
def _a_fragment(words, pair_mask, magic, BN: gl.constexpr, mma: gl.constexpr, FP16: gl.constexpr):
    """A group's words [BN, 16] -> the ``mma``'s A operand [BN, 128]: ``M + u`` in the tile's k order."""
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    words = words ^ _OFFSET_BINARY_XOR
    halves = gl.join(
        gl.join(_pair(words, 0, pair_mask, magic, FP16), _pair(words, 4, pair_mask, magic, FP16)),
        gl.join(_pair(words, 8, pair_mask, magic, FP16), _pair(words, 12, pair_mask, magic, FP16)),
    )  # [BN, 16 (word 4t + i), 2 (h), 2 (pl), 2 (ph)]
    a = gl.reshape(halves, [BN, 4, 4, 2, 2, 2])  # (row, t, i, h, pl, ph)
    a = gl.reshape(gl.permute(a, [0, 2, 5, 4, 1, 3]), [BN, 128])  # k = 32 i + 16 ph + 8 pl + 2 t + h
    return gl.convert_layout(a, a_layout)


@gluon.jit
def _group_product(words, scale, x_ptr, sums_ptr, group, pair_mask, magic, offset,
                   BN: gl.constexpr, mma: gl.constexpr, x_layout: gl.constexpr):  # fmt: skip
    """One group's contribution to the rows' sums for one row of x: fp32 [BN, 8], its 8 columns equal."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    a = _a_fragment(words, pair_mask, magic, BN, mma, dtype == gl.float16)
    x = gl.load(x_ptr + group * 128 + gl.arange(0, 128, layout=x_layout))  # positions 32 t + 4 s + 2 j + h
    x = gl.reshape(gl.permute(gl.reshape(x, [4, 8, 2, 2]), [1, 2, 0, 3]), [128])  # k = 16 s + 8 j + 2 t + h
    x = gl.convert_layout(x, gl.SliceLayout(1, b_layout))
    b, _ = gl.broadcast(gl.expand_dims(x, 1), gl.zeros([128, 8], dtype, layout=b_layout))
    c = mma_v2(a, b, gl.zeros([BN, 8], gl.float32, layout=mma))
    return (c - offset * gl.load(sums_ptr + group)) * scale[:, None]


@gluon.jit
def _group_product_rows(words, scale, x_ptr, sums_ptr, group, M, KG, pair_mask, magic, offset,
                        BN: gl.constexpr, COLS: gl.constexpr, mma: gl.constexpr, x_layout: gl.constexpr):  # fmt: skip
    """One group's contribution for up to COLS rows of x, row r of x in column r: fp32 [BN, COLS]. Columns past
    ``M`` repeat row ``M - 1`` (read clamped, never stored)."""
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    a = _a_fragment(words, pair_mask, magic, BN, mma, dtype == gl.float16)
    r = gl.minimum(gl.arange(0, COLS, layout=gl.SliceLayout(1, x_layout)), M - 1)
    p = gl.arange(0, 128, layout=gl.SliceLayout(0, x_layout))
    x = gl.load(x_ptr + r[:, None] * (KG * 128) + group * 128 + p[None, :])  # [COLS, positions 32 t + 4 s + 2 j + h]
    x = gl.reshape(gl.permute(gl.reshape(x, [COLS, 4, 8, 2, 2]), [0, 2, 3, 1, 4]), [COLS, 128])  # [COLS, k]
    b = gl.convert_layout(gl.permute(x, [1, 0]), b_layout)
    c = mma_v2(a, b, gl.zeros([BN, COLS], gl.float32, layout=mma))
    cols = gl.minimum(gl.arange(0, COLS, layout=gl.SliceLayout(0, mma)), M - 1)
    sums = gl.load(sums_ptr + cols * KG + group)
    return (c - offset * sums[None, :]) * scale[:, None]


@gluon.jit
def _gemv_mma_kernel(
    x_ptr, sums_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, KG, groups_per_split, stride_os, pair_mask, magic, offset,
    KW: gl.constexpr, TILES: gl.constexpr, WARPS: gl.constexpr, GROUPS: gl.constexpr, SPLIT: gl.constexpr,
    HAS_BIAS: gl.constexpr, EARLY: gl.constexpr, COLS: gl.constexpr, ACC_COLS: gl.constexpr,
    words_layout: gl.constexpr, x_layout: gl.constexpr,
):  # fmt: skip
    """Rows ``program_id(0) * BN …`` (BN = 16 * TILES * WARPS) times x over the groups of split ``program_id(1)``:
    one row of x broadcast over the mma's 8 columns (COLS = 0), or ``M`` rows, one a column (COLS = 8 or 16).
    With SPLIT, fp32 partial sums into slice ``program_id(1)`` of ``out``; else the product (+ bias) in out's dtype."""
    if EARLY:
        _gdc_launch_dependents()
    BN: gl.constexpr = 16 * TILES * WARPS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    first = pid_k * groups_per_split
    end = gl.minimum(first + groups_per_split, KG)
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, words_layout))
    j = gl.arange(0, 16, layout=gl.SliceLayout(0, words_layout))
    # rows past N are read clamped (no masks in the loop) and not stored
    w_ptrs = w_ptr + gl.minimum(rows, N - 1).to(gl.int64)[:, None] * KW + j[None, :]
    out_rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    s_ptrs = s_ptr + gl.minimum(out_rows, N - 1).to(gl.int64) * KG
    acc = gl.zeros([BN, ACC_COLS], gl.float32, layout=mma)
    words, scale = _fetch(w_ptrs, s_ptrs, first, end)
    if GROUPS == 2:
        words2, scale2 = _fetch(w_ptrs, s_ptrs, first + 1, end)
    if EARLY:
        _gdc_wait()  # x is written, and the kernel before this one is done
    for step in range(0, groups_per_split, GROUPS):
        group = first + step
        next_words, next_scale = _fetch(w_ptrs, s_ptrs, group + GROUPS, end)
        if GROUPS == 2:
            next_words2, next_scale2 = _fetch(w_ptrs, s_ptrs, group + GROUPS + 1, end)
        at = gl.minimum(group, end - 1)
        if COLS == 0:
            acc += _group_product(words, scale, x_ptr, sums_ptr, at, pair_mask, magic, offset, BN, mma, x_layout)
        else:
            acc += _group_product_rows(words, scale, x_ptr, sums_ptr, at, M, KG, pair_mask, magic, offset,
                                       BN, COLS, mma, x_layout)  # fmt: skip
        words, scale = next_words, next_scale
        if GROUPS == 2:
            at = gl.minimum(group + 1, end - 1)
            if COLS == 0:
                acc += _group_product(words2, scale2, x_ptr, sums_ptr, at, pair_mask, magic, offset, BN, mma,
                                      x_layout)  # fmt: skip
            else:
                acc += _group_product_rows(words2, scale2, x_ptr, sums_ptr, at, M, KG, pair_mask, magic, offset,
                                           BN, COLS, mma, x_layout)  # fmt: skip
            words2, scale2 = next_words2, next_scale2
    live = out_rows < N
    if COLS == 0:
        cols = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
        total = gl.sum(gl.where(cols[None, :] == 0, acc, 0.0), axis=1)  # the 8 columns are equal: keep one
        if SPLIT:
            gl.store(out_ptr + pid_k.to(gl.int64) * stride_os + out_rows, total, mask=live)
        else:
            if HAS_BIAS:
                total += gl.load(b_ptr + out_rows, mask=live, other=0.0).to(gl.float32)
            gl.store(out_ptr + out_rows, total.to(out_ptr.dtype.element_ty), mask=live)
    else:
        cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, mma))
        offsets = cols[None, :] * N + out_rows[:, None]  # out [M, N]: row r of x is column r here
        stored = live[:, None] & (cols < M)[None, :]
        if SPLIT:
            gl.store(out_ptr + pid_k.to(gl.int64) * stride_os + offsets, acc, mask=stored)
        else:
            if HAS_BIAS:
                acc += gl.load(b_ptr + out_rows, mask=live, other=0.0).to(gl.float32)[:, None]
            gl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=stored)


def gemv_mma(
    x: torch.Tensor, sums: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    out: torch.Tensor, cfg: MmaConfig, groups_per_split: int, splits: int, *, early: bool,
) -> None:  # fmt: skip
    """Launch the kernel on checked operands (``gemv.int4_gemv``, which splits K: ``gemv.row_split``): ``x`` is one
    row's operand values ``[K]`` (sums ``[K / 128]``) or ``M`` rows' ``[M, K]`` (sums ``[M, K / 128]``, M at most
    ``MAX_ROWS``); ``out`` is ``[splits, M, N]`` fp32 when ``splits`` > 1, else ``[M, N]``; ``early`` launches it
    early beside the kernel before."""
    n, kw = words.shape
    n_groups = kw // 16
    magic, offset = _MAGIC[x.dtype]
    m = 1 if x.dim() == 1 else x.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv_mma takes at most {MAX_ROWS} rows of x, not {m}")
    cols = 0 if x.dim() == 1 else (8 if m <= 8 else 16)
    x_layout = _x_layout(cfg.warps) if cols == 0 else _x_rows_layout(cols, cfg.warps)
    _gemv_mma_kernel[(-(-n // cfg.rows), splits)](
        x, sums, words, scales, bias if bias is not None else scales, out,
        m, n, n_groups, groups_per_split, m * n, _PAIR_MASK, magic, offset,
        KW=kw, TILES=cfg.tiles, WARPS=cfg.warps, GROUPS=cfg.groups, SPLIT=splits > 1, HAS_BIAS=bias is not None,
        EARLY=early, COLS=cols, ACC_COLS=cols or 8, words_layout=_words_layout(cfg.tiles, cfg.warps), x_layout=x_layout,
        num_warps=cfg.warps, **pdl(early),
    )  # fmt: skip
