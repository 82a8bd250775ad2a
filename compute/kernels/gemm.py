"""INT4 matmul for many rows (prefill): dequantize into a bounded bf16 scratch, then cuBLAS.

With hundreds of rows the work is arithmetic, not bytes: cuBLAS's bf16 tensor-core GEMM is the fastest
way to do it, and writing the weight out in bf16 first costs 2.5 bytes per weight, a small fraction of
``2 * M`` FLOPs per weight once M is in the hundreds (docs/kernels.md has the measured break-even).

``_dequant_kernel`` writes ``dequantize(qweight, scales)`` exactly as ``quantizer.format.dequantize``
defines it (``q * scale`` in fp32, rounded once to the output dtype), so this path differs from the torch
reference only by the GEMM's accumulation order. Rows are dequantized ``scratch_rows(K)`` at a time, so the
scratch never exceeds ``PREFILL_SCRATCH_BYTES`` (the largest 32B weight, the 152064-row lm_head, would need
1.5 GiB in one piece); the allocator hands the same block back on every call.

Operands: x ``[M, K]`` bf16/fp16 with unit stride along K; qweight uint8 ``[N, K/2]`` and scales bf16
``[N, K/128]``, contiguous; bias ``[N]`` or None. Result ``[M, N]`` in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantizer.format import BLOCK_SIZE

PREFILL_SCRATCH_BYTES = 128 * 2**20  # bf16 scratch per call: counted by the planner as activation memory
_DEQUANT_BLOCK_N = 16  # weight rows per dequantization program
_DEQUANT_GROUPS = 4  # 128-element groups per dequantization program

_OFFSET_BINARY_XOR = tl.constexpr(0x88)  # adds 8 to both two's complement nibbles of a byte, modulo 16
_UNIT_FLOAT_BITS = tl.constexpr(0x3F800000)  # 1.0f
_MANTISSA_NIBBLE_MASK = tl.constexpr(0x00780000)  # a nibble at mantissa bits 19..22 adds u / 16 to 1.0


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, KB, KG,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):
    """bytes [N, KB] + scales [N, KG] -> out [N, 2 * KB]: BLOCK_N rows by GROUPS groups per program.

    Nibbles become floats without integer-to-float conversions (see gemv.py): ``f = 1 + u / 16`` with
    ``u = q + 8``, so ``q = 16 f - 24`` exactly; the two nibbles of each byte are interleaved on the way out.
    """
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = tl.minimum(rows, N - 1)
    g = pid_g * GROUPS + tl.arange(0, GROUPS)
    live = g < KG
    byte_in_row = g[:, None] * 64 + tl.arange(0, 64)[None, :]  # (GROUPS, 64)
    packed = tl.load(
        w_ptr + rows_in.to(tl.int64)[:, None, None] * KB + byte_in_row[None, :, :], mask=live[None, :, None], other=0
    )
    scales = tl.load(s_ptr + rows_in.to(tl.int64)[:, None] * KG + g[None, :], mask=live[None, :], other=0.0)
    offset = packed.to(tl.int32) ^ _OFFSET_BINARY_XOR
    hi = (((offset << 15) & _MANTISSA_NIBBLE_MASK) | _UNIT_FLOAT_BITS).to(tl.float32, bitcast=True)
    lo = (((offset << 19) & _MANTISSA_NIBBLE_MASK) | _UNIT_FLOAT_BITS).to(tl.float32, bitcast=True)
    s = scales.to(tl.float32)[:, :, None]
    values = tl.interleave((16.0 * hi - 24.0) * s, (16.0 * lo - 24.0) * s)  # (BLOCK_N, GROUPS, 128)
    elem_in_row = g[:, None] * 128 + tl.arange(0, 128)[None, :]  # (GROUPS, 128)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None, None] * (2 * KB) + elem_in_row[None, :, :]
    tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty), mask=(rows < N)[:, None, None] & live[None, :, None])


def dequantize_into(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``dequantize(qweight [N, K/2], scales [N, K/128])`` into ``out`` (``[N, K]``, contiguous); return it."""
    n, kb = qweight.shape
    n_groups = kb * 2 // BLOCK_SIZE
    grid = (triton.cdiv(n, _DEQUANT_BLOCK_N), triton.cdiv(n_groups, _DEQUANT_GROUPS))
    _dequant_kernel[grid](
        qweight, scales, out, n, kb, n_groups, BLOCK_N=_DEQUANT_BLOCK_N, GROUPS=_DEQUANT_GROUPS, num_warps=4
    )
    return out


def scratch_rows(k: int) -> int:
    """Weight rows dequantized at a time for input size ``k``: as many as fit ``PREFILL_SCRATCH_BYTES``."""
    return max(_DEQUANT_BLOCK_N, PREFILL_SCRATCH_BYTES // (2 * k) // _DEQUANT_BLOCK_N * _DEQUANT_BLOCK_N)


def int4_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [M, K] @ dequantize(qweight, scales).T + bias`` -> ``[M, N]`` in x's dtype, for large M.

    The caller (``compute.kernels.int4_matmul``) has checked shapes, dtypes and contiguity.
    """
    m, k = x.shape
    n = qweight.shape[0]
    chunk = scratch_rows(k)
    scratch = torch.empty((min(n, chunk), k), dtype=x.dtype, device=x.device)  # (rows, K)
    if bias is not None:
        bias = bias.to(x.dtype)
    if n <= chunk:
        return torch.nn.functional.linear(x, dequantize_into(qweight, scales, scratch), bias)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        weight = dequantize_into(qweight[n0:n1], scales[n0:n1], scratch[: n1 - n0])
        # out[:, n0:n1] has row stride N: cuBLAS writes it in place as a matrix with a leading dimension.
        if bias is None:
            torch.mm(x, weight.t(), out=out[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x, weight.t(), out=out[:, n0:n1])
    return out
