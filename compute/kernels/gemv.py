"""Fused INT4 dequantize-and-multiply for few rows (decode): ``out = x @ dequantize(qweight, scales).T + bias``.

The weight is read once, packed, and never written back as bf16. Two Triton kernels share one unpacking
trick and one wrapper, ``int4_gemv``:

* ``_gemv_fma_kernel`` for a single row of ``x`` (batch-1 decode): CUDA-core FMAs, fp32 accumulation, on ``x``
  in the form the loop consumes (the row *operand*, below), written by ``row_operand`` or by the kernel that
  produces ``x`` (``store_operand``).
* ``_gemv_dot_kernel`` for a few rows (2 ... ``GEMV_MAX_ROWS`` in the dispatcher): tensor-core dots on
  16-row blocks of ``x``, fp32 accumulation.

Operands, as the kernels see them:

    x        [M, K]       bf16 or fp16, unit stride along K, row stride ``stride_xm`` (the dot kernel)
    operand  [9, K / 8]   fp32, contiguous: the one row of x, pre-scaled per position (the row kernel)
    words    [N, K / 8]   int32: the uint8 ``qweight [N, K / 2]`` viewed as little-endian int32, contiguous
    scales   [N, K / 128] bf16, contiguous: one scale per 128-element group
    bias     [N] or absent
    out      [M, N]       x's dtype; with split-K > 1, fp32 partial sums [split, M, N] (then summed)

Why the float trick: converting each nibble with an integer-to-float instruction is what limits a plain
INT4 GEMV on Hopper (those conversions issue at a quarter of the FMA rate, two per weight byte). Instead,
every nibble is first turned into offset binary ``u = q + 8`` (one XOR per 32-bit word), shifted to
mantissa bit ``L`` and OR-ed with the bits of 1.0, giving the float ``f = 1 + u * 2**(L - 23)`` exactly, with
integer ops only (``_landed_float``). The FMA kernel lands three nibbles of a word at bit 12 and five at
bit 16 (four shifts per word: each serves two nibbles) and pre-scales ``x`` to match, so that
``x * q / 16 = (128 x) * f - 128.5 x`` (bit 12) or ``(8 x) * f - 8.5 x`` (bit 16): one FMA per nibble, the
offsets being per-position terms shared by every row of the tile. The dot kernel lands every nibble at
bit 19, where ``f - 1.5 = q / 16`` is exact in bf16. Products are exact in fp32, and the cancellation
against the offsets costs about 8 of fp32's 24 bits, far below the bf16 output's rounding.

The row operand holds those per-position factors ready: plane ``e`` (0 … 7) is element ``8i + e`` of every word
slot ``i``, times 128 (``e`` = 0, 2, 4) or 8, and plane 8 is the slot's offset ``-(128.5 (x0 + x2 + x4) + 8.5
(x1 + x3 + x5 + x6 + x7))``. Made inside the loop, these cost a third of its instructions (conversions and
products on every thread that shares a slot; 9.4 SASS instructions per weight byte with Triton 3.6 against 6.1
for the operand's loop, ``python -m bench.sass``); made once per row by the kernel that produces ``x``, they are
nearly free.

Element ``8i + e`` of a row sits in word ``i`` at bit ``8 * (e // 2) + (4 if e is even else 0)``: byte
``j`` holds element ``2j`` in its high nibble (``quantizer/format.py``). The kernels take the eight positions
of every word separately, matched by the operand's planes (the FMA kernel) or by loads of ``x`` at stride 8 (the
dot kernel), so nothing is ever interleaved.

On Hopper and later the one-row GEMV on an operand uses programmatic dependent launch (``early_launch``): the
kernel that writes the operand signals at its start (``griddepcontrol.launch_dependents``), so the GEMV's programs
launch while it runs, load their first weight tile, and only then wait for it (``griddepcontrol.wait``) before
they read the operand or write anything. A chain of small launches (ten a layer in the decode step) then no longer
pays each GEMV's launch and first-load latency in full. ``SPILLOVER_EARLY_LAUNCH=0`` turns it off.

The kernels allocate nothing whose size depends on data and never synchronise with the host, so a call can
be captured in a CUDA graph. Configs are chosen by ``gemv_configs.gemv_config`` from a table measured on the
H200 (see docs/kernels.md); nothing is autotuned at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from compute.kernels.gemv_configs import GemvConfig, gemv_config
from quantizer.format import BLOCK_SIZE

DOT_BLOCK_M = 16  # rows of x per program in the dot kernel: the smallest tensor-core tile

# 0x88888888 as a signed int32 (a Python literal above 2**31 would make Triton widen the words to int64):
# XOR-ing a word with it adds 8 to each two's complement nibble, modulo 16, giving offset binary.
_OFFSET_BINARY_XOR = tl.constexpr(-0x77777778)
_UNIT_FLOAT_BITS = 0x3F800000  # 1.0f, a kernel argument (see _landed_float)


@triton.jit
def _landed_float(words, NIBBLE_BIT: tl.constexpr, LAND_BIT: tl.constexpr, one_bits):
    """int32 words in offset binary -> fp32 ``1 + u * 2**(LAND_BIT - 23)`` for the nibble at ``NIBBLE_BIT``.

    One shift (none when the nibble already sits at LAND_BIT; the same shift serves two nibbles) and one
    mask-and-OR (a single LOP3): the nibble becomes four mantissa bits under the exponent of 1.0.
    ``one_bits`` is 0x3F800000, passed at run time: as a compile-time constant it made ptxas keep 1.0 as
    the LOP3's immediate and rematerialise both masks in registers, ~20% more instructions in the loop.
    """
    if NIBBLE_BIT < LAND_BIT:
        moved = words << (LAND_BIT - NIBBLE_BIT)
    elif NIBBLE_BIT > LAND_BIT:
        moved = words >> (NIBBLE_BIT - LAND_BIT)
    else:
        moved = words
    return ((moved & (0xF << LAND_BIT)) | one_bits).to(tl.float32, bitcast=True)


OPERAND_PLANES = 9  # rows of the one-row GEMV's operand: eight pre-scaled positions and the offset
_EARLY_LAUNCH = os.environ.get("SPILLOVER_EARLY_LAUNCH", "1") != "0"


def early_launch(device: torch.device) -> bool:
    """Whether GEMVs on ``device`` launch early, overlapping the kernel that writes their operand (module docstring):
    CUDA devices of compute capability 9 and later, unless ``$SPILLOVER_EARLY_LAUNCH`` is 0."""
    return _EARLY_LAUNCH and device.type == "cuda" and _hopper_or_later(device.index)


@functools.cache
def _hopper_or_later(index: int | None) -> bool:  # asked at every launch of the decode step's kernels
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def signal_dependents(SIGNAL: tl.constexpr):
    """For a kernel that writes a GEMV's operand: let the GEMV, launched next, start now (``early_launch``)."""
    if SIGNAL:
        gdc_launch_dependents()


