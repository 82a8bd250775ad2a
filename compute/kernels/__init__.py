"""INT4 matrix multiply for the spillover-int4 format: ``y = x @ dequantize(qweight, scales).T + bias``.

Contract (docs/architecture.md): ``x`` is ``[..., K]`` (bf16 in the model), ``qweight`` uint8 ``[N, K/2]``,
``scales`` bf16 ``[N, K/128]``, ``bias`` ``[N]`` or None; the result is ``[..., N]`` in ``x``'s dtype.
The weight tensors may be views into a shared pool at any 256-byte-aligned offset; they must be contiguous.

``int4_matmul`` picks the path:

* CUDA, bf16/fp16, at most ``GEMV_MAX_ROWS`` rows: the fused GEMV (``gemv.py``; up to 16 rows on tensor cores,
  ``gemv_mma.py``), which reads the packed weight once and never writes a bf16 copy; capturable in a CUDA graph.
* CUDA, more rows: dequantize into a bounded scratch, then cuBLAS (``gemm.py``).
* anything else (CPU, fp32): ``reference_int4_matmul``, plain torch.

The math of every path is held to ``quantizer.format.dequantize``; docs/kernels.md has the design and the
measured speeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compute.kernels.gemm import int4_gemm
from compute.kernels.gemv import int4_gemv
from quantizer.format import BLOCK_SIZE, dequantize

__all__ = ["GEMV_MAX_ROWS", "int4_matmul", "reference_int4_matmul"]

# Rows of x up to which the fused GEMV beats dequantize-then-cuBLAS on the H200: summed over one layer's
# Linears it is faster at 16 rows (0.50 ms against 0.66) and slower at 32 (bench/kernels.py, docs/kernels.md).
GEMV_MAX_ROWS = 16
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_WEIGHT_ALIGNMENT = 16  # bytes: the GEMV reads the packed rows as int32 words, 16 bytes per load


def reference_int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain torch definition: dequantize the whole weight to ``x.dtype``, then ``F.linear``."""
    weight = dequantize(qweight, scales, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _check_operands(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D uint8 [N, K/2] tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, half_k = qweight.shape
    k = 2 * half_k
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but qweight {tuple(qweight.shape)} holds K = {k}")
    if k % BLOCK_SIZE:
        raise ValueError(f"K = {k} is not a multiple of the block size {BLOCK_SIZE}; the weight was not quantized right")
    if tuple(scales.shape) != (n, k // BLOCK_SIZE):
        raise ValueError(f"scales must be [N, K/128] = {(n, k // BLOCK_SIZE)} for qweight {(n, half_k)}, got {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")
    if not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("qweight and scales must be contiguous (views into the pool are laid out row-major)")
    for name, t in (("qweight", qweight), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: both must be on one device")


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequantize(qweight, scales).T + bias`` in ``x``'s dtype, by the fastest path for the device."""
    _check_operands(x, qweight, scales, bias)
    if not x.is_cuda or x.dtype not in _KERNEL_DTYPES:
        return reference_int4_matmul(x, qweight, scales, bias)
    if qweight.data_ptr() % _WEIGHT_ALIGNMENT:
        raise ValueError(
            f"qweight starts at address {qweight.data_ptr():#x}, not {_WEIGHT_ALIGNMENT}-byte aligned; "
            "the pool places every tensor at a 256-byte boundary"
        )
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    rows = x2d.shape[0]
    if rows == 0:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))
    if rows <= GEMV_MAX_ROWS:
        out = int4_gemv(x2d, qweight, scales, bias)
    else:
        out = int4_gemm(x2d, qweight, scales, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])
