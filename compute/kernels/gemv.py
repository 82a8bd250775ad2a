"""Fused INT4 dequantize-and-multiply for few rows (decode): ``out = x @ dequantize(qweight, scales).T + bias``.

The weight is read once, packed, and never written back as bf16. One wrapper, ``int4_gemv``, and three kernels:

* one row of ``x`` (batch-1 decode) or a few (up to ``gemv_mma.MAX_ROWS``: batched decode, a small draft tree), on
  CUDA devices of compute capability 8.0 on: the tensor-core kernel of ``gemv_mma`` (Gluon), on ``x`` in the form
  its loop consumes, the row *operand* (below), which reads every weight once for all the rows;
* one row elsewhere (the Triton interpreter, which runs the tests on CPU; older GPUs): ``_gemv_row_kernel``, plain
  Triton on the same operand (a program per row);
* a few rows where ``gemv_mma`` does not run: ``_gemv_dot_kernel``, tensor-core dots on 16-row blocks of ``x``,
  fp32 accumulation.

Operands, as the kernels see them:

    x        [M, K]       bf16 or fp16, unit stride along K, row stride ``stride_xm`` (the dot kernel)
    operand  ``RowOperand``: the row(s) of x, their words' elements permuted, and their groups' sums
    words    [N, K / 8]   int32: the uint8 ``qweight [N, K / 2]`` viewed as little-endian int32, contiguous
    scales   [N, K / 128] bf16, contiguous: one scale per 128-element group
    bias     [N] or absent
    out      [M, N]       x's dtype; with split-K > 1, fp32 partial sums [split, M, N] (then summed)

The row operand is what the tensor-core loop wants to load (``gemv_mma``'s docstring): the row in x's dtype with the
eight elements of every 8-element word permuted so that each lane's share of the mma's B fragment is contiguous,
and the fp32 sum of every 128-element group, which corrects for the offset the loop leaves in the weights. The
kernel that produces the row writes it (``store_operand``: ``rms_norm``, ``add_partials``, ``decode_attention``,
``silu_mul`` with ``operand=True``); ``row_operand`` makes it in one launch for a plain row.

Why the float trick in the dot kernel: converting each nibble with an integer-to-float instruction is what limits
a plain INT4 GEMV on Hopper (those conversions issue at a quarter of the FMA rate, two per weight byte). Instead,
every nibble is first turned into offset binary ``u = q + 8`` (one XOR per 32-bit word), shifted to mantissa bit
19 and OR-ed with the bits of 1.0, giving the float ``f = 1 + u / 16`` exactly, with integer ops only
(``_landed_float``), where ``f - 1.5 = q / 16`` is exact in bf16.

Element ``8i + e`` of a row sits in word ``i`` at bit ``8 * (e // 2) + (4 if e is even else 0)``: byte ``j`` holds
element ``2j`` in its high nibble (``quantizer/format.py``).

On Hopper and later the one-row GEMV launches early (``compute.kernels.pdl``): its programs start while the kernel
that writes its operand runs, load their first weights, and only then wait for it.

The kernels allocate nothing whose size depends on data and never synchronise with the host, so a call can
be captured in a CUDA graph. Configs are chosen by ``gemv_configs.gemv_config`` from a table measured on the
H200 (see docs/kernels.md); nothing is autotuned at run time.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from compute.kernels.gemv_configs import H200_SMS, GemvConfig, MmaConfig, gemv_config
from compute.kernels.gemv_mma import MAX_ROWS, gemv_mma, mma_supported
from compute.kernels.pdl import early_launch, pdl, signal_dependents, wait_for_producers
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


@triton.jit
def _stored_position(word, r):
    """Where element ``r`` of word ``word`` of a group sits in the operand's values (``gemv_mma.stored_position``)."""
    return 8 * word + 2 * ((r % 4) ^ 1) + r // 4


