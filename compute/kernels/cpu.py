"""INT4 matmul on the CPU, from the weight's CPU kernel form: ``y = x @ dequantize(qweight, scales).T + bias``.

Operands: ``x`` ``[..., K]`` (bf16 in the model; fp16 and fp32 work too), ``packed`` uint8 ``[N, K/2]`` and
``scales_and_zeros`` bf16 ``[K/128, N, 2]`` as ``protocol.cpu_kernel_form.pack_for_cpu_kernel`` makes them (the
loader keeps its CPU pool in that form), ``bias`` ``[N]`` or None; the result is ``[..., N]`` in ``x``'s dtype.

The work is PyTorch's CPU INT4 kernel, ``torch.ops.aten._weight_int4pack_mm_for_cpu``: it unpacks each block of
weights into registers and multiplies there (float32 products and sums), never writing a dequantized matrix. On
the 2-core development machine it reads the one-row case at 20-40 GB/s and runs many rows about as fast per row
as a bf16 GEMM (docs/performance.md), so one path serves decode and prefill alike.
"""

from __future__ import annotations

import torch

from quantizer.format import BLOCK_SIZE

__all__ = ["cpu_int4_matmul"]


def cpu_int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the INT4 weight ``W`` held in its CPU kernel form."""
    n, half_k = packed.shape
    k = 2 * half_k
    if x.shape[-1] != k or tuple(scales_and_zeros.shape) != (k // BLOCK_SIZE, n, 2):
        raise ValueError(
            f"x [..., {x.shape[-1]}], packed {tuple(packed.shape)} and scales_and_zeros {tuple(scales_and_zeros.shape)} "
            f"do not fit: expected x [..., {k}] and scales_and_zeros {(k // BLOCK_SIZE, n, 2)}"
        )
    if x.device.type != "cpu":
        raise ValueError(f"the CPU INT4 kernel needs x on the CPU, got {x.device}")
    x2d = x.reshape(-1, k)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    if scales_and_zeros.dtype != x.dtype:
        scales_and_zeros = scales_and_zeros.to(x.dtype)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, BLOCK_SIZE, scales_and_zeros)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out.reshape(*x.shape[:-1], n)
