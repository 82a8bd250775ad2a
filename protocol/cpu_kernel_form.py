"""The form a Linear's INT4 weight takes in a CPU pool: what PyTorch's CPU INT4 matmul reads directly.

On ``device="cpu"`` the loader lays out its arena (and so its pool and ring slots) in this form once, when it
loads the model, so that the compute process multiplies with ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (the
kernel gpt-fast and torchao use) straight from the shared pool, and streaming a unit stays one plain copy. No
weight is repacked or dequantized per token.

For a Linear with ``N`` outputs and ``K`` inputs (``qweight`` uint8 ``[N, K/2]``, ``scales`` bf16 ``[N, K/128]`` in
the file, ``quantizer.format``):

* ``qweight`` becomes ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` of the unsigned nibbles ``q + 8``
  (int32 ``[N, K]``): uint8 ``[N, K/2]``, the same size, its bytes in the kernel's blocked order. That order
  depends on the CPU (64-row blocks with AVX-512, 32 with AVX2 or none), which is why it is made here, by the
  torch of this machine, and never stored in a file: both processes run on the same machine.
* ``scales`` becomes scale-and-zero pairs, bf16 ``[K/128, N, 2]``: ``[g, n, 0]`` is the scale of row ``n``'s
  group ``g``, ``[g, n, 1]`` is 0. The kernel computes ``w = (u - 8) * scale + zero`` with ``u`` the unsigned
  nibble (checked numerically against ``quantizer.format.dequantize`` by the tests), so with zero 0 this is
  exactly ``q * scale``, the format's value, with the products in float32.

A Linear whose ``N`` is not a multiple of ``KERNEL_ROW_MULTIPLE`` (the packing routine refuses it) keeps the
file form; a reader tells the two apart by the scales' rank: 3 for this form, 2 for the file's.
"""

from __future__ import annotations

import torch

from quantizer.format import BLOCK_SIZE

KERNEL_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N divisible by 16
# Rows packed at a time, bounding the int32 [rows, K] scratch: a multiple of every row block torch's packing
# uses (64 with AVX-512, 32 otherwise), so packing in pieces gives the bytes packing all at once does.
PACK_ROWS = 1024


def has_kernel_form(out_features: int, in_features: int) -> bool:
    """Whether a Linear of this shape takes the kernel form (else it keeps the file form in the pool)."""
    return out_features % KERNEL_ROW_MULTIPLE == 0 and in_features % BLOCK_SIZE == 0


def scales_and_zeros_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """``[K/128, N, 2]``: the kernel form's scales."""
    return (in_features // BLOCK_SIZE, out_features, 2)


def pack_for_cpu_kernel(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """File form (uint8 ``[N, K/2]``, bf16 ``[N, K/128]``) -> kernel form (uint8 ``[N, K/2]``, bf16 ``[K/128, N, 2]``)."""
    n, half_k = qweight.shape
    k = 2 * half_k
    if qweight.dtype != torch.uint8 or tuple(scales.shape) != (n, k // BLOCK_SIZE) or scales.dtype != torch.bfloat16:
        raise ValueError(
            f"expected qweight uint8 [N, K/2] and scales bf16 [N, K/128], got {qweight.dtype} {tuple(qweight.shape)} "
            f"and {scales.dtype} {tuple(scales.shape)}"
        )
    if not has_kernel_form(n, k):
        raise ValueError(f"a [{n}, {k}] weight has no CPU kernel form: N must be a multiple of {KERNEL_ROW_MULTIPLE}")
    packed = torch.empty_like(qweight)
    for begin in range(0, n, PACK_ROWS):
        rows = qweight[begin : begin + PACK_ROWS].to(torch.int32)
        # two's complement nibble -> q + 8 is a flip of the nibble's top bit; element 2j is the high nibble
        unsigned = torch.stack(((rows >> 4) ^ 8, (rows & 0xF) ^ 8), dim=-1).reshape(rows.shape[0], k)
        packed[begin : begin + PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    scales_and_zeros = torch.zeros(scales_and_zeros_shape(n, k), dtype=torch.bfloat16)
    scales_and_zeros[..., 0] = scales.t()
    return packed, scales_and_zeros