@triton.jit
def store_operand(values_ptr, sums_ptr, x, group0, KG, GROUPS: tl.constexpr):
    """Write ``x``, fp32 ``[GROUPS * 128]`` (groups ``group0 …`` of the row, each element a value of the row's dtype),
    into the row operand (``RowOperand``'s ``values`` and ``sums``); groups from ``KG`` on are not written. For the
    kernel that produces the row."""
    values = x.to(values_ptr.dtype.element_ty)
    # Each word's 8 elements are permuted in registers (split, then joined in stored order), so that the row is
    # written in whole 16-byte words: scattered 2-byte stores cost a one-program norm 6 us of its 7 for 5120 elements.
    # Element r = 4h + 2a + b of a word goes to 4a + 2(1 - b) + h (_stored_position); join adds its dimension last,
    # so the first joins are over a, the stored position's high bit, and the last over h.
    b0, b1 = tl.split(tl.reshape(values, (GROUPS * 16, 2, 2, 2)))  # [word, h, a] for b = 0 and 1
    b0a0_h0, b0a0_h1 = tl.split(tl.split(b0)[0])  # [word] each
    b0a1_h0, b0a1_h1 = tl.split(tl.split(b0)[1])
    b1a0_h0, b1a0_h1 = tl.split(tl.split(b1)[0])
    b1a1_h0, b1a1_h1 = tl.split(tl.split(b1)[1])
    stored = tl.join(
        tl.join(tl.join(b1a0_h0, b1a1_h0), tl.join(b0a0_h0, b0a1_h0)),
        tl.join(tl.join(b1a0_h1, b1a1_h1), tl.join(b0a0_h1, b0a1_h1)),
    )
    offsets = group0 * 128 + tl.arange(0, GROUPS * 128)
    tl.store(values_ptr + offsets, tl.reshape(stored, (GROUPS * 128,)), mask=offsets < KG * 128)
    g = group0 + tl.arange(0, GROUPS)
    sums = tl.sum(tl.reshape(values.to(tl.float32), (GROUPS, 128)), axis=1)  # the sums of the rounded values
    tl.store(sums_ptr + g, sums, mask=g < KG)


@triton.jit
def _operand_kernel(x_ptr, values_ptr, sums_ptr, KG, stride_xm, GROUPS: tl.constexpr, EARLY: tl.constexpr):
    """Groups ``program_id(0) * GROUPS …`` of row ``program_id(1)`` of x into the operand's row."""
    signal_dependents(EARLY)
    wait_for_producers(EARLY)
    group0 = tl.program_id(0) * GROUPS
    row = tl.program_id(1).to(tl.int64)
    cols = group0 * 128 + tl.arange(0, GROUPS * 128)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < KG * 128, other=0.0).to(tl.float32)
    store_operand(values_ptr + row * KG * 128, sums_ptr + row * KG, x, group0, KG, GROUPS)


