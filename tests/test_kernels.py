"""The INT4 kernels against ``x @ dequantize(W).T``, on fresh random inputs of many shapes.

* The torch reference against an independent numpy unpacking of the format.
* ``int4_matmul`` on CPU, and on CUDA (``gpu``-marked) where it dispatches to the Triton GEMV or the
  dequantize-then-cuBLAS path, including weights that are views into a pool and CUDA-graph capture.
* The Triton kernels themselves on CPU, through the Triton interpreter. ``TRITON_INTERPRET=1`` must be set
  before ``@triton.jit`` runs, so those cases run in a child process: this file, executed as a script.

Tolerance: every path accumulates in fp32 and rounds the output to bf16 once (relative error 2**-9), and the
reference also rounds each weight to bf16 first (2**-9 per product). So against float64 on the exact weights
``|y - y64| <= 2**-8 * (|y64| + sum_k |x_k w_k|)`` must hold elementwise; a wrong nibble, scale or row
gives errors near ``sqrt(K)`` typical products, well above that bound at these sizes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compute.kernels import int4_matmul, reference_int4_matmul
from conftest import capture_graph
from quantizer.format import BLOCK_SIZE, dequantize, quantize

REPO = Path(__file__).resolve().parent.parent
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]


def random_linear(n: int, k: int, device: str = "cpu", bias: bool = False, seed: int | None = None):
    """Fresh random quantized weight (qweight, scales), its exact float64 value, and an optional bf16 bias."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different magnitude
    qweight, scales = quantize(w)
    b = (torch.randn(n, generator=gen) if bias else torch.zeros(0)).to(torch.bfloat16)
    return (
        qweight.to(device),
        scales.to(device),
        dequantize(qweight, scales, torch.float64),
        b.to(device) if bias else None,
    )


def assert_close_to_exact(
    y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, bias: torch.Tensor | None, *, truncated: bool = False
) -> None:
    """``y`` against float64 ``x @ w64.T + bias`` within the bound in the module docstring; ``truncated``: the
    output was rounded toward zero (the Triton interpreter), up to a whole bf16 ulp (2**-7 relative) instead of
    half of one, which the bound's ``|y64|`` term then covers twice over."""
    x64 = x.detach().cpu().double()
    exact = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    if bias is not None:
        exact = exact + bias.cpu().double()
    assert y.shape == exact.shape, f"shape {tuple(y.shape)}, expected {tuple(exact.shape)}"
    y64 = y.detach().cpu().double()
    assert torch.isfinite(y64).all(), "non-finite output"
    output_rounding = 2.0**-7 if truncated else 2.0**-8
    excess = (y64 - exact).abs() - (output_rounding * exact.abs() + 2.0**-8 * magnitude)
    assert excess.max() <= 0, f"max error over the bound {excess.max():.3g} at {np.unravel_index(int(excess.argmax()), excess.shape)}"
    rel = (y64 - exact).norm() / exact.norm()
    assert rel < 1e-2, f"relative error {rel:.3g}"


def expected_operand(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-row GEMV's operand of the row ``x`` [K], in torch (compute/kernels/gemv.py's docstring): the values
    with each word's elements moved to ``stored_position``, and each 128-element group's sum (float64)."""
    from compute.kernels.gemv_mma import stored_position

    groups = x.detach().cpu().reshape(-1, BLOCK_SIZE)
    values = torch.empty_like(groups)
    values[:, stored_position(torch.arange(BLOCK_SIZE))] = groups
    return values.reshape(-1), groups.double().sum(1)


def assert_operand(operand, x: torch.Tensor) -> None:
    """``operand`` (a ``RowOperand``) is the operand of ``x``: the values exactly, the sums to fp32's rounding."""
    values, sums = expected_operand(x)
    assert operand.values.dtype == x.dtype and torch.equal(operand.values.cpu(), values), "values differ"
    assert operand.sums.dtype == torch.float32 and operand.sums.shape == sums.shape, tuple(operand.sums.shape)
    bound = 2.0**-17 * x.detach().cpu().double().reshape(-1, BLOCK_SIZE).abs().sum(1)  # 128 fp32 roundings at most
    assert ((operand.sums.cpu().double() - sums).abs() <= bound).all(), "sums differ"


