"""compute/kernels/paged_attention.py: decode attention over pages against an independent float64 attention.

* The Triton kernel on CPU through the Triton interpreter, in a child process (``TRITON_INTERPRET=1`` must be set
  before ``@triton.jit`` runs): this file, executed as a script. On CUDA (``gpu``-marked): the same cases and the
  32B model's shapes.
* Each case: pages shuffled in the pool, rows of different lengths (one position, a partial last page, whole
  pages), several rows on one sequence's pages; every pool slot no row may read holds 1e30 or NaN, and the value
  at each row's last position is scaled up, so a page, mask or length off by one breaks the bound by far.
* The operand form (``operand=True``: the o projection's row operand written by the kernel) against the plain
  output of the same call turned into an operand (``test_kernels.assert_operand``: the permuted values exactly, the
  group sums to fp32 rounding), for several rows and for one (the 1-D operand).
* Bound per element: ``|out - exact| <= 2**-6 * (|exact| + sum_i p_i |v_i|)``: the kernel's errors are the bf16
  probabilities in the second product (2**-8 of ``sum_i p_i |v_i|``) and the output's rounding (2**-8 of
  ``|exact|``, 2**-7 truncating in the interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import assert_operand

from compute.kernels.gemv import RowOperand
from compute.kernels.paged_attention import (
    paged_decode_attention,
    paged_operand_supported,
    reference_paged_decode_attention,
    reference_rotary_pool_write,
    rotary_pool_write,
)

REPO = Path(__file__).resolve().parent.parent
# (H, KVH, D, P, lengths of the rows)
SHAPES = [
    (4, 2, 16, 16, [1, 17, 32, 5]),
    (5, 1, 32, 16, [40, 3]),
    (8, 8, 16, 32, [33, 64, 2]),
    (40, 8, 128, 32, [300, 1, 4096, 77] * 4),
    (28, 4, 128, 32, [1000] * 16),
]
INTERPRETED = SHAPES[:3]
# The operand form: G * D whole 128-element groups (G = H / KVH). Several rows, and one (a 1-D operand).
OPERAND_SHAPES = [
    (8, 2, 32, 16, [1, 17, 40]),
    (4, 2, 64, 32, [33, 2, 64, 5]),
    (2, 1, 128, 16, [20]),
    (40, 8, 128, 32, [300, 1, 4096, 77] * 4),
    (40, 8, 128, 32, [999]),
]
OPERAND_INTERPRETED = OPERAND_SHAPES[:3]


def exact_attention(q, keys, values, scale):
    """float64 attention of one row: q [H, D], keys/values [L, KVH, D] -> ([H, D], sum_i p_i |v_i| [H, D])."""
    heads, kv_heads = q.shape[0], keys.shape[1]
    k = keys.double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # (H, L, D)
    v = values.double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    p = torch.softmax(torch.einsum("hd,hld->hl", q.double(), k) * scale, dim=-1)
    return torch.einsum("hl,hld->hd", p, v), torch.einsum("hl,hld->hd", p, v.abs())


def paged_case(shape):
    """(q, keys, values, page table, lengths, scale) of a case (the module docstring), on the CPU."""
    heads, kv_heads, dim, page, lengths = shape
    width = max(-(-n // page) for n in lengths)
    pool_pages = width * len(lengths) + 3
    keys = torch.full((pool_pages, page, kv_heads, dim), 1e30, dtype=torch.bfloat16)
    values = torch.full_like(keys, float("nan"))
    order = torch.randperm(pool_pages).tolist()
    table = torch.zeros((len(lengths), width), dtype=torch.int32)
    for row, length in enumerate(lengths):
        pages = [order.pop() for _ in range(-(-length // page))]
        table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for i, p in enumerate(pages):
            n = min(page, length - i * page)
            keys[p, :n] = torch.randn((n, kv_heads, dim)).to(torch.bfloat16)
            values[p, :n] = torch.randn((n, kv_heads, dim)).to(torch.bfloat16)
        last = pages[(length - 1) // page], (length - 1) % page
        values[last] *= 4 * length  # the last position must count, with its weight
    q = torch.randn((len(lengths), heads, dim)).to(torch.bfloat16)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    return q, keys, values, table, lengths_t, dim**-0.5


def check_paged(shape, device: str) -> None:
    _, _, _, page, lengths = shape
    q, keys, values, table, lengths_t, scale = paged_case(shape)
    out = paged_decode_attention(
        q.to(device), keys.to(device), values.to(device), table.to(device), lengths_t.to(device), scale=scale
    ).cpu()
    reference = reference_paged_decode_attention(q, keys, values, table, lengths_t, scale=scale)
    for row, length in enumerate(lengths):
        positions = torch.arange(length)
        pages = table[row].long()[positions // page]
        offsets = positions % page
        exact, magnitude = exact_attention(q[row], keys[pages, offsets], values[pages, offsets], scale)
        bound = 2**-6 * (exact.abs() + magnitude)
        for name, got in (("kernel", out[row]), ("reference", reference[row])):
            error = (got.double() - exact).abs()
            assert bool((error <= bound).all()), (
                f"{name}, {shape} row {row}: error {float(error.max()):.3g} over the bound {float(bound.min()):.3g}"
            )


def check_operand(shape, device: str) -> None:
    """The operand form of a call is its plain output's operand, row by row."""
    heads, kv_heads, dim, _, lengths = shape
    assert paged_operand_supported(heads, kv_heads, dim)
    inputs = [t.to(device) for t in paged_case(shape)[:5]]
    scale = dim**-0.5
    plain = paged_decode_attention(*inputs, scale=scale)
    operand = paged_decode_attention(*inputs, scale=scale, operand=True)
    assert isinstance(operand, RowOperand) and operand.in_features == heads * dim
    if len(lengths) == 1:
        assert operand.values.dim() == 1, tuple(operand.values.shape)  # one row: the 1-D operand
        assert_operand(operand, plain[0].reshape(-1))
        return
    assert operand.rows == len(lengths)
    for row in range(len(lengths)):
        assert_operand(RowOperand(operand.values[row], operand.sums[row]), plain[row].reshape(-1))