@triton.jit
def store_operand(operand_ptr, x, word0, KW, WORDS: tl.constexpr):
    """Write ``x``, fp32 ``[WORDS * 8]`` (elements ``8 * word0 …`` of the row, each a bf16/fp16 value), into the row
    operand ``[OPERAND_PLANES, KW]``; words from ``KW`` on are not written. For the kernel that produces the row."""
    v = tl.reshape(x, (WORDS, 8))
    e = tl.arange(0, 8)
    at_bit12 = ((e % 2) == 0) & (e < 6)  # elements 0, 2, 4 land at bit 12, the others at bit 16 (module docstring)
    scaled = v * tl.where(at_bit12, 128.0, 8.0)[None, :]
    offset = -tl.sum(v * tl.where(at_bit12, 128.5, 8.5)[None, :], axis=1)
    w = word0 + tl.arange(0, WORDS)
    live = w < KW
    tl.store(operand_ptr + e[None, :] * KW + w[:, None], scaled, mask=live[:, None])
    tl.store(operand_ptr + 8 * KW + w, offset, mask=live)


@triton.jit
def _operand_kernel(x_ptr, operand_ptr, KW, WORDS: tl.constexpr, SIGNAL: tl.constexpr):
    signal_dependents(SIGNAL)
    word0 = tl.program_id(0) * WORDS
    cols = word0 * 8 + tl.arange(0, WORDS * 8)
    x = tl.load(x_ptr + cols, mask=cols < KW * 8, other=0.0).to(tl.float32)
    store_operand(operand_ptr, x, word0, KW, WORDS)


