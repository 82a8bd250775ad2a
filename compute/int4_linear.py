"""``Int4Linear``: the drop-in replacement for an ``nn.Linear`` whose weight lives in the loader's pool.

The module owns only what the compute process holds itself: its shape and, where the source Linear had one,
its bf16 bias (a real parameter, loaded from the checkpoint like any other dense tensor). The quantized weight
(``qweight`` uint8 ``[out, in / 2]``, ``scales`` bf16 ``[out, in / 128]``; or, from a CPU pool, the same weight in
the CPU kernel's form, ``protocol.cpu_kernel_form``: scales ``[in / 128, out, 2]``) is *bound* for the duration of one
forward by the unit hooks in ``compute.model``: they are views into the shared pool, never copied, and they are
valid only between the unit's ``acquire`` and ``release``. Using the module while unbound is a bug in the
hooks, not a user error, and raises ``UnboundWeightError`` naming the module.

The weights are not parameters or buffers on purpose: they are not the module's state (``state_dict`` must not
contain them, ``to()`` must not move them) but a window onto memory the loader owns.
"""

from __future__ import annotations

import torch
from torch import nn

from compute.kernels import int4_matmul
from compute.kernels.cpu import cpu_int4_matmul
from protocol.cpu_kernel_form import scales_and_zeros_shape
from quantizer.format import BLOCK_SIZE


class UnboundWeightError(RuntimeError):
    """An ``Int4Linear`` ran a forward while no weight was bound to it (its unit was not acquired)."""


class Int4Linear(nn.Module):
    """``y = x @ dequantize(qweight, scales).T + bias`` with the weight bound per forward from the pool."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if in_features % BLOCK_SIZE:
            raise ValueError(
                f"{name}: in_features={in_features} is not a multiple of the INT4 block size {BLOCK_SIZE}; "
                "this Linear cannot be stored in the spillover-int4 format"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.name = name  # the module's full name, e.g. "model.layers.0.self_attn.q_proj": the tensor-name prefix
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self.qweight: torch.Tensor | None = None  # uint8 [out, in / 2], a view into the pool while bound
        self.scales: torch.Tensor | None = None  # bf16 [out, in / 128] (or [in / 128, out, 2]), a pool view while bound

    @classmethod
    def like(cls, linear: nn.Linear, *, name: str) -> "Int4Linear":
        """An unbound ``Int4Linear`` with the shape, bias presence, device and dtype of ``linear``."""
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            name=name,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def bind(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Point the module at its quantized weight for the coming forward; the tensors are used as they are."""
        expected_q = (self.out_features, self.in_features // 2)
        expected_s = (self.out_features, self.in_features // BLOCK_SIZE)
        if scales.dim() == 3 and qweight.device.type == "cpu":  # the CPU kernel's form
            expected_s = scales_and_zeros_shape(self.out_features, self.in_features)
        if tuple(qweight.shape) != expected_q or qweight.dtype != torch.uint8:
            raise ValueError(
                f"{self.name}: qweight is {qweight.dtype} {tuple(qweight.shape)}, expected torch.uint8 {expected_q}"
            )
        if tuple(scales.shape) != expected_s or scales.dtype != torch.bfloat16:
            raise ValueError(
                f"{self.name}: scales are {scales.dtype} {tuple(scales.shape)}, expected torch.bfloat16 {expected_s}"
            )
        self.qweight = qweight
        self.scales = scales

    def unbind(self) -> None:
        """Forget the views: after the unit's release the memory may already hold another unit."""
        self.qweight = None
        self.scales = None

    @property
    def is_bound(self) -> bool:
        return self.qweight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None or self.scales is None:
            raise UnboundWeightError(
                f"{self.name} ran while no weight was bound to it: its unit was not acquired from the loader "
                "(the unit hooks of compute.model bind the weights; call the model as a whole, not this module alone)"
            )
        if self.scales.dim() == 3:
            return cpu_int4_matmul(x, self.qweight, self.scales, self.bias)
        return int4_matmul(x, self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        state = "bound" if self.is_bound else "unbound"
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, {state}"
