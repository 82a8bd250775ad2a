"""Fused RMSNorm for CUDA bf16: one kernel for what HF's ``Qwen2RMSNorm`` does in about six.

``rms_norm(x, weight, eps)`` computes, per row of ``x``, exactly HF's arithmetic::

    normed = (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(bf16)
    out = weight * normed            # a bf16 product: fp32 multiply, rounded to bf16

so it may differ from HF only where the fp32 sum's order or ``rsqrt``'s last bit tips the first bf16 rounding
(rare: an ulp of the normalised value, an ulp or two of the output). Operands, as the kernel sees them:

    x        [R, H]   bf16, unit stride along H, row stride ``stride_x`` (R = every leading dimension of x)
    weight   [H]      bf16, contiguous
    out      [R, H]   bf16, contiguous (freshly allocated)

One program per row holds the whole row in registers (``BLOCK_H`` = H rounded up to a power of two: 8192 for
the 32B model's 5120), so ``x`` is read once and ``out`` written once. The kernel allocates nothing and never
synchronises with the host, so a call can be captured in a CUDA graph.

``FusedRMSNorm`` is the drop-in module: it holds the replaced norm's own weight Parameter and runs the kernel on
CUDA bf16, and HF's arithmetic, unchanged, anywhere else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

__all__ = ["FusedRMSNorm", "reference_rms_norm", "rms_norm"]


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, stride_x, H, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride passes 2**31 for long prefills of wide models
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / H  # masked lanes are 0 and add nothing
    normed = (x * tl.rsqrt(variance + eps)).to(tl.bfloat16)  # HF rounds to the input dtype before the weight
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(tl.bfloat16)
    tl.store(out_ptr + row * H + cols, out, mask=mask)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``Qwen2RMSNorm.forward``, line for line (transformers 5.x)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., H]`` bf16, ``weight [H]`` bf16 -> ``[..., H]`` bf16, by the fused kernel (CUDA tensors, or CPU
    ones under the Triton interpreter)."""
    hidden = x.shape[-1]
    if not (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        raise ValueError(f"rms_norm needs bf16 tensors, got x {x.dtype} and weight {weight.dtype}")
    if tuple(weight.shape) != (hidden,) or weight.device != x.device:
        raise ValueError(f"weight must be [H] = [{hidden}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    x2d = x.reshape(-1, hidden)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty((x2d.shape[0], hidden), dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2d.shape[0],)](
            x2d, weight.contiguous(), out, x2d.stride(0), hidden, eps,
            BLOCK_H=block, num_warps=4 if block <= 2048 else 8,
        )  # fmt: skip
    return out.reshape(x.shape)


class FusedRMSNorm(nn.Module):
    """``Qwen2RMSNorm`` with the fused kernel on CUDA bf16; the same attributes, the same weight Parameter."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight  # the replaced module's Parameter itself: no copy, the same storage
        self.variance_epsilon = eps

    @classmethod
    def like(cls, norm: nn.Module) -> FusedRMSNorm:
        """The fused replacement of an HF RMSNorm (anything with ``weight`` and ``variance_epsilon``)."""
        return cls(norm.weight, norm.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda and hidden_states.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return reference_rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