def emulate_mma_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``gemv_mma``'s arithmetic in float64 torch, its tensor operations in the kernel's order (the nibble pairs'
    join, the reshape and permute to the tile's k order, x's permute from its stored order to k, ``(c - 136 X)
    scale``): its index bookkeeping, checked without a GPU."""
    values, sums = expected_operand(x)
    words = (qweight.view(torch.int32).long() & 0xFFFFFFFF) ^ 0x88888888
    n, groups = words.shape[0], words.shape[1] // 16
    pairs = []
    for p in range(4):
        packed = ((words >> (4 * p)) & 0x000F000F) | 0x43004300
        pairs.append(torch.stack([packed & 0xFFFF, packed >> 16], -1))  # element 0 of a register is its low half
    halves = torch.stack([torch.stack(pairs[:2], -1), torch.stack(pairs[2:], -1)], -1)  # [N, KW, 2 h, 2 pl, 2 ph]
    tiles = halves.reshape(n, groups, 4, 4, 2, 2, 2).permute(0, 1, 3, 6, 5, 2, 4).reshape(n, groups, 128)
    a = tiles.to(torch.int32).to(torch.int16).view(torch.bfloat16).double()  # 128 + u
    b = values.cpu().double().reshape(groups, 4, 8, 2, 2).permute(0, 2, 3, 1, 4).reshape(groups, 128)
    c = (a * b).sum(-1)  # [N, groups]
    return ((c - 136.0 * sums.cpu().double()) * scales.cpu().double()).sum(-1)


def test_the_tensor_core_gemv_arithmetic_emulated_on_cpu():
    """``gemv_mma``'s k order, the operand's stored order and the offset correction give x @ dequantize(W).T up to
    the fp32 group sums (~1e-5 relative, far below bf16's 4e-3). One position wrong anywhere fails it: the weights
    are random."""
    qweight, scales, w64, _ = random_linear(40, 640)
    x = torch.randn(640, dtype=torch.bfloat16) * 3
    exact = w64 @ x.double()
    got = emulate_mma_gemv(x, qweight, scales)
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


def numpy_dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """The format read independently of quantizer.format: high nibble first, two's complement, 128-blocks."""
    packed = qweight.cpu().numpy().astype(np.int64)
    nibbles = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int64)
    nibbles[:, 0::2] = packed >> 4
    nibbles[:, 1::2] = packed & 0xF
    q = np.where(nibbles >= 8, nibbles - 16, nibbles)
    s = scales.cpu().float().numpy().astype(np.float64)
    return q * np.repeat(s, BLOCK_SIZE, axis=1)


@pytest.mark.parametrize("n,k", [(8, 128), (40, 384), (130, 640)])
def test_reference_matches_independent_unpacking(n, k):
    qweight, scales, w64, bias = random_linear(n, k, bias=True)
    np.testing.assert_array_equal(numpy_dequantize(qweight, scales), w64.numpy())
    x = torch.randn(5, k, dtype=torch.bfloat16)
    y = reference_int4_matmul(x, qweight, scales, bias)
    assert y.dtype == torch.bfloat16
    assert_close_to_exact(y, x, torch.from_numpy(numpy_dequantize(qweight, scales)), bias)