def test_the_reference_matches_float64_attention():
    for heads, kv_heads, dim, page, lengths in INTERPRETED:
        table = torch.arange(len(lengths) * 3, dtype=torch.int32).view(len(lengths), 3)
        keys = torch.randn((len(lengths) * 3, page, kv_heads, dim)).to(torch.bfloat16)
        values = torch.randn_like(keys)
        q = torch.randn((len(lengths), heads, dim)).to(torch.bfloat16)
        lengths_t = torch.tensor([min(n, 3 * page) for n in lengths], dtype=torch.int32)
        out = reference_paged_decode_attention(q, keys, values, table, lengths_t)
        for row in range(len(lengths)):
            n = int(lengths_t[row])
            pages = table[row].long()[torch.arange(n) // page]
            k, v = keys[pages, torch.arange(n) % page], values[pages, torch.arange(n) % page]
            exact, magnitude = exact_attention(q[row], k, v, dim**-0.5)
            assert bool(((out[row].double() - exact).abs() <= 2**-7 * (exact.abs() + magnitude)).all())


def test_bad_operands_are_refused():
    q = torch.zeros((2, 4, 16), dtype=torch.bfloat16)
    pages = torch.zeros((3, 16, 2, 16), dtype=torch.bfloat16)
    table = torch.zeros((2, 1), dtype=torch.int32)
    lengths = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="q has 4 heads of 16; the pages 3 KV heads"):
        paged_decode_attention(q, torch.zeros((3, 16, 3, 16), dtype=torch.bfloat16),
                               torch.zeros((3, 16, 3, 16), dtype=torch.bfloat16), table, lengths)  # fmt: skip
    with pytest.raises(ValueError, match="page_table must be int32"):
        paged_decode_attention(q, pages, pages, table.long(), lengths)
    with pytest.raises(ValueError, match="pages of 12 positions"):
        odd = torch.zeros((3, 12, 2, 16), dtype=torch.bfloat16)
        paged_decode_attention(q, odd, odd, table, lengths)
    # the operand form needs each KV head's G * D outputs to be whole 128-element groups: here 2 * 16
    assert not paged_operand_supported(4, 2, 16) and paged_operand_supported(40, 8, 128)
    with pytest.raises(ValueError, match="needs G \\* D a multiple of 128"):
        paged_decode_attention(q, pages, pages, table, lengths, operand=True)


