"""compute/kernels/paged_attention.py: decode attention over pages against an independent float64 attention.

* The Triton kernel on CPU through the Triton interpreter, in a child process (``TRITON_INTERPRET=1`` must be set
  before ``@triton.jit`` runs): this file, executed as a script. On CUDA (``gpu``-marked): the same cases and the
  32B model's shapes.
* Each case: pages shuffled in the pool, rows of different lengths (one position, a partial last page, whole
  pages), several rows on one sequence's pages; every pool slot no row may read holds 1e30 or NaN (the page
  table's entries past a row's pages too point at such a page), and the value at each row's last position is
  scaled up, so a page, mask or length off by one breaks the bound by far.
* Split over the pages (``splits`` forced to 1, 3, 4, and ``paged_splits``' choice): rows of one position, a
  partial page, many pages, and fewer blocks than splits (splits with nothing to do); the operand form of a split
  call against its plain output, bit for bit. On CUDA: the 32B model's heads for 1, 2 and 16 rows, and a CUDA graph
  captured once and replayed after the lengths change in place.
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
    paged_splits,
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
# Split over the pages, in the interpreter: (shape, forced split counts; None: paged_splits' choice). Blocks of 64
# positions (4 pages of 16, 2 of 32): 20 positions leave splits 1 … 3 empty, 130 split 3; 300 give split 0 two
# blocks.
SPLIT_INTERPRETED = [
    ((8, 2, 32, 16, [1, 5, 300, 20, 130, 64, 65]), (1, 3, 4, None)),
    ((5, 1, 32, 32, [40, 3, 257]), (3, 4, None)),
]
# The operand form of split calls: a combine program of one head (D = 128), of 2 (D = 64) and of 4 (D = 32); one row.
SPLIT_OPERAND_INTERPRETED = [
    ((8, 2, 32, 16, [1, 5, 300, 20, 130]), 3),
    ((4, 2, 64, 32, [33, 2, 200, 5]), 4),
    ((2, 1, 128, 16, [150]), 3),
]
# The 32B model's attention (H = 40, KVH = 8, D = 128, P = 16) for 1, 2 and 16 rows, on CUDA.
SPLIT_CUDA_ROWS = [1, 2, 16]


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
    spare = order.pop()  # a page no row holds: 1e30 keys, NaN values
    table.fill_(spare)
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


def check_paged(shape, device: str, splits: int | None = None) -> None:
    q, keys, values, table, lengths_t, scale = paged_case(shape)
    out = paged_decode_attention(
        q.to(device), keys.to(device), values.to(device), table.to(device), lengths_t.to(device), scale=scale,
        splits=splits,
    ).cpu()  # fmt: skip
    reference = reference_paged_decode_attention(q, keys, values, table, lengths_t, scale=scale)
    check_rows(shape, {"kernel": out, "reference": reference}, q, keys, values, table, lengths_t, scale)


def check_rows(shape, outputs: dict, q, keys, values, table, lengths, scale) -> None:
    """Each output (name -> [B, H, D], on the CPU) within the bound of the module docstring, row by row."""
    page = keys.shape[1]
    for row, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        pages = table[row].long()[positions // page]
        offsets = positions % page
        exact, magnitude = exact_attention(q[row], keys[pages, offsets], values[pages, offsets], scale)
        bound = 2**-6 * (exact.abs() + magnitude)
        for name, out in outputs.items():
            error = (out[row].double() - exact).abs()
            assert bool((error <= bound).all()), (
                f"{name}, {shape[:4]} row {row} of length {length}: error {float(error.max()):.3g} over the bound "
                f"{float(bound.min()):.3g}"
            )


def check_operand(shape, device: str, splits: int | None = None) -> None:
    """The operand form of a call is its plain output's operand, row by row."""
    heads, kv_heads, dim, _, lengths = shape
    assert paged_operand_supported(heads, kv_heads, dim)
    inputs = [t.to(device) for t in paged_case(shape)[:5]]
    scale = dim**-0.5
    plain = paged_decode_attention(*inputs, scale=scale, splits=splits)
    operand = paged_decode_attention(*inputs, scale=scale, operand=True, splits=splits)
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
    with pytest.raises(ValueError, match="splits must be 1"):
        paged_decode_attention(q, pages, pages, table, lengths, splits=65)