@triton.jit
def _load_tile(w_ptrs, s_ptrs, g0, g, KG, EVEN_K: tl.constexpr):
    """Words [BLOCK_N, GROUPS, 16] and scales [BLOCK_N, GROUPS] of the K step starting at group g0."""
    if EVEN_K:
        return tl.load(w_ptrs + g0 * 16), tl.load(s_ptrs + g0)
    live = (g0 + g) < KG
    words = tl.load(w_ptrs + g0 * 16, mask=live[None, :, None], other=0)
    return words, tl.load(s_ptrs + g0, mask=live[None, :], other=0.0)


@triton.jit
def _load_plane(ptrs, plane: tl.constexpr, KW: tl.constexpr, live, EVEN_K: tl.constexpr):
    """One plane of the row operand's [GROUPS, 16] slots; slots of groups past the end of K read as zeros."""
    if EVEN_K:
        return tl.load(ptrs + plane * KW)
    return tl.load(ptrs + plane * KW, mask=live, other=0.0)


# Integer arguments Triton would otherwise specialise on (divisibility by 16) without any gain: one compiled
# kernel per config then serves every shape. The dot kernel's KW and x row stride stay specialised: they align
# the loads (the row kernel takes KW as a compile-time constant).
_RUNTIME_INTS = ["M", "N", "KG", "stride_om", "stride_os", "n_tiles", "tiles_per_split", "one_bits"]


