"""Fused SwiGLU for CUDA bf16: ``silu(gate) * up`` in one kernel instead of HF's two.

HF's ``Qwen2MLP`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn = F.silu``; in bf16
each of the two ops computes in fp32 and rounds to bf16, so ``silu_mul`` does the same::

    act = (g / (1 + exp(-g))).to(bf16)     # g = gate.float(); PyTorch's silu formula
    out = (act.float() * up.float()).to(bf16)

It may differ from HF only where ``exp``'s last fp32 bit tips the first bf16 rounding (rare: an ulp or two of
the output). Operands, as the kernel sees them:

    gate     [R, n]  bf16, unit stride along n, rows ``stride_in`` apart (R = 1, n = every element, for
                     contiguous tensors of any shape; the two halves of a [R, 2 I] gate|up product are R rows of I)
    up       [R, n]  bf16, like gate
    out      [R, n]  bf16, contiguous (freshly allocated), or the down_proj GEMV's row operand

The kernel allocates nothing and never synchronises with the host, so a call can be captured in a CUDA graph.

``swiglu_mlp_forward(mlp, x)`` is ``Qwen2MLP.forward`` with the fused op on CUDA bf16 (its Linears, Int4Linears
in this engine, unchanged); anywhere else it is HF's forward, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from compute.kernels.gemv import RowOperand, store_operand
from compute.kernels.gemv_mma import MAX_ROWS
from compute.kernels.pdl import early_launch, pdl, signal_dependents, wait_for_producers

__all__ = ["reference_silu_mul", "silu_mul", "swiglu_mlp_forward"]

_BLOCK = 1024  # elements per program: the 32B model's 27648-wide decode row is 27 programs


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, sums_ptr, n, stride_in,
    BLOCK: tl.constexpr, OPERAND: tl.constexpr, EARLY: tl.constexpr,
):  # fmt: skip
    """BLOCK elements of row ``program_id(1)`` (rows ``stride_in`` apart in gate and up, n long, written densely);
    with OPERAND (rows of a multiple of 128) into the down_proj GEMV's row operand."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    wait_for_producers(EARLY)
    row = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: long prefills pass 2**31
    mask = offsets < n
    gate = tl.load(gate_ptr + row * stride_in + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_in + offsets, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16)  # F.silu's result is rounded to bf16 before the product
    out = (act.to(tl.float32) * up).to(tl.bfloat16)
    if OPERAND:
        group0 = tl.program_id(0) * (BLOCK // 128)
        store_operand(out_ptr + row * n, sums_ptr + row * (n // 128), out.to(tl.float32), group0, n // 128,
                      BLOCK // 128)  # fmt: skip
    else:
        tl.store(out_ptr + row * n + offsets, out, mask=mask)


def reference_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What HF's ``Qwen2MLP`` does between its Linears (``act_fn`` is ``F.silu`` for ``hidden_act="silu"``)."""
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, operand: bool = False) -> torch.Tensor | RowOperand:
    """``silu(gate) * up`` for bf16 tensors of one shape, by the fused kernel (CUDA tensors, or CPU ones under the
    Triton interpreter). Rows of 2-D ``gate`` and ``up`` may be strided alike (the halves of one gate|up product);
    the result is dense. With ``operand`` (one row, or up to ``gemv_mma.MAX_ROWS`` of a 2-D pair) the result is
    the next GEMV's ``RowOperand``."""
    if not (gate.dtype == torch.bfloat16 and up.dtype == torch.bfloat16):
        raise ValueError(f"silu_mul needs bf16 tensors, got gate {gate.dtype} and up {up.dtype}")
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(f"gate and up must have one shape on one device, got {tuple(gate.shape)} on {gate.device} "
                         f"and {tuple(up.shape)} on {up.device}")  # fmt: skip
    strided = gate.dim() == 2 and gate.stride(1) == 1 and up.stride(1) == 1 and gate.stride(0) == up.stride(0)
    if not strided:
        gate, up = gate.contiguous(), up.contiguous()
    rows, n = (gate.shape[0], gate.shape[1]) if strided else (1, gate.numel())
    if operand and not (n == gate.shape[-1] and n % 128 == 0 and 1 <= rows <= MAX_ROWS):
        raise ValueError(
            f"silu_mul(operand=True) takes 1 to {MAX_ROWS} rows of a multiple of 128 elements, got {tuple(gate.shape)}"
        )
    if operand:
        out = RowOperand.empty(n, gate.dtype, gate.device, rows=None if rows == 1 else rows)
    else:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if n and rows:
        early = early_launch(gate.device)
        _silu_mul_kernel[(triton.cdiv(n, _BLOCK), rows)](
            gate, up, out.values if operand else out, out.sums if operand else out, n,
            gate.stride(0) if strided else 0, BLOCK=_BLOCK, OPERAND=operand, EARLY=early, num_warps=4, **pdl(early),
        )  # fmt: skip
    return out


def swiglu_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Qwen2MLP.forward`` of ``mlp`` (a ``hidden_act="silu"`` MLP), the activation fused on CUDA bf16."""
    gate = mlp.gate_proj(x)
    up = mlp.up_proj(x)
    if gate.is_cuda and gate.dtype == torch.bfloat16 and up.dtype == torch.bfloat16:
        return mlp.down_proj(silu_mul(gate, up))
    return mlp.down_proj(mlp.act_fn(gate) * up)
