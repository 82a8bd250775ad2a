"""Where each quantized tensor sits inside its unit: the one byte layout shared by host arena and device pool.

A *unit* (one decoder layer, or an untied ``lm_head``; see ``Manifest.units``) is the piece that is placed
and copied as one. Its bytes are the ``qweight`` of every Linear in manifest order, back to back, then, from
the next multiple of ``ALIGNMENT``, the ``scales`` of every Linear in the same order, back to back; the unit's
size is rounded up to ``ALIGNMENT`` too, so units laid back to back stay aligned. Packed back to back, the
weights of Linears that share their input and follow each other in the manifest (a layer's q/k/v
projections, its gate/up projections) form one ``[sum of N, K / 2]`` matrix and one ``[sum of N, K / 128]``
scale matrix, which the decode step multiplies in one GEMV (``compute.decode``). Every ``qweight`` starts at a
multiple of 64 bytes (a row is ``K / 2`` bytes with ``K`` a multiple of 128), which the GEMV's 16-byte loads
need; a ``scales`` tensor starts at a multiple of 2 bytes. The pinned arena (host) and the device pool use this same
layout, which is what makes moving a unit a single contiguous copy, and lets the compute process view a
tensor at ``unit base + slot.offset`` without any per-tensor bookkeeping on the wire.

``layout_units(manifest, cpu_kernel_form=True)`` is the layout of a CPU loader's arena and pool: the same order
and alignment, but every Linear that has a CPU kernel form (``protocol.cpu_kernel_form``) holds its weight in that
form: ``qweight`` the same size, ``scales`` as bf16 ``[K / 128, N, 2]`` scale-and-zero pairs, twice the bytes.

This module is pure arithmetic on the manifest: it reads no file and allocates nothing.
"""

from __future__ import annotations

import dataclasses
import math

from protocol.cpu_kernel_form import has_kernel_form, scales_and_zeros_shape
from quantizer.format import BLOCK_SIZE, QWEIGHT_SUFFIX, SCALES_SUFFIX, FormatError, Manifest

# 256 bytes keeps every tensor aligned for any dtype and for vectorized 128-byte GPU loads.
ALIGNMENT = 256

# Bytes per element of the safetensors dtypes a unit may hold.
DTYPE_BYTES: dict[str, int] = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSlot:
    """One tensor's place inside its unit."""

    name: str  # full tensor name, e.g. "model.layers.0.mlp.up_proj.qweight"
    offset: int  # bytes from the start of the unit (qweight: a multiple of 64, scales: of 2)
    nbytes: int  # the tensor's own size in bytes (unpadded)
    dtype: str  # safetensors dtype string: "U8" for qweight, "BF16" for scales
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitLayout:
    """A unit's byte layout: its tensors at aligned offsets, and its total (aligned) size."""

    name: str  # "layers.0" ... "layers.{L-1}", "lm_head"
    index: int  # position in execution order, from 0
    nbytes: int  # total bytes, a multiple of ALIGNMENT
    tensors: tuple[TensorSlot, ...]  # every Linear's qweight in manifest order, then every Linear's scales

    def slot(self, tensor_name: str) -> TensorSlot:
        for slot in self.tensors:
            if slot.name == tensor_name:
                return slot
        raise KeyError(f"unit {self.name!r} has no tensor {tensor_name!r}; it holds {[s.name for s in self.tensors]}")


def layout_units(manifest: Manifest, *, cpu_kernel_form: bool = False) -> list[UnitLayout]:
    """The layout of every unit of ``manifest``, in its execution order; with ``cpu_kernel_form``, a CPU pool's."""
    entries = {t.name: t for t in manifest.tensors}
    layouts = []
    for index, unit in enumerate(manifest.units):
        slots = []
        offset = 0
        for suffix in (QWEIGHT_SUFFIX, SCALES_SUFFIX):
            offset = align_up(offset)
            for linear in unit.linears:
                name = linear + suffix
                entry = entries.get(name)
                if entry is None:
                    raise FormatError(f"unit {unit.name!r}: tensor {name!r} is not in the manifest's tensor list")
                if entry.dtype not in DTYPE_BYTES:
                    raise FormatError(f"tensor {name!r} has dtype {entry.dtype!r}; units hold only {sorted(DTYPE_BYTES)}")
                shape = tuple(entry.shape)
                if cpu_kernel_form and suffix == SCALES_SUFFIX and has_kernel_form(shape[0], shape[1] * BLOCK_SIZE):
                    shape = scales_and_zeros_shape(shape[0], shape[1] * BLOCK_SIZE)
                nbytes = math.prod(shape) * DTYPE_BYTES[entry.dtype]
                slots.append(TensorSlot(name=name, offset=offset, nbytes=nbytes, dtype=entry.dtype, shape=shape))
                offset += nbytes
        layouts.append(UnitLayout(name=unit.name, index=index, nbytes=align_up(offset), tensors=tuple(slots)))
    return layouts


def pool_layouts(manifest: Manifest, device: str) -> list[UnitLayout]:
    """The layout of the arena and pool of a loader on ``device``: the CPU kernel form on ``"cpu"``."""
    return layout_units(manifest, cpu_kernel_form=device == "cpu")


def is_kernel_form(slot: TensorSlot) -> bool:
    """Whether ``slot`` holds scales in the CPU kernel's form (``[K / 128, N, 2]``), not the file's."""
    return slot.name.endswith(SCALES_SUFFIX) and len(slot.shape) == 3