@triton.jit(do_not_specialize=[a for a in _RUNTIME_INTS if a not in ("M", "stride_om")])
def _gemv_fma_kernel(
    operand_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    N, KG, stride_os, n_tiles, tiles_per_split, one_bits,
    KW: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr,
):
    """The row operand times BLOCK_N weight rows, over this program's share of K.

    Each loop step loads a [BLOCK_N, GROUPS, 16] tile of words (GROUPS * 64 bytes of each row) and the matching
    [GROUPS, 16] slots of the operand's nine planes. With PREFETCH the next step's words and scales are loaded
    before this step's arithmetic, so their latency overlaps it. With SPLIT the program writes fp32 partial sums
    to slice ``pid_k`` of ``out`` (``[split, 1, N]``). KW, words per weight row, is the operand's plane stride: as
    a constant, the nine plane loads share one address. With EARLY (launched early, ``early_launch``) the program
    waits for the kernel before it once its first weight loads are issued (with PREFETCH) or at once, and before
    it reads the operand or writes anything.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = tl.minimum(rows, N - 1)  # clamped so that loads need no mask; the store is masked
    g = tl.arange(0, GROUPS)
    i = tl.arange(0, 16)
    word_in_tile = g[:, None] * 16 + i[None, :]  # (GROUPS, 16)
    w_ptrs = w_ptr + rows_in.to(tl.int64)[:, None, None] * KW + word_in_tile[None, :, :]
    s_ptrs = s_ptr + rows_in.to(tl.int64)[:, None] * KG + g[None, :]

    # Per word slot, the sum over K steps of scale * sum_e(x_e * q_e) / 16; reduced across slots only once,
    # after the loop, so that the loop holds no shuffles or barriers.
    acc = tl.zeros((BLOCK_N, GROUPS, 16), dtype=tl.float32)
    t_begin = pid_k * tiles_per_split
    if PREFETCH:
        next_words, next_scales = _load_tile(w_ptrs, s_ptrs, t_begin * GROUPS, g, KG, EVEN_K)
    if EARLY:
        gdc_wait()  # the operand is written and the kernel before this one is done
    # The last split's share may run past the end of K: the operand reads as zeros there (EVEN_K is off then),
    # so whatever words are loaded contribute nothing.
    for step in range(tiles_per_split):
        t = t_begin + step
        g0 = t * GROUPS
        if PREFETCH:
            words, scales = next_words, next_scales
            # Clamped to the last tile, so the final iteration's prefetch stays inside the weight.
            g_next = tl.minimum(t + 1, n_tiles - 1) * GROUPS
            next_words, next_scales = _load_tile(w_ptrs, s_ptrs, g_next, g, KG, EVEN_K)
        else:
            words, scales = _load_tile(w_ptrs, s_ptrs, g0, g, KG, EVEN_K)
        words = words ^ _OFFSET_BINARY_XOR
        # Element e of a word is the nibble at bit 8 * (e // 2) + 4 * (1 - e % 2). Elements 0, 2, 4 land at
        # bit 12 (f = 1 + u / 2048), the others at bit 16 (f = 1 + u / 128); the operand is scaled to match, so
        # that x * q / 16 = (128 x) * f - 128.5 x at bit 12 and (8 x) * f - 8.5 x at bit 16 (module docstring).
        planes = operand_ptr + g0 * 16 + word_in_tile
        live = ((g0 + g) < KG)[:, None]
        x0 = _load_plane(planes, 0, KW, live, EVEN_K)
        x1 = _load_plane(planes, 1, KW, live, EVEN_K)
        x2 = _load_plane(planes, 2, KW, live, EVEN_K)
        x3 = _load_plane(planes, 3, KW, live, EVEN_K)
        x4 = _load_plane(planes, 4, KW, live, EVEN_K)
        x5 = _load_plane(planes, 5, KW, live, EVEN_K)
        x6 = _load_plane(planes, 6, KW, live, EVEN_K)
        x7 = _load_plane(planes, 7, KW, live, EVEN_K)
        offset = _load_plane(planes, 8, KW, live, EVEN_K)
        slot = (
            offset[None, :, :]
            + _landed_float(words, 4, 12, one_bits) * x0[None, :, :]
            + _landed_float(words, 12, 12, one_bits) * x2[None, :, :]
            + _landed_float(words, 20, 12, one_bits) * x4[None, :, :]
            + _landed_float(words, 0, 16, one_bits) * x1[None, :, :]
            + _landed_float(words, 8, 16, one_bits) * x3[None, :, :]
            + _landed_float(words, 16, 16, one_bits) * x5[None, :, :]
            + _landed_float(words, 28, 16, one_bits) * x6[None, :, :]
            + _landed_float(words, 24, 16, one_bits) * x7[None, :, :]
        )  # (BLOCK_N, GROUPS, 16): sum_e x_e * q_e / 16 of each word
        acc += slot * scales.to(tl.float32)[:, :, None]
    acc = 16.0 * tl.sum(tl.sum(acc, axis=2), axis=1)

    if HAS_BIAS:  # never with SPLIT: _split_sum_kernel adds the bias then
        acc += tl.load(b_ptr + rows_in).to(tl.float32)
    out_ptrs = out_ptr + pid_k.to(tl.int64) * stride_os + rows
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv_dot_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr,
    M, N, KW, KG, stride_xm, stride_om, stride_os, n_tiles, tiles_per_split, one_bits,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """BLOCK_M rows of x (program axis 2) times BLOCK_N weight rows, over this program's share of K.

    Per 128-element group: eight tensor-core dots of [BLOCK_M, 16] x [16, BLOCK_N], one per nibble
    position, on the exact values ``1 + u / 16`` in x's dtype; the group's scale is applied in fp32.
    DOT_IN_FP32 widens both operands (exactly) for the Triton interpreter, whose bf16 dot is wrong.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m_in = tl.minimum(rows_m, M - 1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = tl.minimum(rows, N - 1)
    i = tl.arange(0, 16)
    w_ptrs = w_ptr + rows_in.to(tl.int64)[:, None] * KW + i[None, :]  # (BLOCK_N, 16)
    s_ptrs = s_ptr + rows_in.to(tl.int64) * KG  # (BLOCK_N,)
    x_ptrs = x_ptr + rows_m_in.to(tl.int64)[:, None] * stride_xm + i[None, :] * 8  # (BLOCK_M, 16)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * tiles_per_split
    for step in range(tiles_per_split):  # groups past the end of K read as zeros
        t = t_begin + step
        for gg in tl.static_range(GROUPS):
            kg = t * GROUPS + gg
            if EVEN_K:
                words = tl.load(w_ptrs + kg * 16)
                scales = tl.load(s_ptrs + kg)
            else:
                # Tensor masks: a group past the end of K reads as zeros (zero scale, zero x).
                words = tl.load(w_ptrs + kg * 16, mask=(kg * 16 + i[None, :]) < KW, other=0)
                scales = tl.load(s_ptrs + kg, mask=tl.full((BLOCK_N,), kg, tl.int32) < KG, other=0.0)
            words = words ^ _OFFSET_BINARY_XOR
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for e in tl.static_range(8):
                if EVEN_K:
                    xe = tl.load(x_ptrs + kg * 128 + e)
                else:
                    xe = tl.load(x_ptrs + kg * 128 + e, mask=(kg * 16 + i[None, :]) < KW, other=0.0)
                # q / 16 = f - 1.5, exact in bf16 and fp16 (four fractional bits)
                q16 = _landed_float(words, 8 * (e // 2) + 4 * (1 - e % 2), 19, one_bits) - 1.5
                if DOT_IN_FP32:
                    part = tl.dot(xe.to(tl.float32), tl.trans(q16), part, input_precision="ieee")
                else:
                    part = tl.dot(xe, tl.trans(q16.to(xe.dtype)), part)
            acc += part * scales.to(tl.float32)[None, :]
    acc = 16.0 * acc

    if HAS_BIAS:  # never with SPLIT: _split_sum_kernel adds the bias then
        acc += tl.load(b_ptr + rows_in).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k.to(tl.int64) * stride_os + rows_m.to(tl.int64)[:, None] * stride_om + rows[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows_m[:, None] < M) & (rows[None, :] < N))


@triton.jit
def sum_partials(part_ptr, stride, offs, mask, bias_ptr, bias_offs, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The fp32 sum over SPLIT of ``part[split * stride + offs]``, in split order, plus ``bias[bias_offs]``: the
    product ``int4_gemv(partials=True)`` leaves unsummed, as every kernel that consumes it adds it up."""
    total = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLIT):
        total += tl.load(part_ptr + split * stride + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + bias_offs, mask=mask, other=0.0).to(tl.float32)
    return total


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out [M, N] = sum over SPLIT of part [SPLIT, M, N] (fp32) + bias [N], in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = sum_partials(part_ptr, MN, offs, mask, b_ptr, offs % N, SPLIT, HAS_BIAS)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


_SUM_BLOCK = 1024  # output elements per program of _split_sum_kernel


@dataclasses.dataclass(frozen=True)
class RowOperand:
    """One row of ``x`` in the form the one-row GEMV's loop consumes (module docstring), made by ``row_operand`` or
    by the kernel that produces the row (``store_operand``); ``dtype`` is the row's, and the product's."""

    planes: torch.Tensor  # fp32 [OPERAND_PLANES, K / 8], contiguous
    dtype: torch.dtype

    @property
    def in_features(self) -> int:
        return self.planes.shape[1] * 8

    @staticmethod
    def empty(in_features: int, dtype: torch.dtype, device: torch.device | str) -> RowOperand:
        """An unwritten operand for a row of ``in_features``, for a producer kernel to fill."""
        return RowOperand(torch.empty((OPERAND_PLANES, in_features // 8), dtype=torch.float32, device=device), dtype)


_OPERAND_WORDS = 128  # words (1024 elements) of the row per program of _operand_kernel


def row_operand(x: torch.Tensor) -> RowOperand:
    """The one-row GEMV's operand for ``x`` ([1, K] or [K], bf16 or fp16, unit stride), in one launch."""
    k = x.shape[-1]
    operand = RowOperand.empty(k, x.dtype, x.device)
    _operand_kernel[(triton.cdiv(k // 8, _OPERAND_WORDS),)](
        x, operand.planes, k // 8, WORDS=_OPERAND_WORDS, SIGNAL=early_launch(x.device), num_warps=4
    )
    return operand


def split_plan(n_groups: int, cfg: GemvConfig) -> tuple[int, int, int]:
    """(K steps, steps per split, splits) of a GEMV over ``n_groups`` 128-element groups with ``cfg``: at most
    ``cfg.split_k`` splits, none left without a step."""
    n_tiles = triton.cdiv(n_groups, cfg.groups)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(cfg.split_k, n_tiles)))
    return n_tiles, tiles_per_split, triton.cdiv(n_tiles, tiles_per_split)


def int4_gemv(
    x: torch.Tensor | RowOperand,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    *,
    partials: bool = False,
) -> torch.Tensor:
    """``x [M, K] @ dequantize(qweight [N, K/2], scales [N, K/128]).T + bias [N]`` -> ``[M, N]`` in x's dtype.

    The caller (``compute.kernels.int4_matmul``) has checked shapes, dtypes and alignment; ``x`` must have
    unit stride along K. One row (M == 1, or a ``RowOperand``) runs the FMA kernel, on the row's operand (made
    here, in one more launch, unless ``x`` is one already); more rows run the dot kernel.

    With ``partials`` the split-K sums are not added up here: the result is the fp32 ``[S, M, N]`` partial sums
    (S >= 1 splits; no bias, which must be None), for a consumer kernel that adds them itself, in fp32, with
    the bias, before its own work: one launch fewer, and the product is rounded once, where it is used.
    """
    if partials and bias is not None:
        raise ValueError("int4_gemv(partials=True) leaves the bias to the consumer of the partial sums")
    if isinstance(x, torch.Tensor) and x.shape[0] == 1:
        x = row_operand(x)
    if isinstance(x, RowOperand):
        m, k, dtype, device, kernel = 1, x.in_features, x.dtype, x.planes.device, "fma"
    else:
        (m, k), dtype, device, kernel = x.shape, x.dtype, x.device, "dot"
    n = qweight.shape[0]
    cfg = config or gemv_config(kernel, n, k)
    words = qweight.view(torch.int32)  # [N, K / 8]; the pool starts every qweight at a multiple of 64 bytes
    n_groups = k // BLOCK_SIZE
    n_tiles, tiles_per_split, split_k = split_plan(n_groups, cfg)
    split = split_k > 1
    # With split-K each program writes its own slice of fp32 partial sums: no zeroing, no atomics, the
    # same result on every run, and one more launch (_split_sum_kernel, or the consumer's) to add them up.
    if partials:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
    else:
        out = torch.empty((split_k, m, n) if split else (m, n), dtype=torch.float32 if split else dtype, device=device)
    common = dict(
        HAS_BIAS=bias is not None and not split,
        SPLIT=split,
        EVEN_K=n_groups % cfg.groups == 0 and n_tiles % tiles_per_split == 0,
        BLOCK_N=cfg.block_n,
        GROUPS=cfg.groups,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        # The loops are written as a * b + c for one FFMA each: asked for, not left to the default, which Triton
        # 3.10 turns off (TRITON_DEFAULT_FP_FUSION).
        enable_fp_fusion=True,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg is not None else {}),
    )
    bias_arg = bias if bias is not None else scales  # never read when HAS_BIAS is False
    stride_os = m * n  # between the partial-sum slices of different splits
    if kernel == "fma":
        early = early_launch(device)
        _gemv_fma_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
            x.planes, words, scales, bias_arg, out,
            n, n_groups, stride_os, n_tiles, tiles_per_split, _UNIT_FLOAT_BITS,
            KW=k // 8, PREFETCH=cfg.prefetch, EARLY=early,
            **common,
            **({"launch_pdl": True} if early else {}),
        )
    else:
        grid = (triton.cdiv(n, cfg.block_n), split_k, triton.cdiv(m, DOT_BLOCK_M))
        _gemv_dot_kernel[grid](
            x, words, scales, bias_arg, out,
            m, n, k // 8, n_groups, x.stride(0), n, stride_os, n_tiles, tiles_per_split, _UNIT_FLOAT_BITS,
            BLOCK_M=DOT_BLOCK_M,
            DOT_IN_FP32=x.device.type == "cpu",  # on CPU the kernels only run in the Triton interpreter
            **common,
        )
    if partials or not split:
        return out
    result = torch.empty((m, n), dtype=dtype, device=device)
    _split_sum_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
        out, bias_arg, result, m * n, n, SPLIT=split_k, HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK, num_warps=4
    )
    return result