def test_the_kernel_in_the_interpreter():
    """Runs ``interpreter_cases`` below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count("ok ") == len(INTERPRETED) + len(OPERAND_INTERPRETED) + len(ROTARY_SHAPES), done.stdout


# (rows, heads, KV heads, head size): a decode batch of the 32B model's heads, a tiny model's, one row
ROTARY_SHAPES = [(16, 40, 8, 128), (5, 4, 2, 16), (1, 14, 2, 64)]


def check_rotary_pool_write(shape, device: str) -> None:
    """``rotary_pool_write`` against HF's rotary and ``index_copy_`` on the same inputs, from a bf16 projection and
    from split-K partial sums with a bias: bit for bit on CUDA; in the interpreter, which rounds fp32 -> bf16 toward
    zero, within a bf16 ulp of each rounding (four of them)."""
    rows, heads, kv_heads, dim = shape
    width = (heads + 2 * kv_heads) * dim
    gen = torch.Generator().manual_seed(rows * 1000 + heads)
    angles = torch.rand(rows, dim // 2, generator=gen) * 100
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16).to(device)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(torch.bfloat16).to(device)
    slots = torch.randperm(3 * rows, generator=gen)[:rows].to(device)
    bf16_qkv = (torch.randn(rows, width, generator=gen) * 3).to(torch.bfloat16).to(device)
    partials = (torch.randn(3, rows, width, generator=gen) * 2).to(device)
    bias = torch.randn(width, generator=gen).to(torch.bfloat16).to(device)
    for qkv, b in ((bf16_qkv, None), (partials, bias)):
        pools = [torch.full((3 * rows, kv_heads, dim), float("nan"), dtype=torch.bfloat16, device=device) for _ in "kvKV"]
        q = rotary_pool_write(qkv, cos, sin, slots, pools[0], pools[1], num_heads=heads, num_kv_heads=kv_heads, bias=b)
        expected = reference_rotary_pool_write(qkv, cos, sin, slots, pools[2], pools[3], num_heads=heads,
                                               num_kv_heads=kv_heads, bias=b)  # fmt: skip
        assert q.shape == (rows, heads, dim)
        if device == "cuda":
            assert torch.equal(q, expected)
            assert torch.equal(pools[0].nan_to_num(7), pools[2].nan_to_num(7))  # untouched slots stay NaN in both
            assert torch.equal(pools[1].nan_to_num(7), pools[3].nan_to_num(7))
            continue
        bound = 4 * 2.0**-7 * (qkv.float().abs().sum(0) if qkv.dim() == 3 else qkv.float().abs()).max() + 0.1
        for got, want in ((q, expected), (pools[0][slots], pools[2][slots]), (pools[1][slots], pools[3][slots])):
            assert ((got.float() - want.float()).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", ROTARY_SHAPES)
def test_rotary_pool_write_on_cuda(shape):
    check_rotary_pool_write(shape, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_on_cuda(shape):
    check_paged(shape, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", OPERAND_SHAPES)
def test_the_operand_form_on_cuda(shape):
    check_operand(shape, "cuda")


def interpreter_cases() -> None:
    for shape in INTERPRETED:
        check_paged(shape, "cpu")
        print("ok paged_decode_attention", shape[:4])
    for shape in OPERAND_INTERPRETED:
        check_operand(shape, "cpu")
        print("ok paged_decode_attention(operand=True)", shape[:4], len(shape[4]), "rows")
    for shape in ROTARY_SHAPES:
        check_rotary_pool_write(shape, "cpu")
        print("ok rotary_pool_write", shape)


if __name__ == "__main__":
    interpreter_cases()
