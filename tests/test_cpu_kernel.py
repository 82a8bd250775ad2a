"""The CPU INT4 path: the kernel form the loader packs (protocol.cpu_kernel_form), the matmul compute runs on it
(compute.kernels.cpu), and the CPU arena laid out in that form; all held to the format's plain torch reference."""

from __future__ import annotations

import pytest
import torch

from compute.int4_linear import Int4Linear
from compute.kernels import reference_int4_matmul
from compute.kernels.cpu import cpu_int4_matmul
from loader.arena import PinnedArena
from loader.layout import is_kernel_form, layout_units
from protocol.cpu_kernel_form import PACK_ROWS, pack_for_cpu_kernel
from quantizer.checkpoint import QuantizedCheckpoint, tensor_view
from quantizer.format import BLOCK_SIZE, QWEIGHT_SUFFIX, SCALES_SUFFIX, dequantize, quantize


def random_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random weight in the file form, scales spread over two decades as real layers' are."""
    w = torch.randn(n, k) * torch.logspace(-2, 0, n).unsqueeze(1)
    return quantize(w)


def reference_fp32(x, qweight, scales, bias):
    """The exact value: float32 x times the exactly dequantized weight, plus the bias."""
    return reference_int4_matmul(x.float(), qweight, scales, None if bias is None else bias.float())


SHAPES = [(16, 128), (64, 256), (128, 896), (896, 896), (96, 384), (4864 // 4, 896), (256, 4864)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_kernel_matches_the_reference(n, k, rows, with_bias):
    qweight, scales = random_weight(n, k)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16) if with_bias else None
    packed, scales_and_zeros = pack_for_cpu_kernel(qweight, scales)
    got = cpu_int4_matmul(x, packed, scales_and_zeros, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    exact = reference_fp32(x, qweight, scales, bias)
    # bf16 rounding of the output (and once more after adding the bias): 2^-9 relative each
    magnitude = (x.float().abs() @ dequantize(qweight, scales, torch.float32).abs().t()) * 2**-8 + 1e-6
    if bias is not None:
        magnitude += bias.float().abs() * 2**-8
    assert ((got.float() - exact).abs() <= magnitude).all()
    if bias is None and rows * n >= 1024:  # enough outputs for a mean to be stable
        # no farther from the exact value than the bf16 reference path (which also rounds each weight to bf16)
        plain = reference_int4_matmul(x, qweight, scales, bias).float()
        assert (got.float() - exact).abs().mean() <= (plain - exact).abs().mean() * 1.25 + 1e-6


def test_cpu_kernel_keeps_leading_dimensions_and_dtypes():
    qweight, scales = random_weight(64, 256)
    packed, scales_and_zeros = pack_for_cpu_kernel(qweight, scales)
    x = torch.randn(2, 5, 256)
    got = cpu_int4_matmul(x, packed, scales_and_zeros)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 64)
    torch.testing.assert_close(got, reference_fp32(x, qweight, scales, None), rtol=1e-4, atol=1e-4)
    assert cpu_int4_matmul(torch.randn(0, 256, dtype=torch.bfloat16), packed, scales_and_zeros).shape == (0, 64)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_int4_matmul(torch.randn(1, 128), packed, scales_and_zeros)


def test_kernel_dequantizes_as_u_minus_8_times_scale_plus_zero():
    """torch's convention, checked numerically: with a zero z the output moves by z * sum(x) (so zero 0 is ours)."""
    n, k = 64, 256
    qweight, scales = random_weight(n, k)
    packed, scales_and_zeros = pack_for_cpu_kernel(qweight, scales)
    shifted = scales_and_zeros.clone()
    shifted[..., 1] = 0.5
    x = torch.randn(3, k)
    moved = cpu_int4_matmul(x, packed, shifted) - cpu_int4_matmul(x, packed, scales_and_zeros)
    torch.testing.assert_close(moved, x.sum(1, keepdim=True).expand(3, n) * 0.5, rtol=1e-4, atol=1e-3)


def test_packing_in_pieces_gives_the_bytes_of_packing_at_once():
    n, k = PACK_ROWS * 2 + 64, 256
    qweight, scales = random_weight(n, k)
    packed, scales_and_zeros = pack_for_cpu_kernel(qweight, scales)
    q = dequantize(qweight, torch.ones_like(scales), torch.float32).to(torch.int32)  # the integers, -8..7
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q + 8, 1)
    assert torch.equal(packed, whole)
    assert torch.equal(scales_and_zeros[..., 0], scales.t()) and not scales_and_zeros[..., 1].any()


def test_pack_refuses_what_has_no_kernel_form():
    qweight, scales = random_weight(24, 128)
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_for_cpu_kernel(qweight, scales)


def test_int4_linear_runs_either_form():
    n, k = 128, 256
    qweight, scales = random_weight(n, k)
    linear = Int4Linear(k, n, bias=True, name="layer.proj")
    linear.bias.data.normal_()
    x = torch.randn(4, k, dtype=torch.bfloat16)
    linear.bind(qweight, scales)
    plain = linear(x)
    linear.bind(*pack_for_cpu_kernel(qweight, scales))
    packed = linear(x)
    exact = reference_fp32(x, qweight, scales, linear.bias)
    bound = (x.float().abs() @ dequantize(qweight, scales, torch.float32).abs().t() + linear.bias.float().abs()) * 2**-7
    assert ((packed.float() - exact).abs() <= bound).all() and ((plain.float() - exact).abs() <= bound).all()
    with pytest.raises(ValueError, match="scales"):
        linear.bind(qweight, torch.zeros(k // BLOCK_SIZE, n, 3, dtype=torch.bfloat16))


def view(arena: PinnedArena, unit, name: str) -> torch.Tensor:
    slot = unit.slot(name)
    return tensor_view(arena.unit(unit.name), slot.offset, slot.nbytes, slot.dtype, slot.shape)


def test_cpu_arena_holds_the_kernel_form(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    file_units = layout_units(checkpoint.manifest)
    kernel_units = layout_units(checkpoint.manifest, cpu_kernel_form=True)
    assert [u.name for u in file_units] == [u.name for u in kernel_units]
    file_arena = PinnedArena.load(checkpoint, file_units, pin=False, verify_checksums=True)
    expected = {
        (u.name, s.name): view(file_arena, u, s.name).clone() for u in file_units for s in u.tensors
    }
    arena = file_arena.repacked_for_cpu_kernel(kernel_units)
    try:
        for unit in kernel_units:
            scales_slots = [s for s in unit.tensors if s.name.endswith(SCALES_SUFFIX)]
            assert scales_slots and all(is_kernel_form(s) for s in scales_slots)  # every tiny Linear has the form
            for slot in scales_slots:
                linear = slot.name.removesuffix(SCALES_SUFFIX)
                qweight, scales = expected[unit.name, linear + QWEIGHT_SUFFIX], expected[unit.name, slot.name]
                want_q, want_s = pack_for_cpu_kernel(qweight, scales)
                assert torch.equal(view(arena, unit, linear + QWEIGHT_SUFFIX), want_q)
                assert torch.equal(view(arena, unit, slot.name), want_s)
                assert slot.nbytes == 2 * scales.numel() * 2
    finally:
        arena.close()


def test_compute_leaves_a_core_unless_told(monkeypatch):
    from compute.session import cpu_compute_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_compute_threads(cores=2) == 1
    assert cpu_compute_threads(cores=1) == 1
    assert cpu_compute_threads(cores=8) == 7
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_compute_threads(cores=2) == torch.get_num_threads()
