"""The decode-step attention kernels (``compute/kernels/attention.py``) against independent references, on fresh
random inputs.

* On CPU: the plain-torch references against transformers' own ``apply_rotary_pos_emb`` and ``StaticLayer`` (bit
  for bit) and against a float64 attention; the wrappers refuse bad operands.
* The Triton kernels on CPU, through the Triton interpreter, in a child process (``TRITON_INTERPRET=1`` must be set
  before ``@triton.jit`` runs): this file, executed as a script. Tiny shapes, several splits, one whole decode step
  against HF's ``Qwen2Attention`` with a ``StaticCache``.
* On CUDA (``gpu``-marked): the same at the 32B model's shapes, a CUDA-graph capture replayed at positions changed
  in place, and the decode step against HF's ``Qwen2Attention``.

Tolerances:

* ``rotary_cache_write`` sums the partials in the reference's order and rounds where it does, so on CUDA it must
  equal ``reference_rotary_cache_write`` bit for bit (q, both whole caches, the length). The interpreter rounds
  fp32 -> bf16 toward zero; its expected values are the same arithmetic with truncation at each rounding point,
  and at most 1 bf16 ulp is allowed.
* ``decode_attention`` against float64 attention over positions ``0 .. position``: per element
  ``|out - exact| <= 2**-6 * (|exact| + sum_i p_i |v_i|)``, and relative (norm-wise) error below 1e-2. The kernel's
  errors are the bf16 probabilities in the second product (2**-8 of ``sum_i p_i |v_i|``) and the output's rounding
  (2**-8 of ``|exact|`` on CUDA, 2**-7 truncating in the interpreter): a factor of 2 to 4 inside the bound. The
  value at ``position`` is scaled by ``4 (position + 1)`` and every cache entry past it is huge (1e30) or NaN, so a
  split, mask or position off by one breaks the bound by far.
* The decode step against HF's module: HF's bf16 projection rounds cuBLAS's (or oneDNN's) fp32 accumulation and its
  eager attention rounds scores to bf16, so there the comparison is norm-wise relative: the written cache rows to
  2**-6 and the layer's output to 2e-2 on CUDA; 2**-5 and 4e-2 in the interpreter, whose truncations bias every
  rounding the same way (``check_against_hf_attention``).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from compute.kernels import attention
from compute.kernels.attention import (
    SplitConfig,
    attended_slots,
    decode_attention,
    reference_decode_attention,
    reference_rotary_cache_write,
    rotary_cache_write,
    split_config,
)
from compute.kernels.gemv import RowOperand
from conftest import capture_graph
from test_kernels import assert_operand

REPO = Path(__file__).resolve().parent.parent
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (H, KVH, D, S partials, bias, C): G = 2, 1 (H == KVH), 3 (not a power of two), the 32B model's 40/8/128 with
# eight partials (its q/k/v GEMV's split-K), a 7B-like 28/4 and a 1.5B-like 12/2 (D = 128), D = 64.
ROTARY_SHAPES = [
    (4, 2, 16, 1, True, 24),
    (4, 4, 32, 3, False, 8),
    (6, 2, 16, 2, True, 5),
    (40, 8, 128, 8, True, 4096),
    (28, 4, 128, 4, True, 1000),
    (12, 2, 64, 1, True, 300),
]
INTERPRETED_ROTARY_SHAPES = ROTARY_SHAPES[:3]
# (H, KVH, D, C, (block_keys, splits) or None for split_config's): one block larger than the cache, G = 4 (and
# the row operand in groups of eight heads); four blocks, the
# last partial, one per split; five blocks of 16 over three splits (two steps, the last block partial), G = 5;
# H == KVH, two steps; more splits than blocks, D = 64 with G = 4. On CUDA: the 32B model's shapes at several
# capacities (split_config's: 64 splits of one block, 16 splits with a partial last block, 64 splits of eight
# blocks), G = 6, G = 1 with five splits of five steps, 128-key blocks with D = 16.
ATTENTION_SHAPES = [
    (8, 2, 16, 40, None),
    (4, 2, 16, 200, None),
    (5, 1, 32, 70, (16, 3)),
    (2, 2, 16, 50, (16, 2)),
    (8, 2, 64, 33, (32, 4)),
    (40, 8, 128, 4096, None),
    (40, 8, 128, 1000, None),
    (40, 8, 128, 32768, None),
    (12, 2, 64, 2048, None),
    (8, 8, 32, 777, (32, 5)),
    (10, 2, 16, 300, (128, 2)),
]
INTERPRETED_ATTENTION_SHAPES = ATTENTION_SHAPES[:5]
# (shape, T rows, tree or chain, q tile elements or None for the kernel's): one to five rows, a chain and random
# trees; G = 5 with 3 rows (15 of a 16-row tile); row groups (20 rows of G = 4 in two 16-row tiles); 5 rows with
# the operand (H * D = 512).
INTERPRETED_ROW_CASES = [
    (ATTENTION_SHAPES[0], 1, True, None),
    (ATTENTION_SHAPES[3], 3, False, None),
    (ATTENTION_SHAPES[3], 5, True, None),
    (ATTENTION_SHAPES[2], 3, True, None),
    ((8, 2, 16, 50, (16, 2)), 5, True, 16 * 16),
    (ATTENTION_SHAPES[4], 5, False, None),
]
# (hidden, H, KVH, C) of a one-layer Qwen2 attention for the whole decode step against HF
HF_SHAPES = [(64, 4, 2, 40), (320, 10, 2, 300), (5120, 40, 8, 2048)]
INTERPRETED_HF_SHAPES = HF_SHAPES[:1]
# the attention module's cache argument: ``cache`` in transformers 5.24, ``past_key_values`` in 5.17 (the H200 image)
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(Qwen2Attention.forward).parameters else "past_key_values"


def bf16_ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in bf16 units in the last place of the larger of the two (8 significant bits)."""
    out, ref = out.double(), ref.double()
    exponent = torch.frexp(torch.maximum(out.abs(), ref.abs()).clamp(min=2.0**-126))[1].double()
    return (out - ref).abs() / 2.0 ** (exponent - 8)


