"""The spillover-int4 math (quantizer/format.py) against hand-computed blocks and an independent numpy reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import numpy_quantize
from quantizer import format as fmt

BLOCK = fmt.BLOCK_SIZE


def quantize_block(values: list[float]) -> tuple[np.ndarray, float]:
    """One [1, 128] row, zero-padded: (its 128 int codes, its scale)."""
    w = torch.zeros(1, BLOCK)
    w[0, : len(values)] = torch.tensor(values)
    qweight, scales = fmt.quantize(w)
    return fmt.unpack_nibbles(qweight)[0].numpy(), scales[0, 0].item()


def random_shape(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(1, 40)), BLOCK * int(rng.integers(1, 5))


def test_zero_block_has_scale_one_and_zero_codes():
    codes, scale = quantize_block([])
    assert scale == 1.0
    assert not codes.any()


def test_single_outlier_takes_code_seven():
    codes, scale = quantize_block([0.0] * 5 + [3.5])
    assert scale == 0.5  # bf16(3.5 / 7), exact
    expected = np.zeros(BLOCK, dtype=np.int8)
    expected[5] = 7
    np.testing.assert_array_equal(codes, expected)
    packed, _ = fmt.quantize(torch.tensor([[0.0] * 5 + [3.5] + [0.0] * (BLOCK - 6)]))
    assert packed[0, 2].item() == 0x07  # byte 2 = element 4 (high nibble) and element 5 (low nibble)


def test_negative_extreme_and_rounded_scale():
    codes, scale = quantize_block([-1.0, 0.5, 1 / 7])
    assert scale == 0.142578125  # bf16(1 / 7) rounds down from 0.142857...
    np.testing.assert_array_equal(codes[:3], [-7, 4, 1])  # -1 / 0.1426 = -7.01 -> -7 ; 0.5 / 0.1426 = 3.51 -> 4


def test_ties_round_half_to_even():
    # absmax 7 gives scale exactly 1, so each value is its own quotient.
    values = [7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 6.5, -6.5]
    codes, scale = quantize_block(values)
    assert scale == 1.0
    np.testing.assert_array_equal(codes[: len(values)], [7, 0, 2, 2, 0, -2, -2, 4, 6, -6])


def test_pack_golden_bytes_for_extremes():
    q = torch.tensor([[-8, 7, -1, -8, 0, -1, 7, 0]])
    packed = fmt.pack_nibbles(q)
    assert packed.tolist() == [[0x87, 0xF8, 0x0F, 0x70]]
    np.testing.assert_array_equal(fmt.unpack_nibbles(packed).numpy(), q.numpy())


def test_pack_unpack_round_trip_on_random_codes():
    rng = np.random.default_rng()
    for _ in range(5):
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)), 2 * int(rng.integers(1, 65)))
        q = torch.from_numpy(rng.integers(-8, 8, size=shape).astype(np.int8))
        packed = fmt.pack_nibbles(q)
        assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
        assert torch.equal(fmt.unpack_nibbles(packed), q)


def test_quantize_matches_an_independent_numpy_reading():
    rng = np.random.default_rng()
    for _ in range(5):
        shape = random_shape(rng)
        magnitudes = np.exp(rng.normal(0, 2, size=(shape[0], shape[1] // BLOCK, 1)))
        w = (rng.standard_normal(shape).reshape(shape[0], -1, BLOCK) * magnitudes).reshape(shape).astype(np.float32)
        w[0, :BLOCK] = 0  # a zero block in every case
        w_bf16 = torch.from_numpy(w).to(torch.bfloat16)
        qweight, scales = fmt.quantize(w_bf16)
        expected_packed, expected_scales = numpy_quantize(w_bf16.float().numpy())
        np.testing.assert_array_equal(qweight.numpy(), expected_packed)
        np.testing.assert_array_equal(scales.float().numpy(), expected_scales)


def test_dequantized_error_is_at_most_half_a_scale():
    rng = np.random.default_rng()
    for _ in range(5):
        out_features, in_features = random_shape(rng)
        w = torch.randn(out_features, in_features) * float(np.exp(rng.normal(0, 3)))
        qweight, scales = fmt.quantize(w)
        deq = fmt.dequantize(qweight, scales, dtype=torch.float32)
        step = scales.float().repeat_interleave(BLOCK, dim=1)
        unclipped = (w / step).abs() <= 7.5
        assert unclipped.float().mean() > 0.99
        assert ((w - deq).abs()[unclipped] <= step[unclipped] / 2 * (1 + 1e-6)).all()


def test_dequantize_then_quantize_is_the_identity_on_full_range_blocks():
    rng = np.random.default_rng()
    out_features, in_features = random_shape(rng)
    q = rng.integers(-7, 8, size=(out_features, in_features // BLOCK, BLOCK))
    q[..., int(rng.integers(0, BLOCK))] = rng.choice([-7, 7], size=q.shape[:2])  # every block reaches |7|
    q = torch.from_numpy(q.reshape(out_features, in_features).astype(np.int8))
    scales = (torch.rand(out_features, in_features // BLOCK) * 0.1 + 1e-3).to(torch.bfloat16)
    qweight = fmt.pack_nibbles(q)
    again_q, again_scales = fmt.quantize(fmt.dequantize(qweight, scales, dtype=torch.float32))
    assert torch.equal(again_scales, scales)
    assert torch.equal(again_q, qweight)


def test_dequantize_golden_values():
    qweight = fmt.pack_nibbles(torch.tensor([[-8, 7] + [0] * (BLOCK - 2)]))
    scales = torch.tensor([[0.25]], dtype=torch.bfloat16)
    deq = fmt.dequantize(qweight, scales)
    assert deq.dtype == torch.bfloat16 and deq.shape == (1, BLOCK)
    assert deq[0, :2].tolist() == [-2.0, 1.75]


def test_quantize_leaves_its_input_unchanged():
    w = torch.randn(3, BLOCK)
    before = w.clone()
    fmt.quantize(w)
    assert torch.equal(w, before)


def test_shapes_are_checked_with_clear_messages():
    with pytest.raises(fmt.FormatError, match="2-D"):
        fmt.quantize(torch.zeros(BLOCK))
    with pytest.raises(fmt.FormatError, match="in=96 is not a multiple of the block size 128"):
        fmt.quantize(torch.zeros(4, 96))
    with pytest.raises(fmt.FormatError, match="even last dimension"):
        fmt.pack_nibbles(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(fmt.FormatError, match="uint8"):
        fmt.unpack_nibbles(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(fmt.FormatError, match="do not describe one weight"):
        fmt.dequantize(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2, dtype=torch.bfloat16))


def test_quantized_nbytes_counts_codes_and_scales():
    qweight, scales = fmt.quantize(torch.randn(24, 3 * BLOCK))
    assert fmt.quantized_nbytes(24, 3 * BLOCK) == qweight.numel() + scales.numel() * 2


def test_manifest_json_round_trip_and_refusals():
    manifest = fmt.Manifest(
        architecture="Qwen2ForCausalLM",
        source="synthetic:tiny",
        units=(fmt.UnitEntry(name="layers.0", linears=("model.layers.0.mlp.up_proj",)),),
        tensors=(fmt.TensorEntry(name="model.norm.weight", dtype="BF16", shape=(128,), file="a.safetensors"),),
        shards=(fmt.ShardEntry(file="a.safetensors", nbytes=300, sha256="ab" * 32),),
    )
    assert fmt.Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(fmt.FormatError, match="format is 'other'"):
        fmt.Manifest.from_json(manifest.to_json().replace('"spillover-int4"', '"other"'))
    with pytest.raises(fmt.FormatError, match="not a valid spillover manifest"):
        fmt.Manifest.from_json('{"format": "spillover-int4", "version": 1, "block_size": 128}')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_is_bit_identical_on_cuda():
    w = torch.randn(64, 4 * BLOCK, dtype=torch.bfloat16)
    cpu_q, cpu_s = fmt.quantize(w)
    gpu_q, gpu_s = fmt.quantize(w.cuda())
    assert torch.equal(gpu_q.cpu(), cpu_q) and torch.equal(gpu_s.cpu(), cpu_s)