@triton.jit
def _gemv_row_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, KG, groups_per_split, stride_os,
    KW: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(2)`` of the operand times BLOCK_N weight rows over the groups of split ``program_id(1)``,
    plainly: every nibble unpacked to an integer and multiplied by its x. What ``gemv_mma`` computes, where it
    cannot run (the Triton interpreter); with SPLIT, fp32 partial sums into slice ``program_id(1)`` of ``out``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    x_ptr += pid_m * KW * 8
    out_ptr += pid_m * N
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = tl.minimum(rows, N - 1)
    w = tl.arange(0, 16)
    r = tl.arange(0, 8)
    bit = 8 * (r // 2) + 4 * (1 - r % 2)  # element r of a word's nibble (quantizer/format.py)
    position = _stored_position(w[:, None], r[None, :])  # where x holds it
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for step in range(groups_per_split):
        g = pid_k * groups_per_split + step
        # The last split's share may run past the end of K: those groups read as zeros (tensor masks).
        words = tl.load(w_ptr + rows_in.to(tl.int64)[:, None] * KW + g * 16 + w[None, :],
                        mask=(g * 16 + w[None, :]) < KW, other=0)  # fmt: skip
        q = (((words[:, :, None] >> bit[None, None, :]) & 0xF) ^ 8) - 8  # (BLOCK_N, 16, 8), two's complement
        x = tl.load(x_ptr + g * 128 + position, mask=(g * 128 + position) < KW * 8, other=0.0).to(tl.float32)
        dot = tl.sum(tl.sum(q.to(tl.float32) * x[None, :, :], axis=2), axis=1)
        scale = tl.load(s_ptr + rows_in.to(tl.int64) * KG + g, mask=tl.full((BLOCK_N,), g, tl.int32) < KG, other=0.0)
        acc += dot * scale.to(tl.float32)
    if HAS_BIAS:  # never with SPLIT: _split_sum_kernel adds the bias then
        acc += tl.load(b_ptr + rows_in).to(tl.float32)
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


# Integer arguments Triton would otherwise specialise on (divisibility by 16) without any gain: one compiled
# kernel per config then serves every shape. KW and the x row stride stay specialised: they align the loads.
_RUNTIME_INTS = ["M", "N", "KG", "stride_om", "stride_os", "n_tiles", "tiles_per_split", "one_bits"]


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
    """One row of ``x`` (or a few, up to ``gemv_mma.MAX_ROWS``) in the form the tensor-core GEMV's loop consumes
    (module docstring), made by ``row_operand`` or by the kernel that produces the row (``store_operand``); its
    dtype is the rows', and the product's."""

    values: torch.Tensor  # [K] (one row) or [M, K], in the rows' dtype, each 8-element word's elements permuted
    sums: torch.Tensor  # fp32 [K / 128] or [M, K / 128]: each group's sum of the values

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def in_features(self) -> int:
        return self.values.shape[-1]

    @property
    def rows(self) -> int:
        return 1 if self.values.dim() == 1 else self.values.shape[0]

    @staticmethod
    def empty(in_features: int, dtype: torch.dtype, device: torch.device | str, rows: int | None = None) -> RowOperand:
        """An unwritten operand for a row of ``in_features`` (a multiple of 128), or for ``rows`` rows, for a
        producer kernel to fill."""
        if in_features % BLOCK_SIZE:
            raise ValueError(f"a row operand holds whole {BLOCK_SIZE}-element groups, not {in_features} elements")
        lead = () if rows is None else (rows,)
        values = torch.empty((*lead, in_features), dtype=dtype, device=device)
        sums = torch.empty((*lead, in_features // BLOCK_SIZE), dtype=torch.float32, device=device)
        return RowOperand(values, sums)


_OPERAND_GROUPS = 8  # groups (1024 elements) of the row per program of _operand_kernel


def row_operand(x: torch.Tensor) -> RowOperand:
    """The tensor-core GEMV's operand for ``x`` ([K] or [1, K]: one row; [M, K]: M rows; bf16 or fp16, unit stride
    along K, a multiple of 128), in one launch."""
    rows = 1 if x.dim() == 1 else x.shape[0]
    operand = RowOperand.empty(x.shape[-1], x.dtype, x.device, rows=None if rows == 1 else rows)
    n_groups = operand.sums.shape[-1]
    early = early_launch(x.device)
    _operand_kernel[(triton.cdiv(n_groups, _OPERAND_GROUPS), rows)](
        x, operand.values, operand.sums, n_groups, x.stride(0) if x.dim() == 2 else 0,
        GROUPS=_OPERAND_GROUPS, EARLY=early, num_warps=4, **pdl(early),
    )  # fmt: skip
    return operand


def split_plan(n_groups: int, cfg: GemvConfig) -> tuple[int, int, int]:
    """(K steps, steps per split, splits) of a dot-kernel GEMV over ``n_groups`` 128-element groups with ``cfg``: at
    most ``cfg.split_k`` splits, none left without a step."""
    n_tiles = triton.cdiv(n_groups, cfg.groups)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(cfg.split_k, n_tiles)))
    return n_tiles, tiles_per_split, triton.cdiv(n_tiles, tiles_per_split)


@functools.cache
def _multiprocessors(device: torch.device) -> int:  # asked at every launch
    if device.type != "cuda":
        return H200_SMS  # the Triton interpreter: any count will do
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_split(n_groups: int, cfg: MmaConfig) -> tuple[int, int]:
    """(groups per split, splits) of a one-row GEMV over ``n_groups`` groups with ``cfg``: at most ``cfg.splits``
    splits, none left without a group."""
    per_split = triton.cdiv(n_groups, max(1, min(cfg.splits, n_groups)))
    return per_split, triton.cdiv(n_groups, per_split)


def _takes_operand(x: torch.Tensor, config: GemvConfig | MmaConfig | None) -> bool:
    """Whether the rows ``x`` [M, K] go to the tensor-core kernel (through a ``RowOperand``): one row always (the
    portable row kernel where ``gemv_mma`` cannot run); up to ``MAX_ROWS`` on a GPU it runs on, or when a
    ``MmaConfig`` asks for it (the interpreter's tests). Others take the dot kernel."""
    m = x.shape[0]
    if m == 1 or isinstance(config, MmaConfig):
        return True
    if isinstance(config, GemvConfig) or m > MAX_ROWS:
        return False
    return x.is_cuda and mma_supported(x.device.index)


def int4_gemv(
    x: torch.Tensor | RowOperand,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | MmaConfig | None = None,
    *,
    partials: bool = False,
) -> torch.Tensor:
    """``x [M, K] @ dequantize(qweight [N, K/2], scales [N, K/128]).T + bias [N]`` -> ``[M, N]`` in x's dtype.

    The caller (``compute.kernels.int4_matmul``) has checked shapes, dtypes and alignment; ``x`` must have
    unit stride along K. One row, a ``RowOperand``, or up to ``MAX_ROWS`` rows where ``gemv_mma`` runs
    (``_takes_operand``) go to the tensor-core kernel (its portable twin in the interpreter) on the rows' operand
    (made here, in one more launch, unless ``x`` is one already); other rows run the dot kernel.

    With ``partials`` the split-K sums are not added up here: the result is the fp32 ``[S, M, N]`` partial sums
    (S >= 1 splits; no bias, which must be None), for a consumer kernel that adds them itself, in fp32, with
    the bias, before its own work: one launch fewer, and the product is rounded once, where it is used.
    """
    if partials and bias is not None:
        raise ValueError("int4_gemv(partials=True) leaves the bias to the consumer of the partial sums")
    if isinstance(x, torch.Tensor) and _takes_operand(x, config):
        x = row_operand(x)
    if isinstance(x, RowOperand):
        m, k, dtype, device, kernel = x.rows, x.in_features, x.dtype, x.values.device, "mma"
    else:
        (m, k), dtype, device, kernel = x.shape, x.dtype, x.device, "dot"
    n = qweight.shape[0]
    cfg = config or gemv_config("mma-rows" if kernel == "mma" and m > 1 else kernel, n, k, _multiprocessors(device))
    words = qweight.view(torch.int32)  # [N, K / 8]; the pool starts every qweight at a multiple of 64 bytes
    n_groups = k // BLOCK_SIZE
    if kernel == "mma":
        per_split, split_k = row_split(n_groups, cfg)
    else:
        n_tiles, tiles_per_split, split_k = split_plan(n_groups, cfg)
    split = split_k > 1
    # With split-K each program writes its own slice of fp32 partial sums: no zeroing, no atomics, the
    # same result on every run, and one more launch (_split_sum_kernel, or the consumer's) to add them up.
    if partials:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
    else:
        out = torch.empty((split_k, m, n) if split else (m, n), dtype=torch.float32 if split else dtype, device=device)
    own_bias = bias if not split else None  # with split-K, _split_sum_kernel adds the bias
    stride_os = m * n  # between the partial-sum slices of different splits
    if kernel == "mma" and device.type == "cuda" and mma_supported(device.index):
        gemv_mma(x.values, x.sums, words, scales, own_bias, out, cfg, per_split, split_k, early=early_launch(device))
    elif kernel == "mma":
        _gemv_row_kernel[(triton.cdiv(n, cfg.rows), split_k, m)](
            x.values, words, scales, own_bias if own_bias is not None else scales, out,
            n, n_groups, per_split, stride_os,
            KW=k // 8, BLOCK_N=cfg.rows, SPLIT=split, HAS_BIAS=own_bias is not None, num_warps=4,
        )  # fmt: skip
    else:
        _gemv_dot_kernel[(triton.cdiv(n, cfg.block_n), split_k, triton.cdiv(m, DOT_BLOCK_M))](
            x, words, scales, own_bias if own_bias is not None else scales, out,
            m, n, k // 8, n_groups, x.stride(0), n, stride_os, n_tiles, tiles_per_split, _UNIT_FLOAT_BITS,
            HAS_BIAS=own_bias is not None, SPLIT=split,
            EVEN_K=n_groups % cfg.groups == 0 and n_tiles % tiles_per_split == 0,
            BLOCK_M=DOT_BLOCK_M, BLOCK_N=cfg.block_n, GROUPS=cfg.groups,
            DOT_IN_FP32=x.device.type == "cpu",  # on CPU the kernels only run in the Triton interpreter
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            enable_fp_fusion=True,  # asked for, not left to the default, which Triton 3.10 turns off
        )  # fmt: skip
    if partials or not split:
        return out
    result = torch.empty((m, n), dtype=dtype, device=device)
    bias_arg = bias if bias is not None else scales  # never read when HAS_BIAS is False
    _split_sum_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
        out, bias_arg, result, m * n, n, SPLIT=split_k, HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK, num_warps=4
    )
    return result
