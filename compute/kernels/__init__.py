"""INT4 matrix multiply for the spillover-int4 format: ``y = x @ dequantize(qweight, scales).T + bias``.

Contract (docs/architecture.md): ``x`` is ``[..., K]`` (bf16 in the model), ``qweight`` uint8 ``[N, K/2]``,
``scales`` bf16 ``[N, K/128]``, ``bias`` ``[N]`` or None; the result is ``[..., N]`` in ``x``'s dtype.
The weight tensors may be views into a shared pool at any 256-byte-aligned offset; they must be contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantizer.format import dequantize


def reference_int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain torch definition: dequantize the whole weight to ``x.dtype``, then ``F.linear``."""
    weight = dequantize(qweight, scales, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequantize(qweight, scales).T + bias`` in ``x``'s dtype, choosing the fastest path for the device."""
    return reference_int4_matmul(x, qweight, scales, bias)