def test_the_split_count_depends_on_shapes_only():
    """About two programs an SM (132 on the CPU, an H100's), at most 64 splits and the blocks of a full row (64
    positions: 4 pages of 16, 2 of 32, 1 of 64 or more); 1 where the rows and KV heads fill the GPU."""
    cpu = torch.device("cpu")
    assert paged_splits(1, 8, 2048, 16, cpu) == 33  # the 32B model, one row: 264 programs
    assert paged_splits(2, 8, 2048, 16, cpu) == 17
    assert paged_splits(16, 8, 2048, 16, cpu) == 3
    assert paged_splits(33, 8, 2048, 16, cpu) == 1
    assert paged_splits(1, 4, 2048, 16, cpu) == 64  # at most MAX_SPLITS
    assert paged_splits(1, 8, 20, 16, cpu) == 5  # 320 positions: 5 blocks
    assert paged_splits(1, 8, 10, 32, cpu) == 5
    assert paged_splits(1, 8, 3, 128, cpu) == 3
    assert paged_splits(1, 8, 1, 16, cpu) == 1  # one page: one block


def test_the_kernel_in_the_interpreter():
    """Runs ``interpreter_cases`` below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout}\n{done.stderr}"
    expected = (len(INTERPRETED) + len(OPERAND_INTERPRETED) + len(ROTARY_SHAPES)
                + sum(len(counts) for _, counts in SPLIT_INTERPRETED) + len(SPLIT_OPERAND_INTERPRETED))  # fmt: skip
    assert done.stdout.count("ok ") == expected, done.stdout


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


def split_cuda_case(rows: int):
    """The 32B model's attention for ``rows`` rows of up to 4096 positions (256 pages of 16), lengths of all sizes."""
    more = torch.randint(1, 4097, (max(0, rows - 8),), generator=torch.Generator().manual_seed(rows))
    lengths = [4096, 1, 1000, 17, 2500, 64, 65, 300][:rows] + more.tolist()
    return (40, 8, 128, 16, lengths)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", SPLIT_CUDA_ROWS)
def test_the_split_kernel_on_cuda(rows):
    shape = split_cuda_case(rows)
    assert paged_splits(rows, 8, 256, 16, torch.device("cuda")) > 1  # 132 SMs (H100) or more: split
    check_paged(shape, "cuda")
    check_paged(shape, "cuda", splits=1)
    check_paged(shape, "cuda", splits=7)
    check_operand(shape, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", SPLIT_CUDA_ROWS)
def test_a_captured_call_replays_for_other_lengths(rows):
    """A CUDA graph of one call (plain and operand), captured at some lengths and replayed after they change in
    place: within the bound for the new lengths, and bit for bit the call made without the graph."""
    shape = split_cuda_case(rows)
    q, keys, values, table, lengths, scale = paged_case(shape)
    inputs = [t.cuda() for t in (q, keys, values, table, lengths)]
    paged_decode_attention(*inputs, scale=scale)  # compile outside the capture
    paged_decode_attention(*inputs, scale=scale, operand=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*inputs, scale=scale)
        operand = paged_decode_attention(*inputs, scale=scale, operand=True)
    gen = torch.Generator().manual_seed(rows)
    for _ in range(3):
        # shorter lengths keep each row on its pages (whose positions past the old length hold 1e30 / NaN: not
        # read), some as long as before, some one position
        new = torch.minimum(lengths, torch.randint(1, 4097, (rows,), generator=gen, dtype=torch.int32))
        new[0] = 1 if rows > 1 else new[0]
        inputs[4].copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        eager = paged_decode_attention(*inputs, scale=scale)
        assert torch.equal(out, eager)
        check_rows(shape, {"graph": out.cpu()}, q, keys, values, table, new, scale)
        for row in range(rows):
            got = operand if rows == 1 else RowOperand(operand.values[row], operand.sums[row])
            assert_operand(got, out[row].reshape(-1))


def interpreter_cases() -> None:
    for shape in INTERPRETED:
        check_paged(shape, "cpu")
        print("ok paged_decode_attention", shape[:4])
    for shape in OPERAND_INTERPRETED:
        check_operand(shape, "cpu")
        print("ok paged_decode_attention(operand=True)", shape[:4], len(shape[4]), "rows")
    for shape, counts in SPLIT_INTERPRETED:
        for splits in counts:
            check_paged(shape, "cpu", splits)
            print(f"ok paged_decode_attention(splits={splits})", shape[:4])
    for shape, splits in SPLIT_OPERAND_INTERPRETED:
        check_operand(shape, "cpu", splits)
        print(f"ok paged_decode_attention(operand=True, splits={splits})", shape[:4], len(shape[4]), "rows")
    for shape in ROTARY_SHAPES:
        check_rotary_pool_write(shape, "cpu")
        print("ok rotary_pool_write", shape)


if __name__ == "__main__":
    interpreter_cases()
