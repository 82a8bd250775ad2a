"""The fused RMSNorm and SiLU-times-up kernels against HF's own modules, on fresh random inputs of several shapes.

* On CPU: ``FusedRMSNorm`` and ``swiglu_mlp_forward`` fall back to HF's arithmetic bit for bit, the wrappers
  refuse bad operands, and ``build_model`` leaves HF's modules alone.
* The Triton kernels on CPU, through the Triton interpreter, in a child process (``TRITON_INTERPRET=1`` must be
  set before ``@triton.jit`` runs): this file, executed as a script.
* On CUDA (``gpu``-marked): the kernels against HF's modules, a CUDA-graph capture and replay, and the whole
  model built on CUDA (fused) against the same model with HF's modules.

Tolerance: the kernels do HF's arithmetic, fp32 math rounded to bf16 at the same two points (the normalised value
before the weight, the SiLU before the product). Only where the fp32 sum's order or ``rsqrt``/``exp``'s last bit
lands the first rounding on the other side of a bf16 boundary (a few in 10**5 elements) can the output differ,
by one bf16 ulp of the intermediate, which the second rounding makes 1 or at most 2 ulps of the output. So:
at most 2 ulps anywhere and bit-equal on all but one element in a thousand; a wrong formula, eps, row, or
rounding point breaks both by far.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from compute.kernels.activation import reference_silu_mul, silu_mul, swiglu_mlp_forward
from compute.kernels.gemv import RowOperand
from compute.kernels.norm import FusedRMSNorm, add_partials, add_partials_workspace, rms_norm
from compute.model import build_model
from conftest import capture_graph
from quantizer.checkpoint import QuantizedCheckpoint
from test_kernels import assert_operand
from test_model import CheckpointWeights

REPO = Path(__file__).resolve().parent.parent
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (leading shape, hidden): one decode row, a prefill chunk, a 3-D batch, widths that are not powers of two
# (the 32B model's 5120, the tiny models' 128), one wider than a warp's worth of registers per lane.
NORM_SHAPES = [((1, 1), 5120), ((7,), 128), ((2, 3), 896), ((33,), 3584), ((1,), 1000)]
# (splits, hidden, bias, norm) for add_partials: the 32B model's o_proj and down_proj rows, tiny ones
# (splits, H, bias, norm[, rows]): the last three several rows (batched decode), one program a row
ADD_CASES = [(4, 5120, False, True), (16, 5120, False, True), (16, 5120, False, False), (1, 128, True, True),
             (3, 1000, True, False), (3, 1000, True, True), (8, 5120, False, True, 16), (3, 1024, True, True, 5),
             (1, 640, False, False, 2)]
# gate/up shapes: the 32B decode row (27648), a chunk of the tiny model's (256), sizes not a multiple of a block
ACT_SHAPES = [(1, 1, 27648), (5, 256), (3, 1000), (1, 17)]


def bf16_ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in bf16 units in the last place of the larger of the two (8 significant bits)."""
    out, ref = out.double(), ref.double()
    exponent = torch.frexp(torch.maximum(out.abs(), ref.abs()).clamp(min=2.0**-126))[1].double()
    return (out - ref).abs() / 2.0 ** (exponent - 8)