def _truncated(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 toward zero, as the Triton interpreter converts (CUDA rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _nearest(t: torch.Tensor) -> torch.Tensor:
    return t.float().to(torch.bfloat16)


def positions_of(capacity: int) -> list[int]:
    """The first two positions, one in the middle (odd, so that it is not a split boundary), the last."""
    return sorted({0, min(1, capacity - 1), capacity // 2 | 1 if capacity > 2 else 0, capacity - 1})


# ---------------------------------------------------------------------------------------------------- operands


def rotary_operands(heads: int, kv_heads: int, dim: int, splits: int, with_bias: bool, capacity: int, device: str,
                    rows: int = 1):  # fmt: skip
    """Random partials for ``rows`` rows, bias, cos/sin of random angles (one set a row), and caches full of random
    history (the last two, which the call writes into)."""
    n = (heads + 2 * kv_heads) * dim
    partials = torch.randn(splits, rows, n, device=device) * 2 / splits**0.5  # (S, T, N)
    bias = torch.randn(n, device=device).to(torch.bfloat16) if with_bias else None
    angle = torch.rand(rows, dim // 2, device=device, dtype=torch.float64) * 100
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1).to(torch.bfloat16).view(1, rows, dim)
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1).to(torch.bfloat16).view(1, rows, dim)
    keys = torch.randn(1, kv_heads, capacity, dim, device=device).to(torch.bfloat16)
    values = torch.randn(1, kv_heads, capacity, dim, device=device).to(torch.bfloat16)
    return partials, bias, cos, sin, keys, values


def expected_rotary(partials, bias, cos, sin, heads, kv_heads, round_bf16):
    """(q, k, v) as [T, heads, D] bf16: the module docstring's arithmetic written out in fp32, each rounding point
    made by ``round_bf16`` (to nearest on CUDA, toward zero in the interpreter)."""
    rows, dim = partials.shape[1], cos.shape[-1]
    total = partials[0].float().clone()
    for partial in partials[1:]:
        total = total + partial
    if bias is not None:
        total = total + bias.float()
    x = round_bf16(total).float().view(rows, heads + 2 * kv_heads, dim)
    half = dim // 2
    partner = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.float().view(rows, 1, dim), sin.float().view(rows, 1, dim)
    rotated = round_bf16(round_bf16(x * cos).float() + round_bf16(partner * sin).float())
    return rotated[:, :heads], rotated[:, heads : heads + kv_heads], round_bf16(x[:, heads + kv_heads :])


def random_tree(rows: int) -> tuple[list[int], list[int]]:
    """A random draft tree of ``rows`` tokens in topological order, row 0 its root: (each row's ancestors and itself
    as bits, each row's depth)."""
    bits, depths = [1], [0]
    for t in range(1, rows):
        parent = int(torch.randint(t, ()))
        bits.append(bits[parent] | 1 << t)
        depths.append(depths[parent] + 1)
    return bits, depths


def attended_mask(position: int, rows: int, capacity: int, tree: list[int] | None) -> torch.Tensor:
    """bool [T, C], written out slot by slot: row t attends every slot below ``position`` and slot ``position + j``
    for j <= t (a chain) or for the bits j of ``tree[t]``."""
    mask = torch.zeros(rows, capacity, dtype=torch.bool)
    for t in range(rows):
        mask[t, : min(position, capacity)] = True
        for j in range(rows):
            chosen = j <= t if tree is None else (tree[t] >> j) & 1
            if chosen and position + j < capacity:
                mask[t, position + j] = True
    return mask


def attention_operands(heads: int, kv_heads: int, dim: int, capacity: int, position: int, garbage: str, device: str,
                       rows: int = 1):  # fmt: skip
    """q [T, H, D] and caches for attending over ``0 .. position + T - 1``: the values at the T draft slots are made
    large (so that leaving one out shows), every entry past them is huge or NaN (so that reading one shows)."""
    q = torch.randn(rows, heads, dim, device=device).to(torch.bfloat16)
    keys = torch.randn(1, kv_heads, capacity, dim, device=device)
    values = torch.randn(1, kv_heads, capacity, dim, device=device)
    values[:, :, position : position + rows] *= 4 * (position + rows)
    beyond = slice(position + rows, None)
    keys[:, :, beyond] = 1e30 * torch.randn_like(keys[:, :, beyond]).sign()
    values[:, :, beyond] = float("nan") if garbage == "nan" else 1e30
    return q, keys.to(torch.bfloat16), values.to(torch.bfloat16)


def float64_attention(q, keys, values, position: int, scale: float, tree: list[int] | None = None):
    """(out, spread) [1, T, H * D] float64: attention of each row of q [T, H, D] over its ``attended_mask`` slots,
    query head h on KV head h // (H / KVH), and sum_i p_i |v_i| per element."""
    rows, heads = q.shape[0], q.shape[1]
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    mask = attended_mask(position, rows, capacity, tree).to(q.device)  # (T, C)
    used = mask.any(0)[None, :, None]  # slots no row attends may hold garbage: zero them, not 0 * NaN
    k = torch.where(used, keys[0].double(), 0).repeat_interleave(heads // kv_heads, dim=0)  # (H, C, D)
    v = torch.where(used, values[0].double(), 0).repeat_interleave(heads // kv_heads, dim=0)
    scores = scale * torch.einsum("thd,hcd->thc", q.double(), k).masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (T, H, C)
    out = torch.einsum("thc,hcd->thd", p, v)
    spread = torch.einsum("thc,hcd->thd", p, v.abs())
    return out.reshape(1, rows, -1), spread.reshape(1, rows, -1)


def assert_attention_close(out: torch.Tensor, exact: torch.Tensor, spread: torch.Tensor) -> None:
    """The bound of the module docstring, with margin (see the tolerances above)."""
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all(), "non-finite output: a masked position was read"
    error = (out.double() - exact).abs()
    worst = (error / (2**-6 * (exact.abs() + spread))).max().item()
    assert worst <= 1, f"error {worst:.2f} times the bound 2**-6 (|exact| + sum p |v|)"
    relative = (error.norm() / exact.norm()).item()
    assert relative < 1e-2, f"relative error {relative:.2e}"


def check_rotary(shape, device: str, round_bf16, rows: int = 1) -> None:
    """The kernel on one shape at several positions for ``rows`` rows: q, the caches (slots ``position .. position +
    T - 1`` inside the cache written, nothing else) and the length, against ``expected_rotary`` (interpreter) or
    ``reference_rotary_cache_write`` (CUDA, bit for bit)."""
    heads, kv_heads, dim, _, _, capacity = shape
    for position in positions_of(capacity):  # the last position's later rows fall past the cache
        partials, bias, cos, sin, keys, values = rotary_operands(*shape, device, rows=rows)
        where = torch.tensor([[position]], device=device)
        length = torch.tensor(position, device=device)
        ref_keys, ref_values, ref_length = keys.clone(), values.clone(), length.clone()
        q = rotary_cache_write(
            partials, bias, cos, sin, keys, values, where, length, num_heads=heads, num_kv_heads=kv_heads
        )
        assert q.shape == (rows, heads, dim) and q.dtype == torch.bfloat16 and q.is_contiguous()
        assert length.item() == position + rows
        if round_bf16 is _nearest:
            ref_q = reference_rotary_cache_write(
                partials, bias, cos, sin, ref_keys, ref_values, where, ref_length,
                num_heads=heads, num_kv_heads=kv_heads,
            )  # fmt: skip
            assert torch.equal(q, ref_q)
            assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
            continue
        ref_q, ref_k, ref_v = expected_rotary(partials, bias, cos, sin, heads, kv_heads, round_bf16)
        inside = min(rows, capacity - position)
        ref_keys[0, :, position : position + inside] = ref_k[:inside].transpose(0, 1)
        ref_values[0, :, position : position + inside] = ref_v[:inside].transpose(0, 1)
        for name, ours, theirs in (("q", q, ref_q), ("keys", keys, ref_keys), ("values", values, ref_values)):
            ulps = bf16_ulps(ours, theirs).max().item()
            assert ulps <= 1, f"{name} off by {ulps:.1f} bf16 ulps at position {position} of shape {shape}"


def check_attention(shape, device: str, rows: int = 1, tree: bool = False) -> None:
    """The kernel on one shape at several positions for ``rows`` rows (a chain, or a fresh random tree at each
    position), against float64 (garbage past the draft slots alternately huge and NaN); the row operand too."""
    heads, kv_heads, dim, capacity, blocks = shape
    scale = dim**-0.5
    config = split_config(capacity) if blocks is None else SplitConfig(block_keys=blocks[0], splits=blocks[1])
    # and either side of the first block's end and of the first round's (a block, a split, a step with one live key)
    ends = (config.block_keys, config.block_keys * config.splits)
    positions = sorted(set(positions_of(capacity)) | {p for end in ends for p in (end - 1, end) if p < capacity})
    for i, position in enumerate(positions):
        q, keys, values = attention_operands(
            heads, kv_heads, dim, capacity, position, ("huge", "nan")[i % 2], device, rows=rows
        )
        bits = random_tree(rows)[0] if tree else None
        tree_tensor = None if bits is None else torch.tensor(bits, dtype=torch.int32, device=device)
        where = torch.tensor([position], device=device)
        out = decode_attention(q, keys, values, where, scale, tree=tree_tensor, config=config)
        assert_attention_close(out, *float64_attention(q, keys, values, position, scale, bits))
        if i in (0, len(positions) - 1) and (heads * dim) % 128:  # not whole groups: no operand
            with pytest.raises(ValueError, match="needs H \\* D a multiple of 128"):
                decode_attention(q, keys, values, where, scale, tree=tree_tensor, config=config, operand=True)
        elif i in (0, len(positions) - 1):  # the o_proj GEMV's row operand, of the same rows
            operand = decode_attention(q, keys, values, where, scale, tree=tree_tensor, config=config, operand=True)
            if rows == 1:
                assert_operand(operand, out.view(-1))
            else:
                assert operand.rows == rows
                for t in range(rows):
                    assert_operand(RowOperand(operand.values[t], operand.sums[t]), out[0, t])


def check_against_hf_attention(shape, device: str, rows: int = 1, tree: bool = False, kernels: bool = True) -> None:
    """A decode step (one row) or a verify pass (``rows`` draft tokens, a chain or a random tree) of a one-layer
    Qwen2 attention with a ``StaticCache`` holding ``position`` tokens of random history: HF's module (eager
    attention, an explicit additive 4-D mask, rotary positions ``position`` + depth) against the projection as two
    fp32 partials, the kernels (or, without ``kernels``, their references) and the module's ``o_proj``. Also the
    written cache rows and the length.

    Norm-wise relative tolerances: on CUDA 2**-6 for the rows (they differ where the projection's summation order,
    cuBLAS's against two fp32 partials, flips a rounding: an ulp here and there, which the rotation can double) and
    2e-2 for the output (HF's eager attention rounds scores and probabilities to bf16). The interpreter truncates at
    every rounding, a bias of up to an ulp each time that does not average out (seen: 1.4e-2 on rows, 1.5e-2 on the
    output over 30 runs), so there 2**-5 and 4e-2. A wrong head, row or rotation is off by O(1)."""
    hidden_size, heads, kv_heads, capacity = shape
    interpreted = device == "cpu" and kernels
    row_tolerance, out_tolerance = (2**-5, 4e-2) if interpreted else (2**-6, 2e-2)
    write, attend = (rotary_cache_write, decode_attention) if kernels else (
        reference_rotary_cache_write, reference_decode_attention
    )  # fmt: skip
    config = Qwen2Config(
        hidden_size=hidden_size, num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=1,
        intermediate_size=4 * hidden_size, max_position_embeddings=4 * capacity,
    )  # fmt: skip
    config._attn_implementation = "eager"
    attention = Qwen2Attention(config, layer_idx=0).to(device=device, dtype=torch.bfloat16)
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        projection.bias.data.normal_(0, 0.5)  # biases that matter, as in Qwen2 checkpoints
    rotary = Qwen2RotaryEmbedding(config).to(device)
    dim = attention.head_dim
    for position in [p for p in positions_of(capacity) if p + rows <= capacity][1::2]:  # a neighbour of the first
        cache = StaticCache(config=config, max_cache_len=capacity)
        layer = cache.layers[0]
        stand_in = torch.empty(1, kv_heads, 1, dim, dtype=torch.bfloat16, device=device)
        layer.lazy_initialization(stand_in, stand_in)
        layer.keys.normal_()
        layer.values.normal_()
        layer.cumulative_length.fill_(position)
        keys, values, length = layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone()

        bits, depths = random_tree(rows) if tree else (None, list(range(rows)))
        hidden = torch.randn(1, rows, hidden_size, device=device).to(torch.bfloat16)
        where = torch.tensor([[position]], device=device)
        cos, sin = rotary(hidden, torch.tensor([depths], device=device) + position)  # rotary: position + depth
        mask = torch.zeros(1, 1, rows, capacity, dtype=torch.bfloat16, device=device)
        mask[0, 0][~attended_mask(position, rows, capacity, bits).to(device)] = torch.finfo(torch.bfloat16).min
        tree_tensor = None if bits is None else torch.tensor(bits, dtype=torch.int32, device=device)
        with torch.inference_mode():
            theirs, _ = attention(hidden, position_embeddings=(cos, sin), attention_mask=mask, **{CACHE_KEYWORD: cache})

            weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).float()
            bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
            x = hidden.view(rows, hidden_size).float()
            half = hidden_size // 2
            partials = torch.stack([F.linear(x[:, :half], weight[:, :half]), F.linear(x[:, half:], weight[:, half:])])
            q = write(partials, bias, cos, sin, keys, values, where, length, num_heads=heads, num_kv_heads=kv_heads)
            ours = attention.o_proj(attend(q, keys, values, where, attention.scaling, tree=tree_tensor))

        assert torch.equal(length, layer.cumulative_length)
        end = position + rows
        for name, mine, hf in (("keys", keys, layer.keys), ("values", values, layer.values)):
            assert torch.equal(mine[:, :, :position], hf[:, :, :position]), f"{name} before the position changed"
            assert torch.equal(mine[:, :, end:], hf[:, :, end:]), f"{name} after the rows changed"
            row, hf_row = mine[:, :, position:end].float(), hf[:, :, position:end].float()
            relative = ((row - hf_row).norm() / hf_row.norm()).item()
            assert relative < row_tolerance, f"{name} rows {position} ... {end - 1} differ from HF's by {relative:.2e}"
        assert ours.shape == theirs.shape
        relative = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
        assert relative < out_tolerance, f"the step differs from HF's by {relative:.2e} at position {position}"


# ---------------------------------------------------------------------------------------------------- CPU


def test_split_config_gives_one_split_per_block_up_to_64():
    assert split_config(1) == split_config(64) == SplitConfig(block_keys=64, splits=1)
    assert split_config(65) == SplitConfig(block_keys=64, splits=2)
    assert split_config(1000) == SplitConfig(block_keys=64, splits=16)
    assert split_config(4096) == split_config(131072) == SplitConfig(block_keys=64, splits=64)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("shape", INTERPRETED_ROTARY_SHAPES + [(40, 8, 128, 8, True, 64)])
def test_reference_rotary_cache_write_is_hf_bit_for_bit(shape, rows):
    """The reference against transformers' ``apply_rotary_pos_emb`` and ``StaticLayer.update`` on the same
    projection, with cos/sin from ``Qwen2RotaryEmbedding`` (several rows: at a random tree's positions, prefix plus
    depth, while the cache slots follow one another); and against ``expected_rotary``. Past the cache nothing is
    written (HF refuses those slots)."""
    heads, kv_heads, dim, _, _, capacity = shape
    config = Qwen2Config(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    rotary = Qwen2RotaryEmbedding(config)
    for position in positions_of(capacity):
        partials, bias, _, _, keys, values = rotary_operands(*shape, "cpu", rows=rows)
        where = torch.tensor([[position]])
        cos, sin = rotary(keys, torch.tensor([random_tree(rows)[1]]) + position)  # (1, T, D) each
        length = torch.tensor(position)
        layer = StaticLayer(max_cache_len=capacity)
        layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])
        layer.keys.copy_(keys)
        layer.values.copy_(values)
        layer.cumulative_length.fill_(position)
        before_keys, before_values = keys.clone(), values.clone()

        q = reference_rotary_cache_write(
            partials, bias, cos, sin, keys, values, where, length, num_heads=heads, num_kv_heads=kv_heads
        )
        total = partials[0].clone()  # the projection as the module docstring defines it: partials in order, bias
        for partial in partials[1:]:
            total += partial
        projected = (total + (0 if bias is None else bias.float())).to(torch.bfloat16)
        states = projected.view(1, rows, -1, dim).transpose(1, 2)  # (B, heads, T, D)
        hf_q, hf_k = apply_rotary_pos_emb(states[:, :heads], states[:, heads : heads + kv_heads], cos, sin)
        inside = min(rows, capacity - position)  # the rows whose slots are in the cache
        layer.update(hf_k[:, :, :inside], states[:, heads + kv_heads :, :inside])

        assert q.shape == (rows, heads, dim) and torch.equal(q, hf_q.transpose(1, 2).reshape(rows, heads, dim))
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)
        assert length.item() == position + rows
        exp_q, exp_k, exp_v = expected_rotary(partials, bias, cos, sin, heads, kv_heads, _nearest)
        assert torch.equal(q, exp_q)
        assert torch.equal(keys[0, :, position : position + inside], exp_k[:inside].transpose(0, 1))
        assert torch.equal(values[0, :, position : position + inside], exp_v[:inside].transpose(0, 1))
        for cache, before in ((keys, before_keys), (values, before_values)):  # the other slots as they were
            assert torch.equal(cache[:, :, :position], before[:, :, :position])
            assert torch.equal(cache[:, :, position + inside :], before[:, :, position + inside :])


@pytest.mark.parametrize("shape", INTERPRETED_ATTENTION_SHAPES)
def test_reference_decode_attention_against_float64(shape):
    heads, kv_heads, dim, capacity, _ = shape
    for position in positions_of(capacity):
        q, keys, values = attention_operands(heads, kv_heads, dim, capacity, position, "huge", "cpu")
        out = reference_decode_attention(q, keys, values, torch.tensor([[position]]), dim**-0.5)
        exact, spread = float64_attention(q, keys, values, position, dim**-0.5)
        # HF's arithmetic also rounds the scores to bf16 (an error of 2**-8 |score| in each exponent)
        torch.testing.assert_close(out.double(), exact, atol=0.05 * spread.max().item(), rtol=0.05)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("rows", [1, 3, 5, 16])
@pytest.mark.parametrize("shape", INTERPRETED_ATTENTION_SHAPES[:3])
def test_reference_decode_attention_of_several_rows_against_float64(shape, rows, tree):
    """T rows with a chain or a random tree (each row attends its ancestors and itself), the mask written out slot
    by slot (``attended_mask``); also ``attended_slots`` against it."""
    heads, kv_heads, dim, capacity, _ = shape
    for position in [p for p in positions_of(capacity) if p + rows <= capacity] + [capacity - 1]:
        q, keys, values = attention_operands(heads, kv_heads, dim, capacity, position, "huge", "cpu", rows=rows)
        bits = random_tree(rows)[0] if tree else None
        where = torch.tensor([position])
        tree_tensor = None if bits is None else torch.tensor(bits, dtype=torch.int32)
        slots = attended_slots(where, tree_tensor, rows, capacity)
        assert torch.equal(slots, attended_mask(position, rows, capacity, bits))
        out = reference_decode_attention(q, keys, values, where, dim**-0.5, tree=tree_tensor)
        exact, spread = float64_attention(q, keys, values, position, dim**-0.5, bits)
        assert out.shape == (1, rows, heads * dim)
        torch.testing.assert_close(out.double(), exact, atol=0.05 * spread.max().item(), rtol=0.05)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("shape", INTERPRETED_HF_SHAPES + [(320, 10, 2, 300)])
def test_the_references_match_hf_attention_for_a_verify_pass(shape, rows, tree):
    """The references through a whole attention layer against HF's ``Qwen2Attention`` with a ``StaticCache`` and an
    explicit 4-D mask: T draft tokens, a chain or a tree (``check_against_hf_attention``)."""
    check_against_hf_attention(shape, "cpu", rows=rows, tree=tree, kernels=False)


def test_the_wrappers_refuse_bad_operands():
    partials, bias, cos, sin, keys, values = rotary_operands(4, 2, 16, 2, True, 8, "cpu")
    position, length = torch.tensor([[3]]), torch.tensor(3)

    def write(**changes):
        operands = dict(
            qkv_partials=partials, bias=bias, cos=cos, sin=sin, key_cache=keys, value_cache=values,
            position=position, cache_length=length, num_heads=4, num_kv_heads=2,
        )  # fmt: skip
        operands.update(changes)
        return rotary_cache_write(**operands)

    with pytest.raises(ValueError, match=r"fp32 \[S, T, N\] with N = \(H \+ 2 KVH\) D = 128"):
        write(qkv_partials=partials[:, :, :96])
    with pytest.raises(ValueError, match="fp32"):
        write(qkv_partials=partials.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"bias must be bf16 \[N\] = \[128\]"):
        write(bias=bias.float())
    with pytest.raises(ValueError, match="cos must be bf16"):
        write(cos=cos.float())
    with pytest.raises(ValueError, match="caches must be bf16"):
        write(key_cache=keys.float())
    with pytest.raises(ValueError, match=r"both be \[1, KVH, C, D\]"):
        write(value_cache=values[:, :1])
    with pytest.raises(ValueError, match="contiguous"):
        write(key_cache=keys.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="D = 24 is not supported"):
        write(key_cache=keys[..., :12].repeat(1, 1, 1, 2), value_cache=values[..., :12].repeat(1, 1, 1, 2))
    with pytest.raises(ValueError, match="num_heads = 3 must be a positive multiple of num_kv_heads = 2"):
        write(num_heads=3)
    with pytest.raises(ValueError, match="one-element int64"):
        write(position=position.int())
    with pytest.raises(ValueError, match="one-element int64"):
        write(position=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="cache_length must be a 0-d int64"):
        write(cache_length=length.view(1))
    with pytest.raises(ValueError, match=r"qkv_partials holds 17 rows \(tokens\): it must hold 1 ... 16"):
        write(qkv_partials=partials.repeat(1, 17, 1))
    with pytest.raises(ValueError, match=r"cos must be bf16 \[1, T, D\] with T = 2 and D = 16"):
        write(qkv_partials=partials.repeat(1, 2, 1))

    q = torch.randn(1, 4, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"q must be bf16 \[T, H, D\] with D = 16"):
        decode_attention(q.float(), keys, values, position, 0.25)
    with pytest.raises(ValueError, match="H = 3 query heads must be a positive multiple of the caches' KVH = 2"):
        decode_attention(q[:, :3], keys, values, position, 0.25)
    with pytest.raises(ValueError, match="one-element int64"):
        decode_attention(q, keys, values, position.float(), 0.25)
    with pytest.raises(ValueError, match=r"q holds 17 rows \(tokens\): it must hold 1 ... 16"):
        decode_attention(q.repeat(17, 1, 1), keys, values, position, 0.25)
    chain = torch.tensor([1, 3, 7], dtype=torch.int32)
    for tree in (chain.long(), chain[:2], chain.view(3, 1)):
        with pytest.raises(ValueError, match=r"tree must be an int32 \[T\] = \[3\] tensor on cpu"):
            decode_attention(q.repeat(3, 1, 1), keys, values, position, 0.25, tree=tree)
    for config in (SplitConfig(block_keys=24, splits=2), SplitConfig(block_keys=16, splits=0), SplitConfig(16, 65)):
        with pytest.raises(ValueError, match="must have block_keys a power of two of at least 16 and 1 ... 64 splits"):
            decode_attention(q, keys, values, position, 0.25, config=config)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on one device"):
            decode_attention(q.cuda(), keys, values, position, 0.25)


def test_triton_kernels_in_the_interpreter():
    """Runs ``interpreter_cases`` below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout}\n{done.stderr}"
    expected = len(INTERPRETED_ROTARY_SHAPES) + len(INTERPRETED_ATTENTION_SHAPES) + len(INTERPRETED_HF_SHAPES)
    expected += len(INTERPRETED_ROTARY_SHAPES) + len(INTERPRETED_ROW_CASES) + 1
    assert done.stdout.count("ok ") == expected, done.stdout


def interpreter_cases() -> None:
    """The kernels on CPU tensors; this process must have TRITON_INTERPRET=1 set at start."""
    for shape in INTERPRETED_ROTARY_SHAPES:
        check_rotary(shape, "cpu", _truncated)
        print("ok rotary_cache_write", shape)
    for shape in INTERPRETED_ATTENTION_SHAPES:
        check_attention(shape, "cpu")
        print("ok decode_attention", shape)
    for shape in INTERPRETED_HF_SHAPES:
        check_against_hf_attention(shape, "cpu")
        print("ok decode step against HF", shape)
    for shape in INTERPRETED_ROTARY_SHAPES:
        check_rotary(shape, "cpu", _truncated, rows=3)
        print("ok rotary_cache_write, 3 rows", shape)
    for shape, rows, tree, tile_elements in INTERPRETED_ROW_CASES:
        if tile_elements:  # row groups: a smaller q tile than the shape would get
            attention._MAX_TILE_ELEMENTS, saved = tile_elements, attention._MAX_TILE_ELEMENTS
        check_attention(shape, "cpu", rows=rows, tree=tree)
        if tile_elements:
            attention._MAX_TILE_ELEMENTS = saved
        print("ok decode_attention", shape, rows, "rows", "tree" if tree else "chain")
    check_against_hf_attention(INTERPRETED_HF_SHAPES[0], "cpu", rows=4, tree=True)
    print("ok verify pass against HF", INTERPRETED_HF_SHAPES[0])


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", ROTARY_SHAPES)
def test_rotary_cache_write_is_the_reference_bit_for_bit_on_cuda(shape):
    check_rotary(shape, "cuda", _nearest)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_decode_attention_against_float64_on_cuda(shape):
    check_attention(shape, "cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", HF_SHAPES)
def test_the_decode_step_matches_hf_attention_on_cuda(shape):
    check_against_hf_attention(shape, "cuda")


@pytest.mark.gpu
@requires_cuda
def test_the_decode_step_replays_in_a_cuda_graph_at_new_positions():
    heads, kv_heads, dim, capacity = 10, 2, 64, 1000
    partials, bias, cos, sin, keys, values = rotary_operands(heads, kv_heads, dim, 2, True, capacity, "cuda")
    position = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    length = torch.zeros((), dtype=torch.long, device="cuda")
    scale = dim**-0.5

    def step() -> torch.Tensor:
        q = rotary_cache_write(
            partials, bias, cos, sin, keys, values, position, length, num_heads=heads, num_kv_heads=kv_heads
        )
        return decode_attention(q, keys, values, position, scale)

    graph, out = capture_graph(step)
    for new_position in (5, 999, 0, 517):
        position.fill_(new_position)
        partials.copy_(torch.randn_like(partials))
        fresh = rotary_operands(heads, kv_heads, dim, 2, True, capacity, "cuda")
        cos.copy_(fresh[2])
        sin.copy_(fresh[3])
        ref_keys, ref_values, ref_length = keys.clone(), values.clone(), length.clone()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_q = reference_rotary_cache_write(
            partials, bias, cos, sin, ref_keys, ref_values, position, ref_length, num_heads=heads, num_kv_heads=kv_heads
        )
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
        assert length.item() == new_position + 1 == ref_length.item()
        assert torch.equal(out, decode_attention(ref_q, ref_keys, ref_values, position, scale))
        assert_attention_close(out, *float64_attention(ref_q, keys, values, new_position, scale))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("shape", [(40, 8, 128, 4096, None), (40, 8, 128, 1000, None), (28, 4, 128, 300, (32, 3))])
def test_decode_attention_of_several_rows_on_cuda(shape, rows, tree):
    """The 32B model's shapes (T = 16: 80 query rows a KV head in one 128-row tile) and a 7B-like G = 7, against
    float64 (``check_attention``) and against the reference: the same T rows through the plain-torch path."""
    check_attention(shape, "cuda", rows=rows, tree=tree)
    heads, kv_heads, dim, capacity, _ = shape
    position = capacity // 3
    q, keys, values = attention_operands(heads, kv_heads, dim, capacity, position, "huge", "cuda", rows=rows)
    bits = random_tree(rows)[0] if tree else None
    tree_tensor = None if bits is None else torch.tensor(bits, dtype=torch.int32, device="cuda")
    where = torch.tensor([position], device="cuda")
    out = decode_attention(q, keys, values, where, dim**-0.5, tree=tree_tensor)
    ref = reference_decode_attention(q, keys, values, where, dim**-0.5, tree=tree_tensor)
    exact, spread = float64_attention(q, keys, values, position, dim**-0.5, bits)
    # the reference rounds its scores to bf16 (HF's arithmetic): both within the reference's CPU tolerance
    torch.testing.assert_close(ref.double(), exact, atol=0.05 * spread.max().item(), rtol=0.05)
    torch.testing.assert_close(out.double(), ref.double(), atol=0.05 * spread.max().item(), rtol=0.05)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", ROTARY_SHAPES[3:4])
def test_rotary_cache_write_of_16_rows_is_the_reference_bit_for_bit_on_cuda(shape):
    check_rotary(shape, "cuda", _nearest, rows=16)


@pytest.mark.gpu
@requires_cuda
def test_a_verify_pass_matches_hf_attention_on_cuda():
    check_against_hf_attention(HF_SHAPES[2], "cuda", rows=16, tree=True)
    check_against_hf_attention(HF_SHAPES[2], "cuda", rows=16, tree=False)


@pytest.mark.gpu
@requires_cuda
def test_a_verify_pass_replays_in_a_cuda_graph_at_new_positions_and_trees():
    """The 32B model's attention for T = 16 rows with a tree, captured once, replayed after writing a new position,
    tree, partials and cos/sin in place: the caches and the output as the same calls made outside the graph."""
    heads, kv_heads, dim, capacity, rows = 40, 8, 128, 4096, 16
    partials, bias, cos, sin, keys, values = rotary_operands(heads, kv_heads, dim, 8, True, capacity, "cuda", rows=rows)
    position = torch.zeros(1, dtype=torch.long, device="cuda")
    length = torch.zeros((), dtype=torch.long, device="cuda")
    tree = torch.tensor(random_tree(rows)[0], dtype=torch.int32, device="cuda")
    scale = dim**-0.5

    def step() -> RowOperand:
        q = rotary_cache_write(
            partials, bias, cos, sin, keys, values, position, length, num_heads=heads, num_kv_heads=kv_heads
        )
        return decode_attention(q, keys, values, position, scale, tree=tree, operand=True)

    graph, out = capture_graph(step)
    for new_position in (5, 4080, 0, 517):
        position.fill_(new_position)
        bits = random_tree(rows)[0]
        tree.copy_(torch.tensor(bits, dtype=torch.int32))
        partials.copy_(torch.randn_like(partials))
        fresh = rotary_operands(heads, kv_heads, dim, 8, True, capacity, "cuda", rows=rows)
        cos.copy_(fresh[2])
        sin.copy_(fresh[3])
        ref_keys, ref_values, ref_length = keys.clone(), values.clone(), length.clone()
        out.values.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_q = reference_rotary_cache_write(
            partials, bias, cos, sin, ref_keys, ref_values, position, ref_length, num_heads=heads, num_kv_heads=kv_heads
        )
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
        assert length.item() == new_position + rows == ref_length.item()
        eager = decode_attention(ref_q, ref_keys, ref_values, position, scale, tree=tree)
        for t in range(rows):
            assert_operand(RowOperand(out.values[t], out.sums[t]), eager[0, t])
        assert_attention_close(eager, *float64_attention(ref_q, keys, values, new_position, scale, bits))


if __name__ == "__main__":
    interpreter_cases()
