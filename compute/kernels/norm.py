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

from compute.kernels.gemv import RowOperand, store_operand, sum_partials
from compute.kernels.gemv_mma import MAX_ROWS
from compute.kernels.pdl import early_launch, pdl, signal_dependents, wait_for_producers

__all__ = ["FusedRMSNorm", "add_partials", "add_partials_workspace", "reference_rms_norm", "rms_norm"]


@triton.jit
def _store_normed(out_ptr, sums_ptr, normed, weight_ptr, cols, mask, H, OPERAND: tl.constexpr, BLOCK_H: tl.constexpr):
    """``weight * normed`` (a bf16 product, as HF's) into the bf16 row at ``out_ptr`` or, with OPERAND, into the
    next GEMV's row operand at ``out_ptr`` and ``sums_ptr`` (a whole row: ``cols`` is 0 … BLOCK_H - 1)."""
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(tl.bfloat16)
    if OPERAND:
        store_operand(out_ptr, sums_ptr, out.to(tl.float32), 0, H // 128, BLOCK_H // 128)
    else:
        tl.store(out_ptr + cols, out, mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr, weight_ptr, out_ptr, sums_ptr, stride_x, H, eps,
    BLOCK_H: tl.constexpr, OPERAND: tl.constexpr, EARLY: tl.constexpr,
):  # fmt: skip
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    wait_for_producers(EARLY)
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride passes 2**31 for long prefills of wide models
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / H  # masked lanes are 0 and add nothing
    normed = (x * tl.rsqrt(variance + eps)).to(tl.bfloat16)  # HF rounds to the input dtype before the weight
    _store_normed(out_ptr + row * H, sums_ptr + row * (H // 128), normed, weight_ptr, cols, mask, H, OPERAND, BLOCK_H)


_ADD_BLOCK = 256  # columns per program of add_partials: 20 programs for the 32B model's 5120
_NORM_PROGRAMS = 64  # at most, with the norm: the slots of a workspace (add_partials_workspace)


@triton.jit
def _fence():
    """``fence.acq_rel.gpu`` on every thread: its writes before, everyone's reads after, ordered device-wide."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; // dummy $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _residual_add(residual_ptr, part_ptr, stride_split, bias_ptr, cols, mask, SPLIT: tl.constexpr,
                  HAS_BIAS: tl.constexpr):  # fmt: skip
    """``residual + bf16(sum of SPLIT partial rows + bias)`` at ``cols``, bf16: the Linear's output rounded as HF has
    it, then HF's residual add (bf16 + bf16, rounded once)."""
    delta = sum_partials(part_ptr, stride_split, cols, mask, bias_ptr, cols, SPLIT, HAS_BIAS)
    delta = delta.to(tl.bfloat16).to(tl.float32)
    residual = tl.load(residual_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (residual + delta).to(tl.bfloat16)


@triton.jit
def _add_partials_kernel(
    residual_ptr, part_ptr, bias_ptr, weight_ptr, hidden_ptr, normed_ptr, sums_ptr, count_ptr, squares_ptr, H, eps,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr, OPERAND: tl.constexpr, EARLY: tl.constexpr, FENCE: tl.constexpr,
):
    """One row, BLOCK columns a program: hidden = residual + bf16(sum of SPLIT partial rows + bias). With NORM also
    normed = RMSNorm(hidden) (bf16 or, with OPERAND, the next GEMV's row operand): each program leaves its columns'
    sum of squares in ``squares`` and counts itself in ``count``; the last to arrive adds the sums in program order and
    writes the whole normed row, then zeroes the count for the next call. FENCE (on a GPU) orders every thread's
    writes before the count and the last program's reads after it."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    wait_for_producers(EARLY)
    hidden = _residual_add(residual_ptr, part_ptr, H, bias_ptr, cols, mask, SPLIT, HAS_BIAS)
    tl.store(hidden_ptr + cols, hidden, mask=mask)
    if NORM:
        x = hidden.to(tl.float32)  # masked lanes are 0 and add nothing
        tl.store(squares_ptr + pid, tl.sum(x * x, axis=0))
        if FENCE:
            _fence()
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            if FENCE:
                _fence()
            tl.store(count_ptr, 0)
            p = tl.arange(0, BLOCK_P)
            squares = tl.load(squares_ptr + p, mask=p < tl.num_programs(0), other=0.0, cache_modifier=".cg")
            row = tl.arange(0, BLOCK_H)
            in_row = row < H
            whole = tl.load(hidden_ptr + row, mask=in_row, other=0.0, cache_modifier=".cg").to(tl.float32)
            normed = (whole * tl.rsqrt(tl.sum(squares, axis=0) / H + eps)).to(tl.bfloat16)
            _store_normed(normed_ptr, sums_ptr, normed, weight_ptr, row, in_row, H, OPERAND, BLOCK_H)


@triton.jit
def _add_rows_kernel(
    residual_ptr, part_ptr, bias_ptr, weight_ptr, hidden_ptr, normed_ptr, sums_ptr, stride_split, H, eps,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr, OPERAND: tl.constexpr,
    EARLY: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)`` of several, whole: what ``_add_partials_kernel`` computes for one row (the same
    arithmetic), with the norm in the same program."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    wait_for_producers(EARLY)
    hidden = _residual_add(residual_ptr + row * H, part_ptr + row * H, stride_split, bias_ptr, cols, mask, SPLIT,
                           HAS_BIAS)  # fmt: skip
    tl.store(hidden_ptr + row * H + cols, hidden, mask=mask)
    if NORM:
        x = hidden.to(tl.float32)  # masked lanes are 0 and add nothing
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)).to(tl.bfloat16)
        _store_normed(normed_ptr + row * H, sums_ptr + row * (H // 128), normed, weight_ptr, cols, mask, H, OPERAND,
                      BLOCK_H)  # fmt: skip


def add_partials_workspace(device: torch.device | str) -> torch.Tensor:
    """Zeroed scratch for ``add_partials`` with a norm, kept zeroed by it between calls: one per caller that runs
    one call at a time (a decode layer), allocated before any CUDA graph captures the calls."""
    return torch.zeros(1 + _NORM_PROGRAMS, dtype=torch.int32, device=device)


def add_partials(
    residual: torch.Tensor,
    partials: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    eps: float = 0.0,
    *,
    operand: bool = False,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | RowOperand | None]:
    """The residual add after a Linear whose split-K partial sums were left unsummed (``int4_gemv(partials=True)``),
    with the next RMSNorm fused when ``weight`` is given, for one row (the decode step) or a few (batched decode):

        delta  = bf16(partials.sum(0) + bias)       # the Linear's output, as F.linear in bf16 rounds it
        hidden = residual + delta                   # bf16, as HF's residual add
        normed = rms_norm(hidden, weight, eps)      # only with weight; else None

    ``residual`` bf16 ``[1, 1, H]`` (or any shape of H elements), ``partials`` fp32 ``[S, 1, H]``, ``bias`` and
    ``weight`` bf16 ``[H]``. Returns (hidden, normed) shaped like ``residual``, normed as the next GEMV's
    ``RowOperand`` with ``operand`` (which needs ``weight``). One launch of ``_ADD_BLOCK`` columns a program (or
    more, to stay within ``_NORM_PROGRAMS``): the partial rows of a long-K Linear are many (16 of 5120 values for
    the 32B model's down_proj), too many for one program to read fast. With the norm the programs meet in
    ``workspace`` (``add_partials_workspace``; a fresh one per call when None), which must not be shared by calls
    that may run at the same time.

    Several rows: ``residual`` contiguous ``[..., T, H]`` (T = its elements / H, at most ``gemv_mma.MAX_ROWS`` with
    ``operand``) and ``partials`` ``[S, T, H]``; one program a row, whole, norm included (no workspace).
    """
    hidden_size = residual.shape[-1]
    rows = residual.numel() // max(hidden_size, 1)
    if residual.dtype != torch.bfloat16 or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous bf16 rows, got {residual.dtype} {tuple(residual.shape)}")
    if partials.dtype != torch.float32 or partials.dim() != 3 or partials.shape[1:] != (rows, hidden_size):
        raise ValueError(
            f"partials must be fp32 [S, {rows}, {hidden_size}], got {partials.dtype} {tuple(partials.shape)}"
        )
    for name, t in (("bias", bias), ("weight", weight)):
        if t is not None and (t.dtype != torch.bfloat16 or tuple(t.shape) != (hidden_size,)):
            raise ValueError(f"{name} must be bf16 [{hidden_size}], got {t.dtype} {tuple(t.shape)}")
    if operand and (weight is None or hidden_size % 128 or rows > MAX_ROWS):
        raise ValueError(
            f"add_partials(operand=True) needs the norm's weight, H a multiple of 128 and at most {MAX_ROWS} rows "
            f"(H = {hidden_size}, {rows} rows)"
        )
    if rows > 1:
        return _add_rows(residual, partials, bias, weight, eps, rows, operand)
    if workspace is None and weight is not None:
        workspace = add_partials_workspace(residual.device)
    elif workspace is not None and (workspace.dtype != torch.int32 or workspace.numel() != 1 + _NORM_PROGRAMS):
        raise ValueError("workspace must come from add_partials_workspace")
    hidden = torch.empty_like(residual)
    # the count and the programs' sums of squares; without the norm never read (any tensor will do)
    count, squares = (workspace[:1], workspace[1:].view(torch.float32)) if workspace is not None else (hidden, hidden)
    if weight is None:
        normed = None
    else:
        normed = RowOperand.empty(hidden_size, residual.dtype, residual.device) if operand else torch.empty_like(residual)
    block = max(_ADD_BLOCK, triton.next_power_of_2(triton.cdiv(hidden_size, _NORM_PROGRAMS)))
    early = early_launch(residual.device)
    programs = triton.cdiv(hidden_size, block)
    block_h = triton.next_power_of_2(hidden_size)
    _add_partials_kernel[(programs,)](
        residual, partials.contiguous(), bias if bias is not None else residual,
        weight if weight is not None else residual, hidden,
        normed.values if operand else normed if normed is not None else hidden,
        normed.sums if operand else hidden,
        count, squares, hidden_size, eps,
        SPLIT=partials.shape[0], HAS_BIAS=bias is not None, NORM=weight is not None, BLOCK=block, BLOCK_H=block_h,
        BLOCK_P=triton.next_power_of_2(programs), OPERAND=operand, EARLY=early, FENCE=residual.is_cuda,
        num_warps=4 if block_h <= 2048 else 8, **pdl(early),
    )  # fmt: skip
    return hidden, normed


def _add_rows(residual, partials, bias, weight, eps: float, rows: int, operand: bool):
    """``add_partials`` for several rows, one program a row (``_add_rows_kernel``)."""
    hidden_size = residual.shape[-1]
    hidden = torch.empty_like(residual)
    if weight is None:
        normed = None
    elif operand:
        normed = RowOperand.empty(hidden_size, residual.dtype, residual.device, rows=rows)
    else:
        normed = torch.empty_like(residual)
    block_h = triton.next_power_of_2(hidden_size)
    early = early_launch(residual.device)
    _add_rows_kernel[(rows,)](
        residual, partials.contiguous(), bias if bias is not None else residual,
        weight if weight is not None else residual, hidden,
        normed.values if operand else normed if normed is not None else hidden,
        normed.sums if operand else hidden, rows * hidden_size, hidden_size, eps,
        SPLIT=partials.shape[0], HAS_BIAS=bias is not None, NORM=weight is not None, BLOCK_H=block_h,
        OPERAND=operand, EARLY=early, num_warps=4 if block_h <= 2048 else 8, **pdl(early),
    )  # fmt: skip
    return hidden, normed


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``Qwen2RMSNorm.forward``, line for line (transformers 5.x)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, operand: bool = False) -> torch.Tensor | RowOperand:
    """``x [..., H]`` bf16, ``weight [H]`` bf16 -> ``[..., H]`` bf16, by the fused kernel (CUDA tensors, or CPU
    ones under the Triton interpreter); with ``operand`` the next GEMV's ``RowOperand`` instead (of one row, or of
    up to ``gemv_mma.MAX_ROWS``: ``[rows, H]``)."""
    hidden = x.shape[-1]
    if not (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        raise ValueError(f"rms_norm needs bf16 tensors, got x {x.dtype} and weight {weight.dtype}")
    if tuple(weight.shape) != (hidden,) or weight.device != x.device:
        raise ValueError(f"weight must be [H] = [{hidden}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    x2d = x.reshape(-1, hidden)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    rows = x2d.shape[0]
    if operand and not (1 <= rows <= MAX_ROWS and hidden % 128 == 0):
        raise ValueError(
            f"rms_norm(operand=True) takes 1 to {MAX_ROWS} rows of a multiple of 128 elements, got {tuple(x.shape)}"
        )
    if operand:
        out = RowOperand.empty(hidden, x.dtype, x.device, rows=None if rows == 1 else rows)
    else:
        out = torch.empty((x2d.shape[0], hidden), dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        block = triton.next_power_of_2(hidden)
        early = early_launch(x.device)
        _rms_norm_kernel[(x2d.shape[0],)](
            x2d, weight.contiguous(), out.values if operand else out, out.sums if operand else out,
            x2d.stride(0), hidden, eps,
            BLOCK_H=block, OPERAND=operand, EARLY=early, num_warps=4 if block <= 2048 else 8, **pdl(early),
        )  # fmt: skip
    return out if operand else out.reshape(x.shape)


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