def assert_hf_arithmetic(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` is ``ref`` but for the rare rounding flip the module docstring describes."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    ulps = bf16_ulps(out, ref)
    differing = int((ulps > 0).sum())
    assert ulps.max() <= 2, f"off by {ulps.max().item():.1f} bf16 ulps (at most 2 expected)"
    assert differing <= 1 + out.numel() // 1000, f"{differing} of {out.numel()} elements differ from HF's"


def hf_norm(hidden: int, device: str, dtype: torch.dtype = torch.bfloat16) -> Qwen2RMSNorm:
    norm = Qwen2RMSNorm(hidden, eps=1e-6).to(device=device, dtype=dtype)
    norm.weight.data.normal_(1.0, 0.3)  # a random weight, so that a weight applied to the wrong column shows
    return norm


def hf_mlp(hidden: int, intermediate: int, device: str) -> Qwen2MLP:
    config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    return Qwen2MLP(config).to(device=device, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("leading,hidden", NORM_SHAPES[:3])
def test_fused_norm_on_cpu_is_hf_bit_for_bit_and_shares_the_weight(leading, hidden, dtype):
    norm = hf_norm(hidden, "cpu", dtype)
    fused = FusedRMSNorm.like(norm)
    assert fused.weight is norm.weight and fused.variance_epsilon == norm.variance_epsilon
    x = torch.randn(*leading, hidden, dtype=dtype) * 3
    assert torch.equal(fused(x), norm(x))


def test_swiglu_forward_on_cpu_is_hf_bit_for_bit():
    mlp = hf_mlp(64, 160, "cpu")
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(swiglu_mlp_forward(mlp, x), mlp(x))


def test_the_wrappers_refuse_bad_operands():
    row = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"partials must be fp32 \[S, 1, 8\]"):
        add_partials(row, torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"partials must be fp32 \[S, 2, 8\]"):
        add_partials(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="contiguous bf16 rows"):
        add_partials(torch.zeros(8, 2, dtype=torch.bfloat16).t(), torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="needs bf16"):
        rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[H\] = \[8\]"):
        rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="needs bf16"):
        silu_mul(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(torch.randn(4, dtype=torch.bfloat16), torch.randn(5, dtype=torch.bfloat16))
    two_rows = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"operand=True\) takes 1 to 16 rows of a multiple of 128"):
        rms_norm(two_rows, torch.ones(8, dtype=torch.bfloat16), 1e-6, operand=True)
    with pytest.raises(ValueError, match=r"operand=True\) takes 1 to 16 rows of a multiple of 128"):
        silu_mul(two_rows, two_rows, operand=True)
    many_rows = torch.randn(17, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"operand=True\) takes 1 to 16 rows"):
        rms_norm(many_rows, torch.ones(128, dtype=torch.bfloat16), 1e-6, operand=True)
    with pytest.raises(ValueError, match="needs the norm's weight"):
        add_partials(row, torch.zeros(2, 1, 8), operand=True)
    with pytest.raises(ValueError, match="multiple of 128"):  # the operand holds whole 128-element groups
        rms_norm(two_rows[:1], torch.ones(8, dtype=torch.bfloat16), 1e-6, operand=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        add_partials(row, torch.zeros(2, 1, 8), None, torch.ones(8, dtype=torch.bfloat16), operand=True)
    with pytest.raises(ValueError, match="workspace must come from add_partials_workspace"):
        add_partials(row, torch.zeros(2, 1, 8), None, torch.ones(8, dtype=torch.bfloat16), workspace=torch.zeros(3))


def test_a_model_built_on_cpu_keeps_hf_modules(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert sum(isinstance(m, Qwen2RMSNorm) for m in model.modules()) == 2 * model.config.num_hidden_layers + 1
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, Qwen2MLP))


def test_triton_kernels_in_the_interpreter():
    """Runs ``interpreter_cases`` below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count("ok ") == len(NORM_SHAPES) + 2 + len(ACT_SHAPES) + len(ADD_CASES), done.stdout


def _truncated(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 toward zero, as the Triton interpreter converts (CUDA rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def interpreter_cases() -> None:
    """The kernels on CPU tensors, against HF's arithmetic with the interpreter's rounding; this process must have
    TRITON_INTERPRET=1 set at start."""
    for leading, hidden in NORM_SHAPES:
        norm = hf_norm(hidden, "cpu")
        x = torch.randn(*leading, hidden, dtype=torch.bfloat16) * 3
        h = x.float()
        normed = _truncated(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        expected = _truncated(norm.weight.float() * normed.float())
        assert_hf_arithmetic(rms_norm(x, norm.weight, norm.variance_epsilon), expected)
        print("ok norm", leading, hidden)

    # a strided input (every other row of a wider tensor): the wrapper passes the row stride
    wide = torch.randn(6, 2, 256, dtype=torch.bfloat16)
    x, weight = wide[:, 0], torch.randn(256, dtype=torch.bfloat16)
    h = x.float()
    normed = _truncated(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert_hf_arithmetic(rms_norm(x, weight, 1e-5), _truncated(weight.float() * normed.float()))
    print("ok norm strided")

    for shape in ACT_SHAPES:
        gate = torch.randn(shape, dtype=torch.bfloat16) * 4
        up = torch.randn(shape, dtype=torch.bfloat16)
        g = gate.float()
        expected = _truncated(_truncated(g / (1 + torch.exp(-g))).float() * up.float())
        assert_hf_arithmetic(silu_mul(gate, up), expected)
        print("ok silu_mul", shape)

    for case in ADD_CASES:
        check_add_partials(*case, "cpu", _truncated)
        print("ok add_partials", case)

    check_operands("cpu")
    print("ok operands")


def check_operands(device: str) -> None:
    """Each kernel that can write the next GEMV's row operand writes the operand of the bf16 row it writes
    otherwise (``test_kernels.assert_operand``: the permuted values exactly, the group sums to fp32 rounding)."""

    def same(operand, row: torch.Tensor) -> None:
        assert operand.dtype == torch.bfloat16
        assert_operand(operand, row.reshape(-1))

    for hidden in (5120, 128, 640):  # the 32B model's width, a tiny one, one that is not a power of two
        norm = hf_norm(hidden, device)
        x = torch.randn(1, hidden, dtype=torch.bfloat16, device=device) * 3
        same(rms_norm(x, norm.weight, 1e-6, operand=True), rms_norm(x, norm.weight, 1e-6))
        residual = torch.randn(1, 1, hidden, dtype=torch.bfloat16, device=device)
        partials = torch.randn(3, 1, hidden, dtype=torch.float32, device=device)
        _, normed = add_partials(residual, partials, None, norm.weight, 1e-6)
        _, operand = add_partials(residual, partials, None, norm.weight, 1e-6, operand=True)
        same(operand, normed)
    for width in (27648, 1152, 128):  # whole blocks of 1024, one partial block, and a row of one group
        gate = torch.randn(1, width, dtype=torch.bfloat16, device=device) * 4
        up = torch.randn(1, width, dtype=torch.bfloat16, device=device)
        same(silu_mul(gate, up, operand=True), silu_mul(gate, up))
    # several rows (batched decode): each row of the operand is that row's operand; the activation reads the two
    # strided halves of one gate|up product, as the batched layer passes them
    for rows, hidden in ((3, 640), (16, 128)):
        norm = hf_norm(hidden, device)
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, device=device) * 3
        operand, plain = rms_norm(x, norm.weight, 1e-6, operand=True), rms_norm(x, norm.weight, 1e-6)
        assert operand.rows == rows
        for r in range(rows):
            same(RowOperand(operand.values[r], operand.sums[r]), plain[r])
        gate_up = torch.randn(rows, 2 * hidden, dtype=torch.bfloat16, device=device) * 4
        gate, up = gate_up[:, :hidden], gate_up[:, hidden:]
        dense = silu_mul(gate, up)
        assert dense.is_contiguous() and torch.equal(dense, silu_mul(gate.contiguous(), up.contiguous()))
        operand = silu_mul(gate, up, operand=True)
        for r in range(rows):
            same(RowOperand(operand.values[r], operand.sums[r]), dense[r])


def check_add_partials(splits: int, hidden: int, has_bias: bool, has_norm: bool, *rest) -> None:
    """``add_partials`` against HF's steps: the Linear's bf16 output, the bf16 residual add, the RMSNorm, for one row
    or ``rows`` (a fifth case field); ``rest`` ends with the device and ``rounded``, fp32 -> bf16 as the kernels
    round (to nearest on CUDA, toward zero in the interpreter)."""
    *rows, device, rounded = rest
    rows = rows[0] if rows else 1
    residual = torch.randn(1, rows, hidden, dtype=torch.bfloat16, device=device) * 8
    partials = torch.randn(splits, rows, hidden, dtype=torch.float32, device=device)
    bias = torch.randn(hidden, dtype=torch.bfloat16, device=device) if has_bias else None
    norm = hf_norm(hidden, device) if has_norm else None
    delta = partials.sum(0) + (bias.float() if has_bias else 0)
    expected = rounded(residual.float() + rounded(delta).float())
    hidden_out, normed = add_partials(residual, partials, bias, norm.weight if has_norm else None, 1e-6)
    assert_hf_arithmetic(hidden_out, expected)
    if has_norm:
        h = expected.float()
        normed_expected = rounded(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert_hf_arithmetic(normed, rounded(norm.weight.float() * normed_expected.float()))
        # the programs meet in a workspace, which each call leaves as it found it: reused, the same bits
        workspace = add_partials_workspace(device)
        for _ in range(2):
            again = add_partials(residual, partials, bias, norm.weight, 1e-6, workspace=workspace)
            assert torch.equal(again[0], hidden_out) and torch.equal(again[1], normed)
            assert int(workspace[0]) == 0
        if hidden % 128 == 0:  # as the next GEMV's operand: each row's is that row's
            _, operand = add_partials(residual, partials, bias, norm.weight, 1e-6, operand=True)
            values, sums = operand.values.reshape(rows, hidden), operand.sums.reshape(rows, hidden // 128)
            for r in range(rows):
                assert_operand(RowOperand(values[r], sums[r]), normed[0, r])
    else:
        assert normed is None


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("leading,hidden", NORM_SHAPES)
def test_fused_norm_matches_hf_on_cuda(leading, hidden):
    norm = hf_norm(hidden, "cuda")
    fused = FusedRMSNorm.like(norm)
    for scale in (1.0, 40.0):  # the residual stream grows large in deep layers
        x = torch.randn(*leading, hidden, dtype=torch.bfloat16, device="cuda") * scale
        assert_hf_arithmetic(fused(x), norm(x))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_silu_mul_matches_hf_on_cuda(shape):
    gate = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 4
    up = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    assert_hf_arithmetic(silu_mul(gate, up), reference_silu_mul(gate, up))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", ADD_CASES)
def test_add_partials_matches_hf_on_cuda(case):
    check_add_partials(*case, "cuda", lambda t: t.to(torch.bfloat16))


@pytest.mark.gpu
@requires_cuda
def test_kernels_write_the_row_operand_on_cuda():
    check_operands("cuda")


@pytest.mark.gpu
@requires_cuda
def test_swiglu_forward_matches_hf_mlp_on_cuda():
    mlp = hf_mlp(128, 512, "cuda")
    x = torch.randn(3, 128, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        assert_hf_arithmetic(silu_mul(gate, up), mlp.act_fn(gate) * up)
        ours, theirs = swiglu_mlp_forward(mlp, x), mlp(x)
    # down_proj sums 512 products of inputs that may differ by an ulp: compare as a matmul's output
    torch.testing.assert_close(ours, theirs, atol=0.02, rtol=0.02)


@pytest.mark.gpu
@requires_cuda
def test_fused_ops_replay_in_a_cuda_graph():
    norm = FusedRMSNorm.like(hf_norm(896, "cuda"))
    x = torch.randn(1, 1, 896, dtype=torch.bfloat16, device="cuda")
    up = torch.randn(1, 1, 896, dtype=torch.bfloat16, device="cuda")

    def step() -> torch.Tensor:
        return silu_mul(norm(x), up)

    graph, out = capture_graph(step)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        up.copy_(torch.randn_like(up))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", ["tiny_q", "tiny_q_tied"])
def test_the_fused_model_on_cuda_matches_the_model_with_hf_modules(name, request, monkeypatch):
    qdir = request.getfixturevalue(name)
    checkpoint = QuantizedCheckpoint(qdir)
    fused = build_model(checkpoint, CheckpointWeights(checkpoint, device="cuda"), "cuda")
    layers = fused.config.num_hidden_layers
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 2 * layers + 1
    assert not any(isinstance(m, Qwen2RMSNorm) for m in fused.modules())
    assert sum("forward" in vars(m) for m in fused.modules() if isinstance(m, Qwen2MLP)) == layers

    monkeypatch.setattr("compute.model._fuse_small_ops", lambda model: None)
    plain = build_model(checkpoint, CheckpointWeights(checkpoint, device="cuda"), "cuda")
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.modules())

    ids = torch.randint(0, fused.config.vocab_size, (1, 13), device="cuda")
    with torch.inference_mode():
        ours, theirs = fused(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    # the tiny models' logits are O(1): a bf16 ulp near 2 is 0.0156 (test_engine.LOGIT_TOLERANCE is 0.03)
    torch.testing.assert_close(ours, theirs, atol=0.03, rtol=0)


if __name__ == "__main__":
    interpreter_cases()