SHAPES = [(m, n, k) for m in (1, 2, 3, 8, 16, 17, 64, 300) for n, k in ((128, 128), (384, 640), (200, 1152))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int4_matmul_matches_dequantized(device, m, n, k):
    has_bias = (m + n) % 2 == 1
    qweight, scales, w64, bias = random_linear(n, k, device, bias=has_bias)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    assert_close_to_exact(int4_matmul(x, qweight, scales, bias), x, w64, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading", [(2, 3), (1, 1), (4, 75)])
def test_int4_matmul_keeps_leading_dimensions(device, leading):
    n, k = 256, 512
    qweight, scales, w64, bias = random_linear(n, k, device, bias=True)
    x = torch.randn(*leading, k, dtype=torch.bfloat16, device=device)
    y = int4_matmul(x, qweight, scales, bias)
    assert y.shape == (*leading, n) and y.dtype == x.dtype
    assert_close_to_exact(y.reshape(-1, n), x.reshape(-1, k), w64, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_int4_matmul_on_views_into_a_pool(device, m):
    """Weights as the loader hands them out: uint8 pool bytes at 256-byte-aligned offsets, reinterpreted."""
    n, k = 96, 384
    qweight, scales, w64, _ = random_linear(n, k)
    pool = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)  # garbage around the tensors
    q_at, s_at = 256 * 7, 256 * 7 + (qweight.numel() + 255) // 256 * 256
    pool[q_at : q_at + qweight.numel()] = qweight.flatten()
    pool[s_at : s_at + scales.numel() * 2] = scales.flatten().view(torch.uint8)
    pool = pool.to(device)
    q_view = pool[q_at : q_at + qweight.numel()].view(n, k // 2)
    s_view = pool[s_at : s_at + scales.numel() * 2].view(torch.bfloat16).view(n, k // BLOCK_SIZE)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    assert_close_to_exact(int4_matmul(x, q_view, s_view), x, w64, None)


@pytest.mark.parametrize(
    "x_shape,q_shape,s_shape,message",
    [
        ((2, 256), (64, 64), (64, 2), "input features"),
        ((2, 192), (64, 96), (64, 1), "multiple of the block size"),
        ((2, 256), (64, 128), (64, 1), "scales must be"),
    ],
)
def test_int4_matmul_rejects_mismatched_operands(x_shape, q_shape, s_shape, message):
    x = torch.randn(*x_shape, dtype=torch.bfloat16)
    qweight = torch.zeros(q_shape, dtype=torch.uint8)
    scales = torch.ones(s_shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        int4_matmul(x, qweight, scales)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gemv_explicit_configs_on_cuda(m):
    """Every code path of the GEMV: split-K partial sums, uneven splits, K not a multiple of the tile or step,
    N not a multiple of the row block, every tile, warp and group count of the one-row kernel, fp16."""
    from compute.kernels.gemv import int4_gemv
    from compute.kernels.gemv_configs import GemvConfig, MmaConfig

    qweight, scales, w64, bias = random_linear(300, 1408, "cuda", bias=True)  # 11 groups along K
    x = torch.randn(m, 1408, dtype=torch.bfloat16, device="cuda")
    if m == 1:
        configs = [MmaConfig(t, w, g, s) for t, w, g, s in ((1, 1, 1, 1), (1, 1, 2, 3), (2, 1, 2, 4), (4, 1, 2, 1),
                                                             (1, 2, 1, 11), (2, 2, 2, 2), (1, 4, 1, 5))]  # fmt: skip
        split_configs = (MmaConfig(1, 1, 2, 4), MmaConfig(1, 1, 2, 1))  # 11 groups: 4 splits of 3 (one of 2), or 1
    else:
        configs = [GemvConfig(16, 4, 1, 4, 1), GemvConfig(32, 2, 3, 4, 3), GemvConfig(64, 1, 11, 8, 2),
                   GemvConfig(16, 8, 2, 4, 4)]  # fmt: skip
        split_configs = (GemvConfig(16, 2, 4, 1, 1), GemvConfig(16, 2, 1, 1, 1))  # 6 tiles of 2: 3 splits of 2, or 1
    for cfg in configs:
        assert_close_to_exact(int4_gemv(x, qweight, scales, bias, cfg), x, w64, bias)
    if m == 1:
        half = x.to(torch.float16)
        y = int4_gemv(half, qweight, scales, bias.to(torch.float16))
        assert y.dtype == torch.float16
        assert_close_to_exact(y, half, w64, bias.to(torch.float16))
    # partials: the fp32 split-K sums, left unsummed and without the bias
    for cfg, splits in zip(split_configs, ((4 if m == 1 else 3), 1)):
        partials = int4_gemv(x, qweight, scales, None, cfg, partials=True)
        assert partials.dtype == torch.float32 and partials.shape == (splits, m, 300)
        assert_close_to_exact(partials.sum(0).to(torch.bfloat16), x, w64, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [2, 3, 7, 8, 9, 13, 16])
def test_tensor_core_gemv_of_several_rows_on_cuda(m):
    """2 … 16 rows through ``gemv_mma`` (one n-tile of columns up to 8 rows, two past it): every row against the
    exact product, with and without split-K, N not a multiple of the row block, bias, fp16; and each row equal to
    that row alone through the same kernel, to the fp32 summation order (columns are independent in the mma)."""
    from compute.kernels.gemv import int4_gemv, row_operand
    from compute.kernels.gemv_configs import MmaConfig
    from compute.kernels.gemv_mma import mma_supported

    if not mma_supported(None):
        pytest.skip("gemv_mma needs compute capability 8.0")
    qweight, scales, w64, bias = random_linear(300, 1408, "cuda", bias=True)  # 11 groups along K
    x = torch.randn(m, 1408, dtype=torch.bfloat16, device="cuda")
    assert row_operand(x).rows == m
    for cfg in (None, MmaConfig(1, 1, 1, 1), MmaConfig(2, 2, 2, 3), MmaConfig(1, 4, 1, 11), MmaConfig(4, 1, 2, 1)):
        y = int4_gemv(x, qweight, scales, bias, cfg)
        assert y.shape == (m, 300)
        assert_close_to_exact(y, x, w64, bias)
        alone = torch.cat([int4_gemv(x[r : r + 1], qweight, scales, bias, cfg) for r in range(m)])
        assert (y.float() - alone.float()).abs().max() <= 2.0**-7 * alone.float().abs().max(), cfg
    half = x.to(torch.float16)
    y = int4_gemv(half, qweight, scales, bias.to(torch.float16))
    assert y.dtype == torch.float16
    assert_close_to_exact(y, half, w64, bias.to(torch.float16))
    partials = int4_gemv(x, qweight, scales, None, MmaConfig(1, 1, 2, 4), partials=True)
    assert partials.shape == (4, m, 300)
    assert_close_to_exact(partials.sum(0).to(torch.bfloat16), x, w64, None)
    qweight, scales, w64, _ = random_linear(5120, 5120, "cuda")  # a 32B shape, default config
    x = torch.randn(m, 5120, dtype=torch.bfloat16, device="cuda")
    assert_close_to_exact(int4_matmul(x, qweight, scales), x, w64, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("k", [384, 1408, 5120])
def test_row_operand_on_cuda(k):
    """The row operand of a bf16 row, and a GEMV on it equal to the GEMV on the row (which makes the same operand)."""
    from compute.kernels.gemv import RowOperand, int4_gemv, row_operand

    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda") * 5
    operand = row_operand(x)
    assert isinstance(operand, RowOperand) and operand.dtype == torch.bfloat16 and operand.in_features == k
    assert_operand(operand, x[0])
    qweight, scales, _, bias = random_linear(96, k, "cuda", bias=True)
    assert torch.equal(int4_gemv(operand, qweight, scales, bias), int4_gemv(x, qweight, scales, bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_early_launched_gemv_reads_the_operand_its_producer_just_wrote_on_cuda():
    """Where GEMVs launch early (Hopper), each one may start before the kernel that writes its operand ends: in a
    replayed CUDA graph of producer, GEMV, producer, GEMV, … on new inputs, every GEMV still sees its own operand."""
    from compute.kernels.gemv import int4_gemv, row_operand
    from compute.kernels.pdl import early_launch

    qweight, scales, _, bias = random_linear(4096, 1024, "cuda", bias=True)
    rows = torch.randn(8, 1, 1024, dtype=torch.bfloat16, device="cuda")

    def chain() -> list[torch.Tensor]:
        return [int4_gemv(row_operand(row), qweight, scales, bias) for row in rows]

    graph, outs = capture_graph(chain)
    for _ in range(3):
        rows.copy_(torch.randn_like(rows))
        graph.replay()
        torch.cuda.synchronize()
        for row, out in zip(rows, outs):
            assert torch.equal(out, int4_gemv(row, qweight, scales, bias))
    assert early_launch(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    assert not early_launch(torch.device("cpu"))


def test_several_rows_take_their_own_tuned_config_else_the_one_row_kernels(monkeypatch):
    from compute.kernels import gemv_configs as configs

    monkeypatch.setattr(configs, "TUNED_CONFIGS", dict(configs.TUNED_CONFIGS))
    assert configs.gemv_config("mma-rows", 7168, 5120) == configs.gemv_config("mma", 7168, 5120)
    assert configs.gemv_config("mma-rows", 300, 1408) == configs.gemv_config("mma", 300, 1408)
    configs.TUNED_CONFIGS[("mma-rows", 7168, 5120)] = configs.MmaConfig(4, 1, 1, 2)
    assert configs.gemv_config("mma-rows", 7168, 5120) == configs.MmaConfig(4, 1, 1, 2)
    assert configs.gemv_config("mma", 7168, 5120) != configs.MmaConfig(4, 1, 1, 2)


def test_tuned_configs_load_from_a_sweep_table_and_bad_tables_are_named(tmp_path, monkeypatch):
    from compute.kernels import gemv_configs as configs

    monkeypatch.setattr(configs, "TUNED_CONFIGS", dict(configs.TUNED_CONFIGS))
    table = tmp_path / "kernels.json"
    table.write_text('{"tuned": {"mma 7168 5120": {"tiles": 2, "warps": 1, "groups": 1, "splits": 2}, '
                     '"dot 7168 5120": {"block_n": 16, "groups": 1, "split_k": 2, "num_warps": 1, "num_stages": 1}}}')
    assert configs.load_tuned_configs(table) == 2
    assert configs.gemv_config("mma", 7168, 5120) == configs.MmaConfig(tiles=2, warps=1, groups=1, splits=2)
    assert configs.gemv_config("dot", 7168, 5120) == configs.GemvConfig(16, 1, 2, 1, 1)
    table.write_text('{"tuned": {"mma 7168 5120": {"tiles": 3, "warps": 1, "groups": 1, "splits": 2}}}')
    with pytest.raises(ValueError, match="not a GEMV config table"):  # a tile count the kernel's layouts cannot take
        configs.load_tuned_configs(table)
    table.write_text('{"tuned": {"mma 7168": {}}}')
    with pytest.raises(ValueError, match="not a GEMV config table"):
        configs.load_tuned_configs(table)
    with pytest.raises(ValueError, match="not a GEMV config table"):
        configs.load_tuned_configs(tmp_path / "missing.json")


@pytest.mark.parametrize("sms", [132, 82, 128, 46])
def test_the_one_row_heuristic_fills_at_most_one_wave_with_its_splits(sms, monkeypatch):
    """Untuned shapes: as many K splits (of two groups or more) as keep the programs within one wave of the GPU's
    SMs, and one split when the row blocks alone fill a wave; down and gate|up as the H200 sweep found best."""
    from compute.kernels import gemv_configs as configs
    from compute.kernels.gemv import row_split

    monkeypatch.setattr(configs, "TUNED_CONFIGS", {})
    shapes = [(7168, 5120), (5120, 5120), (55296, 5120), (5120, 27648), (152064, 5120), (896, 896), (3584, 18944),
              (64, 256), (300, 1280)]  # fmt: skip
    for n, k in shapes:
        cfg = configs.gemv_config("mma", n, k, sms)
        per_split, splits = row_split(k // 128, cfg)
        assert splits == cfg.splits and (splits == 1 or per_split >= 2), (n, k, cfg)
        blocks, wave = -(-n // cfg.rows), sms * 16 // cfg.warps
        assert splits == 1 or blocks * splits <= wave, (n, k, cfg)
        more = [row_split(k // 128, dataclasses.replace(cfg, splits=s))[1] for s in range(splits + 1, k // 256 + 1)]
        assert all(blocks * s > wave for s in more if s > splits), (n, k, cfg)
    if sms == 132:
        assert configs.gemv_config("mma", 5120, 27648, sms).splits == 13
        assert configs.gemv_config("mma", 55296, 5120, sms).splits == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_kernel_is_bit_exact_on_cuda():
    from compute.kernels.gemm import dequantize_into

    qweight, scales, _, _ = random_linear(333, 1280, "cuda")
    out = torch.full((333, 1280), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert torch.equal(dequantize_into(qweight, scales, out), dequantize(qweight, scales))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gemm_chunks_large_weights_on_cuda(monkeypatch):
    import compute.kernels.gemm as gemm

    monkeypatch.setattr(gemm, "PREFILL_SCRATCH_BYTES", 48 * 640 * 2)  # 48 rows at a time: 7 chunks
    qweight, scales, w64, bias = random_linear(300, 640, "cuda", bias=True)
    x = torch.randn(70, 640, dtype=torch.bfloat16, device="cuda")
    assert_close_to_exact(gemm.int4_gemm(x, qweight, scales, bias), x, w64, bias)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m,n,k", [(1, 256, 1024), (1, 128, 4096), (4, 384, 512), (12, 384, 512)])
def test_int4_matmul_replays_in_a_cuda_graph(m, n, k):
    qweight, scales, w64, bias = random_linear(n, k, "cuda", bias=True)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    graph, y = capture_graph(lambda: int4_matmul(x, qweight, scales, bias))
    for _ in range(2):
        x.copy_(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_exact(y, x, w64, bias)


def test_triton_kernels_in_the_interpreter():
    """Runs ``interpreter_cases`` below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count("ok ") == len(INTERPRETER_CASES) + 5, done.stdout


# (M, N, K, bias, MmaConfig (M = 1) or GemvConfig fields, or None for the heuristic): the one-row kernel and the
# dot kernel, split-K partial sums with even and uneven splits, K not a multiple of the tile, N not a multiple of
# the row block, more rows than one dot block.
INTERPRETER_CASES = [
    (1, 40, 384, True, None),
    (1, 64, 1152, False, (1, 1, 2, 4)),  # 9 groups: 3 splits of 3
    (1, 72, 640, True, (2, 1, 1, 3)),  # 5 groups: splits of 2, 2 and 1
    (1, 72, 1408, True, (1, 2, 2, 3)),
    (1, 40, 1408, False, (1, 1, 1, 4)),  # 11 groups in splits of 3: the last one has 2
    (2, 40, 384, True, None),
    (3, 64, 1152, False, (32, 4, 2, 4, 1)),
    (17, 48, 256, True, (16, 1, 2, 4, 1)),
]


def interpreter_cases() -> None:
    """The Triton kernels on CPU tensors; this process must have TRITON_INTERPRET=1 set at start."""
    from compute.kernels import gemm
    from compute.kernels.gemv import RowOperand, int4_gemv, row_operand
    from compute.kernels.gemv_configs import GemvConfig, MmaConfig

    for k in (384, 1408, 9216):  # one partial program of the operand kernel, two, and a full one and a partial one
        for dtype in (torch.bfloat16, torch.float16):
            x = (torch.randn(1, k) * 5).to(dtype)
            assert_operand(row_operand(x), x[0])
    print("ok row operand")

    for m, n, k, has_bias, fields in INTERPRETER_CASES:
        qweight, scales, w64, bias = random_linear(n, k, bias=has_bias)
        x = torch.randn(m, k, dtype=torch.bfloat16)
        y = int4_gemv(x, qweight, scales, bias, fields and (MmaConfig if m == 1 else GemvConfig)(*fields))
        assert_close_to_exact(y, x, w64, bias, truncated=True)
        print("ok gemv", m, n, k)

    # partials: the split-K sums left unsummed, fp32, no bias (11 groups in up to 4 splits: 4 of 3, the last of 2)
    qweight, scales, w64, _ = random_linear(40, 1408)
    x = torch.randn(1, 1408, dtype=torch.bfloat16)
    partials = int4_gemv(x, qweight, scales, None, MmaConfig(1, 1, 2, 4), partials=True)
    assert partials.dtype == torch.float32 and partials.shape == (4, 1, 40), (partials.dtype, partials.shape)
    assert_close_to_exact(partials.sum(0).to(torch.bfloat16), x, w64, None, truncated=True)
    print("ok gemv partials")

    # several rows through the tensor-core kernel's operand (the row kernel here, a program per row): the operand
    # of each row is the one-row operand, and split sums land in [splits, M, N]
    x = torch.randn(5, 1408, dtype=torch.bfloat16) * 3
    operand = row_operand(x)
    assert operand.rows == 5 and operand.values.shape == (5, 1408) and operand.sums.shape == (5, 11)
    for row in range(5):
        assert_operand(RowOperand(operand.values[row], operand.sums[row]), x[row])
    qweight, scales, w64, bias = random_linear(72, 1408, bias=True)
    assert_close_to_exact(int4_gemv(x, qweight, scales, bias, MmaConfig(1, 2, 2, 3)), x, w64, bias, truncated=True)
    partials = int4_gemv(x, qweight, scales, None, MmaConfig(1, 1, 2, 4), partials=True)
    assert partials.shape == (4, 5, 72), partials.shape
    assert_close_to_exact(partials.sum(0).to(torch.bfloat16), x, w64, None, truncated=True)
    print("ok rows operand")

    # The interpreter rounds fp32 -> bf16 toward zero (CUDA rounds to nearest, and the GPU test checks
    # bit-exactness), so here each weight may be off by one bf16 unit in the last place.
    qweight, scales, w64, _ = random_linear(70, 640)
    out = gemm.dequantize_into(qweight, scales, torch.full((70, 640), float("nan"), dtype=torch.bfloat16))
    ulp = 2.0 ** (torch.frexp(w64.abs().clamp(min=1e-30))[1].double() - 8)
    assert ((out.double() - w64).abs() <= ulp).all(), "dequantize kernel off by more than one bf16 ulp"
    print("ok dequantize")

    gemm.PREFILL_SCRATCH_BYTES = 32 * 640 * 2  # three chunks of 32 rows (and a short last one)
    _, _, _, bias = random_linear(70, 640, bias=True)
    x = torch.randn(20, 640, dtype=torch.bfloat16)
    assert_close_to_exact(gemm.int4_gemm(x, qweight, scales, bias), x, w64, bias, truncated=True)
    print("ok gemm chunks")


if __name__ == "__main__":
    interpreter_cases()
