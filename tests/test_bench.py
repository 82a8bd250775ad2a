"""The benchmark's CPU-side behaviour: a clear refusal without a GPU, and its table from measured records."""

import pytest
import torch
from click.testing import CliRunner

from bench.pipeline import BudgetResult, Ceilings, bench, format_table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_refuses_without_a_gpu(tmp_path):
    result = CliRunner().invoke(bench, ["--checkpoint", str(tmp_path / "ckpt")])
    assert result.exit_code == 1
    assert "needs a CUDA device" in result.output
    assert not (tmp_path / "ckpt").exists()  # nothing synthesized before the refusal


def test_table_sets_each_figure_beside_its_ceiling():
    gib = 2**30
    result = BudgetResult(
        budget="12GiB", policy="hybrid", resident_units=30, streamed_units=35, ring_slots=2, loader_ready_s=9.5,
        engine_ready_s=14.25, prefill_tokens=2048, prefill_tokens_per_s=5123.4, decode_tokens=64, decode_context=129,
        decode_tokens_per_s=6.1, decode_mode="piecewise (2 graphs, 35 eager units)", resident_bytes_per_token=8 * 10**9,
        streamed_bytes_per_token=8.4e9, roofline_tokens_per_s=6.4, fraction_of_roofline=6.1 / 6.4,
        compute_wait_s_per_token=0.12, peak_device_bytes={"loader": 8 * gib, "compute": 3 * gib, "total": 11 * gib},
        compute_reserved_peak_bytes=gib,
    )  # fmt: skip
    table = format_table(Ceilings(h2d_gbps=53.1, d2d_gbps=4263.0), [result])
    assert "pinned host->device 53.1 GB/s, device->device 4263 GB/s" in table
    row = table.splitlines()[-1]
    for cell in ("12GiB", "30/35 (K=2)", "14.2", "5123", "6.1", "6.4", "95%", "8.40", "120.0", "8.00 + 3.00 = 11.00"):
        assert cell in row, (cell, row)


def test_sass_counts_the_one_row_gemv_loop_without_a_gpu():
    """bench.sass compiles the GEMV for sm_90 here and finds its loop: one FFMA and one LOP3 per nibble at least
    (16 words of 8 nibbles per thread for 16 rows x 2 groups on one warp), ~7 instructions per weight byte."""
    from bench.sass import describe_loop
    from compute.kernels.gemv_configs import GemvConfig

    loop = describe_loop(GemvConfig(block_n=16, groups=2, split_k=4, num_warps=1, num_stages=1), 5120)
    opcodes = dict(loop["opcodes"])
    assert loop["bytes_per_thread"] == 64
    assert opcodes["FFMA"] >= 128 and opcodes["LOP3.LUT"] >= 128 and opcodes["BRA"] == 1
    assert 4 < loop["per_byte"] < 12, loop


def test_the_mma_gemv_prototype_computes_the_product_and_compiles_to_a_short_loop():
    """bench.gluon_gemv: its arithmetic (the tile's k order and the 136 X correction, emulated with the kernel's own
    tensor operations) equals x @ dequantize(W).T up to the fp32 group sums, and its loop compiles for sm_90 to tensor-core mmas with no layout
    conversion (no barrier, shared memory or shuffle) in under 4 instructions per weight byte."""
    from bench.gluon_gemv import count_sass, emulate, mma_operand
    from quantizer.format import dequantize, quantize

    qweight, scales = quantize(torch.randn(40, 640) * torch.rand(40, 1))
    x = torch.randn(640, dtype=torch.bfloat16) * 3
    exact = dequantize(qweight, scales, torch.float64) @ x.double()
    # exact but for the group sums X, rounded to fp32 and multiplied by 136: ~1e-5 relative, far below bf16's 4e-3
    scale = float(exact.abs().max())
    torch.testing.assert_close(emulate(mma_operand(x), qweight, scales), exact, rtol=1e-4, atol=1e-4 * scale)

    loop = count_sass(tiles=2)
    opcodes = dict(loop["opcodes"])
    assert opcodes.get("HMMA.16816.F32.BF16") == 16  # 2 tiles x 8 k-steps of 16 per group
    assert not any(op.startswith(("BAR", "LDS", "STS", "SHFL")) for op in opcodes), opcodes
    assert loop["per_byte"] < 4, loop


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tiles,splits", [(1, 1), (2, 5), (4, 1)])
def test_the_mma_gemv_prototype_on_cuda(tiles, splits):
    from bench.gluon_gemv import gemv_mma, mma_operand
    from quantizer.format import dequantize, quantize

    qweight, scales = quantize(torch.randn(192, 1280, device="cuda"))
    x = torch.randn(1280, device="cuda", dtype=torch.bfloat16)
    got = gemv_mma(mma_operand(x), qweight, scales, tiles, splits)
    assert got.shape == (splits, 192)
    exact = dequantize(qweight, scales, torch.float64) @ x.double()
    torch.testing.assert_close(got.sum(0).double(), exact, rtol=1e-4, atol=1e-3)
