"""The decode step of a Qwen2 attention layer for one conversation, in three Triton launches, for CUDA bf16 and
CUDA graphs: one token, or the T tokens (1 ... ``MAX_ROWS``) of a speculative verify pass, a chain or a tree.

HF's decode step runs its rotary embedding (about ten small kernels), ``StaticLayer.update`` (``index_copy_``
and ``cumulative_length.add_``) and an attention of several ops over the whole static cache. Here:

* ``rotary_cache_write`` (one launch) adds the fused q/k/v projection's split-K partial sums and bias for each
  of the T rows, rotates the q and k heads by the row's cos/sin, writes row t's k and v into the cache at slot
  ``position + t`` and returns the rotated queries. Its arithmetic is HF's, rounding for rounding
  (``reference_rotary_cache_write``)::

      x = bf16(partials[0] + partials[1] + ... + bias)                 # fp32 sum, in this order, one rounding
      out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))           # q and k heads; v is x itself

  ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``. The kernel sums the partials in the reference's order and rounds
  at the same points, so on CUDA it is the reference bit for bit (its launch turns FP fusion off: LLVM would
  otherwise contract a product and the sum into one bf16 FMA, skipping a rounding). HF's own bf16 ``F.linear``
  rounds one fp32 accumulation in cuBLAS's order, so against HF the projection may differ by an ulp where the
  order tips a rounding.
* ``decode_attention`` (two launches) is ``softmax(scale * q k^T) v`` for each row t: over cache slots ``0 ..
  position - 1`` (the prefix) and the draft slots ``position + j`` of its chain (j <= t) or, given ``tree``,
  of the bits j set in ``tree[t]`` (``attended_slots``); one row without a tree is "positions 0 .. position".
  Query head ``h`` reads KV head ``h // (H / KVH)`` (HF's ``repeat_kv``), split over the cache ("flash
  decoding"): ``_split_attention_kernel`` leaves one fp32 partial output and log-sum-exp per (row, head, split),
  ``_combine_kernel`` weighs the splits into the bf16 output. Scores, running maxima and sums are fp32; the
  probabilities enter the second product as bf16, as in HF's eager attention (``softmax(...).to(bf16)``).
  Against float64 the output is within ``2**-8 * (|out| + sum_i p_i |v_i|)`` per element (bf16 probabilities
  and the output's rounding, each half an ulp; fp32 scores add far less for scores of ordinary size).

Operands, as the kernels see them (T rows, H query heads, KVH KV heads, G = H / KVH, D the head size, a power of
two in 16 ... 256, C the cache capacity, S split-K partial sums, N = (H + 2 KVH) D):

    qkv_partials   [S, T, N]        fp32, contiguous: features q heads, then k heads, then v heads, D each
    bias           [N] or absent    bf16
    cos, sin       [1, T, D]        bf16 (``Qwen2RotaryEmbedding``'s output for the rows' rotary positions, which
                                    in a tree are prefix + depth, not the slots), or [T, D] or [T, 1, D]
    key_cache      [1, KVH, C, D]   bf16, contiguous (a ``StaticLayer``'s ``keys``); value_cache the same
    position       [1] or [1, 1]    int64, on the device: row 0's cache slot (the prefix's length), never read
                                    by the host
    tree           [T] or absent    int32, on the device: bit j of tree[t] set if row t attends slot position + j
                                    (bit t must be); absent: a chain
    cache_length   []               int64 or absent (``StaticLayer.cumulative_length``): set to position + T
    q              [T, H, D]        bf16, contiguous (``rotary_cache_write``'s result)
    out            [1, T, H * D]    bf16, head-major per row (element t, h * D + d): HF's attention output after its
                                    ``reshape(B, T, H * D)``, what ``o_proj`` takes; or its ``RowOperand``
                                    (``[H * D]`` for one row, ``[T, H * D]`` for several)

Why this design:

* Rotary: one program per (head, row) (H + 2 KVH by T programs of D lanes), each reading its head's partials
  twice (the values and their ``rotate_half`` partners; the second read hits L1), so nothing crosses programs.
* Split-KV: one program per KV head would leave all but KVH of the GPU's SMs idle, so the cache is cut into blocks
  of ``block_keys`` slots dealt out to ``splits`` programs per KV head, grid ``(KVH, splits, row groups)``: split
  ``s`` takes blocks ``s, s + splits, s + 2 splits, ...``. The config depends only on C (``split_config``: 64-key
  blocks, at most ``MAX_SPLITS`` splits), so the grid and the workspaces are shapes, not data; dealing the blocks
  out round-robin spreads the live ones, ``0 .. position + T - 1``, evenly over the splits whatever the position,
  so a short context runs one block per program and a long one keeps every program busy (contiguous pieces, one
  per split, would leave most programs without live keys at short positions). A program with no live block returns
  at once, blocks past the live slots are skipped, and the combine reads only splits that hold a live block; slots
  past them inside the last live block are masked loads, never read, so whatever the cache holds there (stale
  keys, NaN) cannot reach the output.
* Each program serves all T * G query rows of its KV head (row m: token m // G, head m % G): q is a ``[BLOCK_M,
  D]`` tile (T * G padded to a power of two, at least 16) and both products are ``tl.dot`` on tensor cores, so
  each key and value row is read from memory once for all rows; the per-(row, key) mask comes from position and
  tree. The padding rows (11 of 16 for the 32B model's G = 5 at T = 1) cost nothing, the kernel being bound by the
  bytes of K and V. Tiles of more than 128 x 128 elements are cut into row groups (each reading K and V again);
  a 128-row tile (the 32B model at T = 16: 80 rows) runs 8 warps, so that its fp32 accumulator stays at 64
  registers a thread (ptxas for sm_90: 124 registers, no spills).
* A row may attend no key of a split (a split holding only draft slots of other branches): its running maximum
  stays -inf, so the kernel subtracts 0 instead (no ``-inf - -inf``), stores a zero mean and a log-sum-exp of
  -inf, and the combine gives that split weight 0. Every row attends its own slot, so its sum is never empty.
* Positions and the tree are device tensors read by the kernels; nothing synchronises with the host and every
  allocation's size depends on shapes only, so a call can be captured in a CUDA graph and replayed for any position
  and tree written in place.

Its speed on the H200 is in docs/performance.md ("Measurements behind the code").

What it promises, and what it does not: for ``0 <= position`` and ``position + T <= C`` the results above; for any
position value, no read or write outside the cache (outside ``[0, C)`` nothing is written; slots past the cache
are not attended, a negative position gives NaN). The Triton interpreter (CPU tensors) runs the same kernels, its
dots widened to fp32 (its bf16 ``tl.dot`` is wrong, as in gemv.py) and its fp32 -> bf16 conversions truncating
rather than rounding (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from compute.kernels.gemv import RowOperand, store_operand, sum_partials
from compute.kernels.gemv_mma import MAX_ROWS
from compute.kernels.pdl import early_launch, pdl, signal_dependents, wait_for_producers

__all__ = [
    "MAX_SPLITS",
    "SplitConfig",
    "attended_slots",
    "decode_attention",
    "reference_decode_attention",
    "reference_rotary_cache_write",
    "rotary_cache_write",
    "split_config",
]

MAX_SPLITS = 64  # splits per KV head at most: the combine holds [splits, D] fp32 in one program
_BLOCK_KEYS = 64  # keys per block: a [64, D] tile of K and one of V per step of a program
_MIN_DOT_ROWS = 16  # the smallest tensor-core tile: q tiles have at least this many rows
_MAX_TILE_ELEMENTS = 128 * 128  # q tile rows times D at most (the 32B model's 16 rows x 5 heads in one tile)
_TILE_ELEMENTS_PER_WARP = 2048  # the accumulator's fp32 elements per warp: 64 registers a thread
_LOG2_E = 1.4426950408889634  # scores are kept in base 2, for exp2


@triton.jit
def rotary_projection(part_ptr, stride_split, bias_ptr, first, cos, sin, D: tl.constexpr, SPLITS: tl.constexpr,
                      HAS_BIAS: tl.constexpr):  # fmt: skip
    """Features ``first … first + D - 1`` (one head) of a projection whose SPLITS partial rows lie ``stride_split``
    apart from ``part_ptr``: ``bf16(sum + bias)`` (in fp32, in split order) and HF's rotary of it with ``cos`` and
    ``sin`` (fp32 [D]). Returns (the projection, the rotated head), each a bf16 value, the first widened to fp32.

    rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] otherwise: the partner is summed again, from the same
    partials in the same order, so it is bit for bit the value another lane holds. HF rounds both products to bf16
    before the sum (three bf16 ops). LLVM narrows these fp32 ops to bf16 ones (exact: fp32 holds a bf16 product
    exactly and a bf16 sum to more than twice bf16's precision) and would then contract a product and the sum into
    one FMA: a launch must turn FP fusion off to keep the rounding."""
    d = tl.arange(0, D)
    features = first + d
    x = sum_partials(part_ptr, stride_split, features, d < D, bias_ptr, features, SPLITS, HAS_BIAS)
    x = x.to(tl.bfloat16).to(tl.float32)
    partners = first + (d + D // 2) % D
    partner = sum_partials(part_ptr, stride_split, partners, d < D, bias_ptr, partners, SPLITS, HAS_BIAS)
    partner = partner.to(tl.bfloat16).to(tl.float32)
    rotated_half = tl.where(d < D // 2, -partner, partner)
    rotated = ((x * cos).to(tl.bfloat16).to(tl.float32) + (rotated_half * sin).to(tl.bfloat16).to(tl.float32)).to(
        tl.bfloat16
    )
    return x, rotated


@triton.jit
def qk_scores(q, k, DOT_IN_FP32: tl.constexpr):
    """``q kᵀ`` of a q tile and a block of keys, fp32, on tensor cores; with DOT_IN_FP32 (the interpreter, whose
    bf16 ``tl.dot`` is wrong) in fp32 from q already widened."""
    if DOT_IN_FP32:
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    return scores


@triton.jit
def online_softmax_step(scores, v, m_i, l_i, acc, DOT_IN_FP32: tl.constexpr):
    """One block of keys into a running softmax (flash attention): ``scores`` scaled to base 2, -inf where a row
    does not attend; ``m_i``/``l_i`` the rows' running maximum and sum of ``exp2(score - m_i)``, ``acc`` the running
    sum of those weights times the values (fp32). Returns them updated. The probabilities enter the product with
    ``v`` as bf16, as in HF's eager attention. A row with no attended key so far keeps ``m_i`` = -inf and sum 0
    (it subtracts 0, not -inf: no exp2 of NaN)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if DOT_IN_FP32:
        acc = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(tl.bfloat16), v, acc)
    return m_new, l_i, acc


@triton.jit
def _rotary_cache_write_kernel(
    part_ptr, bias_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, position_ptr, length_ptr,
    N, C,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LENGTH: tl.constexpr, EARLY: tl.constexpr,
):
    """Head ``program_id(0)`` (q heads, then k heads, then v heads) of row ``program_id(1)`` (of T =
    ``num_programs(1)``) of the projection: rotated into ``q`` or into the key cache, or unrotated into the value
    cache, at slot ``position + row``."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    head = tl.program_id(0)
    row = tl.program_id(1)
    rows = tl.num_programs(1)
    d = tl.arange(0, D)
    wait_for_producers(EARLY)
    cos = tl.load(cos_ptr + row * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + row * D + d).to(tl.float32)
    x, rotated = rotary_projection(part_ptr + row * N, rows * N, bias_ptr, head * D, cos, sin, D, SPLITS, HAS_BIAS)
    position = tl.load(position_ptr)
    slot = position + row
    # a slot outside the cache writes nothing (a scalar condition turned into a lane count: the interpreter
    # mishandles a boolean scalar broadcast against a vector)
    in_cache = d < tl.where((slot >= 0) & (slot < C), D, 0)
    if head < H:
        tl.store(q_ptr + (row * H + head) * D + d, rotated)
    elif head < H + KVH:
        cache_row = ((head - H).to(tl.int64) * C + slot) * D
        tl.store(k_cache_ptr + cache_row + d, rotated, mask=in_cache)
    else:
        cache_row = ((head - H - KVH).to(tl.int64) * C + slot) * D
        tl.store(v_cache_ptr + cache_row + d, x.to(tl.bfloat16), mask=in_cache)
    if HAS_LENGTH:
        if (head == 0) & (row == 0):
            tl.store(length_ptr, position + rows)


@triton.jit
def _split_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, position_ptr, tree_ptr, part_ptr, lse_ptr,
    C, T, qk_scale,
    G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TREE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    EARLY: tl.constexpr,
):
    """KV head ``program_id(0)``, key blocks ``split, split + SPLITS, ...`` (``split`` = ``program_id(1)``, STEPS
    blocks of BLOCK_N slots at most), for the query rows ``program_id(2) * BLOCK_M ...`` of the T * G that share it
    (row ``m`` is token ``m // G``'s query head ``kv * G + m % G``).

    Writes, for each of those rows, the softmax-weighted mean of this split's values (fp32, ``part [T * H, SPLITS,
    D]``) and the base-2 log-sum-exp of its scaled scores (``lse [T * H, SPLITS]``), if the split holds any slot
    below ``position + T``; otherwise nothing. A row that attends no key of the split gets a zero mean and a
    log-sum-exp of -inf. ``qk_scale`` is the softmax scale times log2(e).
    """
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl; every program waits, live or not
    kv = tl.program_id(0)
    split = tl.program_id(1)
    wait_for_producers(EARLY)
    position = tl.load(position_ptr)
    live = tl.minimum(position + T, C)  # slots 0 .. position + T - 1 may attend
    if split * BLOCK_N < live:  # the split's first block holds a live slot
        H = G * tl.num_programs(0)
        m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        token = m // G
        heads = token * H + kv * G + m % G  # rows of q [T * H, D]
        real = m < T * G  # rows past T * G pad the tile to tensor-core size: q reads as 0 there, nothing is stored
        d = tl.arange(0, D)
        q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        if TREE:  # the draft slots a row attends, as bits: bit j for slot position + j
            drafts = tl.load(tree_ptr + token, mask=real, other=0)
        cache_rows = kv.to(tl.int64) * C
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running maximum of the scores (base 2)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros((BLOCK_M, D), tl.float32)  # running sum of exp2(score - m_i) * v
        # A constant trip count (the interpreter of Triton 3.6 cannot loop to a loaded bound); blocks past `live` are
        # skipped.
        for step in range(STEPS):
            start = (split + step * SPLITS) * BLOCK_N
            if start < live:
                n = start + tl.arange(0, BLOCK_N)
                valid = n < live
                ptrs = (cache_rows + n.to(tl.int64))[:, None] * D + d[None, :]  # (BLOCK_N, D)
                k = tl.load(k_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
                v = tl.load(v_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
                scores = qk_scores(q, k, DOT_IN_FP32)
                # every row attends the prefix, slots below position, and of the T draft slots its chain or tree's
                draft = n - position  # (BLOCK_N,) int64: a far position must not wrap around
                if TREE:
                    bit = tl.where((draft >= 0) & (draft < T), draft, 0).to(tl.int32)
                    chosen = ((drafts[:, None] >> bit[None, :]) & 1) != 0
                else:
                    chosen = draft[None, :] <= token[:, None]
                attend = (valid & (draft < 0))[None, :] | ((valid & (draft < T))[None, :] & chosen)
                scores = tl.where(attend, scores * qk_scale, float("-inf"))  # (BLOCK_M, BLOCK_N)
                m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, DOT_IN_FP32)
        slots = heads.to(tl.int64) * SPLITS + split
        attended = l_i > 0
        mean = acc / tl.where(attended, l_i, 1.0)[:, None]
        tl.store(part_ptr + slots[:, None] * D + d[None, :], mean, mask=real[:, None])
        lse = tl.where(attended, m_i + tl.log2(tl.where(attended, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + slots, lse, mask=real)


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, position_ptr, out_ptr, sums_ptr, C, H, T,
    D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, HEADS: tl.constexpr,
    OPERAND: tl.constexpr, EARLY: tl.constexpr,
):
    """Query heads ``program_id(0) * HEADS …`` of the T * H (token-major, a program's heads within one token): the
    splits' partial outputs weighed by ``exp2(lse)``, rounded to bf16, stored as bf16 or, with OPERAND, into the
    o_proj GEMV's row operand of the token (whose groups of 128 elements a program's heads cover whole). Splits whose
    first block starts at or past ``position + T`` were not written and are not read; those a row attends nothing of
    weigh 0 (their lse is -inf, their mean 0)."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    heads = tl.program_id(0) * HEADS + tl.arange(0, HEADS)
    wait_for_producers(EARLY)
    live = tl.minimum(tl.load(position_ptr) + T, C)
    s = tl.arange(0, BLOCK_S)
    used = (s < SPLITS) & (s * BLOCK_N < live)
    slots = heads.to(tl.int64)[:, None] * SPLITS + s[None, :]  # (HEADS, BLOCK_S)
    top = tl.max(tl.load(lse_ptr + slots, mask=used[None, :], other=float("-inf")), axis=1)  # (HEADS,)
    # The splits are added in order, one at a time: a reduction's order would follow the tensor's layout, which
    # HEADS changes, and the operand (HEADS = 128 / D) must be bit for bit the plain row (HEADS = 1).
    d = tl.arange(0, D)
    total = tl.zeros((HEADS, D), tl.float32)
    weights = tl.zeros((HEADS,), tl.float32)
    h = tl.arange(0, HEADS)
    for split in tl.static_range(SPLITS):
        slot = heads.to(tl.int64) * SPLITS + split
        written = split * BLOCK_N < live  # as lane counts below: see _rotary_cache_write_kernel
        weight = tl.exp2(tl.load(lse_ptr + slot, mask=h < tl.where(written, HEADS, 0), other=float("-inf")) - top)
        part = tl.load(part_ptr + slot[:, None] * D + d[None, :], mask=(d < tl.where(written, D, 0))[None, :], other=0.0)
        total += part * weight[:, None]
        weights += weight
    out = (total / weights[:, None]).to(tl.bfloat16)  # (HEADS, D)
    if OPERAND:
        groups: tl.constexpr = HEADS * D // 128
        token = tl.program_id(0) * HEADS // H
        row_groups = H * D // 128
        row = tl.reshape(out.to(tl.float32), (HEADS * D,))
        group0 = (tl.program_id(0) * HEADS - token * H) * D // 128
        store_operand(out_ptr + token * (H * D), sums_ptr + token * row_groups, row, group0, row_groups, groups)
    else:
        tl.store(out_ptr + heads[:, None] * D + d[None, :], out)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How ``decode_attention`` spreads the cache over programs."""

    block_keys: int  # cache positions per block, a power of two of at least 16: one step of a program
    splits: int  # programs per KV head; split s takes blocks s, s + splits, s + 2 splits, ...


def split_config(capacity: int) -> SplitConfig:
    """The config for a cache of ``capacity`` positions: 64-key blocks, one split per block up to ``MAX_SPLITS``."""
    return SplitConfig(block_keys=_BLOCK_KEYS, splits=min(MAX_SPLITS, triton.cdiv(capacity, _BLOCK_KEYS)))


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int]:
    """(KVH, C, D) of a valid key/value cache pair, else ValueError."""
    if key_cache.dtype != torch.bfloat16 or value_cache.dtype != torch.bfloat16:
        raise ValueError(f"the caches must be bf16, got keys {key_cache.dtype} and values {value_cache.dtype}")
    if key_cache.dim() != 4 or key_cache.shape[0] != 1 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"the caches must both be [1, KVH, C, D], got keys {tuple(key_cache.shape)} and values "
            f"{tuple(value_cache.shape)}"
        )
    if key_cache.device != value_cache.device:
        raise ValueError(
            f"the caches must be on one device, got keys on {key_cache.device} and values on {value_cache.device}"
        )
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous (the kernels write into them in place)")
    _, kv_heads, capacity, head_dim = key_cache.shape
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head size D = {head_dim} is not supported: it must be a power of two from 16 to 256")
    if capacity == 0:
        raise ValueError("the caches hold no positions (C = 0)")
    return kv_heads, capacity, head_dim


def _check_position(position: torch.Tensor, device: torch.device) -> None:
    if position.dtype != torch.int64 or position.numel() != 1 or position.device != device:
        raise ValueError(
            f"position must be a one-element int64 tensor on {device} (shape [1] or [1, 1]), got {position.dtype} "
            f"{tuple(position.shape)} on {position.device}"
        )


def _check_rows(rows: int, what: str) -> None:
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"{what} holds {rows} rows (tokens): it must hold 1 ... {MAX_ROWS}")


def _check_rotary_operands(
    qkv_partials: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: torch.Tensor,
    cache_length: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    kv_heads, _, head_dim = _check_cache(key_cache, value_cache)
    device = key_cache.device
    if num_kv_heads != kv_heads or num_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads = {num_heads} must be a positive multiple of num_kv_heads = {num_kv_heads}, which must be the "
            f"caches' KVH = {kv_heads}"
        )
    n = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv_partials.dtype != torch.float32 or qkv_partials.dim() != 3 or qkv_partials.shape[2] != n:
        raise ValueError(
            f"qkv_partials must be fp32 [S, T, N] with N = (H + 2 KVH) D = {n}, got {qkv_partials.dtype} "
            f"{tuple(qkv_partials.shape)}"
        )
    if qkv_partials.shape[0] == 0:
        raise ValueError("qkv_partials holds no partial sums (S = 0)")
    rows = qkv_partials.shape[1]
    _check_rows(rows, "qkv_partials")
    if bias is not None and (bias.dtype != torch.bfloat16 or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be bf16 [N] = [{n}] or None, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.bfloat16 or t.numel() != rows * head_dim or t.shape[-1] != head_dim:
            raise ValueError(
                f"{name} must be bf16 [1, T, D] with T = {rows} and D = {head_dim} (or [T, D]), got {t.dtype} "
                f"{tuple(t.shape)}"
            )
    _check_position(position, device)
    if cache_length is not None and (cache_length.dtype != torch.int64 or cache_length.dim() != 0):
        raise ValueError(
            f"cache_length must be a 0-d int64 tensor or None, got {cache_length.dtype} {tuple(cache_length.shape)}"
        )
    operands = {"qkv_partials": qkv_partials, "bias": bias, "cos": cos, "sin": sin, "cache_length": cache_length}
    for name, t in operands.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the caches are on {device}: all must be on one device")


def rotary_cache_write(
    qkv_partials: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: torch.Tensor,
    cache_length: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Sum the q/k/v projection's partials and bias for each of its T rows, rotate q and k by the row's ``cos`` and
    ``sin``, write row t's k and v into the caches at slot ``position + t`` (slots outside the cache: nowhere) and
    set ``cache_length`` to ``position + T``; returns the rotated queries ``[T, H, D]`` bf16. One launch (CUDA
    tensors, or CPU ones under the Triton interpreter); operands as in the module docstring."""
    _check_rotary_operands(
        qkv_partials, bias, cos, sin, key_cache, value_cache, position, cache_length, num_heads, num_kv_heads
    )
    splits, rows, n = qkv_partials.shape
    capacity, head_dim = key_cache.shape[2], key_cache.shape[3]
    q = torch.empty((rows, num_heads, head_dim), dtype=torch.bfloat16, device=key_cache.device)  # (T, H, D)
    partials = qkv_partials.contiguous()
    early = early_launch(key_cache.device)
    _rotary_cache_write_kernel[(num_heads + 2 * num_kv_heads, rows)](
        partials, bias if bias is not None else partials, cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(),
        q, key_cache, value_cache, position, cache_length if cache_length is not None else position,
        n, capacity,
        H=num_heads, KVH=num_kv_heads, D=head_dim, SPLITS=splits,
        HAS_BIAS=bias is not None, HAS_LENGTH=cache_length is not None, EARLY=early,
        num_warps=1, **pdl(early),
        enable_fp_fusion=False,  # else LLVM turns bf16(x * cos) + ... into one bf16 FMA, dropping HF's rounding
    )  # fmt: skip
    return q


def _tile(rows: int, head_dim: int) -> tuple[int, int]:
    """(rows of the q tile, warps) for ``rows`` query rows of a KV head (T * G): all of them, padded to a power of
    two of at least 16, up to ``_MAX_TILE_ELEMENTS // head_dim`` (past that, row groups of that many: more programs,
    each reading the split's keys and values again); 4 warps, or 8 for a tile whose accumulator would hold more than
    64 registers a thread (ptxas, sm_90: 242 registers for a [128, 128] tile on 4 warps, 124 on 8)."""
    tile_rows = max(_MIN_DOT_ROWS, min(triton.next_power_of_2(rows), _MAX_TILE_ELEMENTS // head_dim))
    return tile_rows, min(8, max(4, tile_rows * head_dim // _TILE_ELEMENTS_PER_WARP))


def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: torch.Tensor,
    scale: float,
    *,
    tree: torch.Tensor | None = None,
    config: SplitConfig | None = None,
    operand: bool = False,
) -> torch.Tensor | RowOperand:
    """``softmax(scale * q k^T) v`` for each of the T rows of ``q [T, H, D]``: row t over cache slots ``0 ..
    position - 1`` and slot ``position + j`` for each j of its chain (j <= t) or, with ``tree`` (int32 [T], read on
    the device), each bit j set in ``tree[t]`` (bit t must be: a row attends itself) -> ``[1, T, H * D]`` bf16,
    head-major per row, or with ``operand`` (H * D a multiple of 128) the same rows as the next GEMV's
    ``RowOperand`` (one-dimensional for T = 1). Two launches (CUDA tensors, or CPU ones under the Triton
    interpreter). ``config`` overrides ``split_config(C)``, for tests of many splits and blocks on small caches."""
    kv_heads, capacity, head_dim = _check_cache(key_cache, value_cache)
    device = key_cache.device
    if q.dtype != torch.bfloat16 or q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be bf16 [T, H, D] with D = {head_dim}, got {q.dtype} {tuple(q.shape)}")
    rows, heads = q.shape[0], q.shape[1]
    _check_rows(rows, "q")
    if heads == 0 or heads % kv_heads:
        raise ValueError(f"q's H = {heads} query heads must be a positive multiple of the caches' KVH = {kv_heads}")
    if q.device != device:
        raise ValueError(f"q is on {q.device} but the caches are on {device}: all must be on one device")
    _check_position(position, device)
    if tree is not None and (tree.dtype != torch.int32 or tuple(tree.shape) != (rows,) or tree.device != device):
        raise ValueError(
            f"tree must be an int32 [T] = [{rows}] tensor on {device} (bit j of tree[t]: row t attends slot "
            f"position + j) or None, got {tree.dtype} {tuple(tree.shape)} on {tree.device}"
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    config = config or split_config(capacity)
    block_keys, splits = config.block_keys, config.splits
    if block_keys < 16 or block_keys & (block_keys - 1) or not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"{config} must have block_keys a power of two of at least 16 and 1 ... {MAX_SPLITS} splits")
    steps = triton.cdiv(triton.cdiv(capacity, block_keys), splits)  # blocks per split, at most
    group = heads // kv_heads
    tile_rows, warps = _tile(rows * group, head_dim)
    part = torch.empty((rows * heads, splits, head_dim), dtype=torch.float32, device=device)  # (T * H, splits, D)
    lse = torch.empty((rows * heads, splits), dtype=torch.float32, device=device)  # (T * H, splits)
    # With the operand a combine program takes whole 128-element groups of a row: 128 / D heads (D <= 128) or one
    combine_heads = max(1, 128 // head_dim) if operand else 1
    if operand:
        if (heads * head_dim) % 128:
            raise ValueError(f"decode_attention(operand=True) needs H * D a multiple of 128, got {heads} * {head_dim}")
        out = RowOperand.empty(heads * head_dim, torch.bfloat16, device, rows=None if rows == 1 else rows)
    else:
        out = torch.empty((1, rows, heads * head_dim), dtype=torch.bfloat16, device=device)  # (B, T, H * D)
    q = q.contiguous()
    early = early_launch(device)
    _split_attention_kernel[(kv_heads, splits, triton.cdiv(rows * group, tile_rows))](
        q, key_cache, value_cache, position, tree if tree is not None else position, part, lse,
        capacity, rows, scale * _LOG2_E,
        G=group, D=head_dim, SPLITS=splits, STEPS=steps, BLOCK_M=tile_rows, BLOCK_N=block_keys,
        TREE=tree is not None,
        DOT_IN_FP32=device.type == "cpu",  # on CPU the kernels only run in the Triton interpreter
        EARLY=early, num_warps=warps, num_stages=2, **pdl(early),
    )  # fmt: skip
    _combine_kernel[(rows * heads // combine_heads,)](
        part, lse, position, out.values if operand else out, out.sums if operand else out, capacity, heads, rows,
        D=head_dim, SPLITS=splits, BLOCK_N=block_keys, BLOCK_S=triton.next_power_of_2(splits), HEADS=combine_heads,
        OPERAND=operand, EARLY=early, num_warps=4, **pdl(early),
    )  # fmt: skip
    return out


def reference_rotary_cache_write(
    qkv_partials: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: torch.Tensor,
    cache_length: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """``rotary_cache_write`` in plain torch: HF's bf16 ops (``apply_rotary_pos_emb``, ``StaticLayer.update``'s
    ``index_copy_`` at slots ``position .. position + T - 1``) on the projection summed as the module docstring
    says. Mutates the caches and ``cache_length`` as the kernel does; no host sync."""
    _, rows, _ = qkv_partials.shape
    _, kv_heads, capacity, head_dim = key_cache.shape
    total = qkv_partials[0].clone()  # (T, N) fp32
    for partial in qkv_partials[1:]:
        total += partial
    if bias is not None:
        total += bias.float()
    projected = total.to(torch.bfloat16).view(1, rows, num_heads + 2 * num_kv_heads, head_dim).transpose(1, 2)
    query, key, value = projected.split([num_heads, num_kv_heads, num_kv_heads], dim=1)  # (B, heads, T, D) each
    cos, sin = cos.view(1, 1, rows, head_dim), sin.view(1, 1, rows, head_dim)
    query = (query * cos) + (rotate_half(query) * sin)
    key = (key * cos) + (rotate_half(key) * sin)
    slots = position.reshape(1) + torch.arange(rows, device=position.device)
    # a slot outside the cache goes to a scratch row past it (index_copy_ refuses it; a mask would sync)
    inside = (slots >= 0) & (slots < capacity)
    slots = torch.where(inside, slots, capacity + torch.arange(rows, device=position.device))
    for cache, states in ((key_cache, key), (value_cache, value)):
        padded = torch.cat([cache, cache.new_empty(1, kv_heads, rows, head_dim)], dim=2)
        padded.index_copy_(2, slots, states)
        cache.copy_(padded[:, :, :capacity])
    if cache_length is not None:
        cache_length.copy_(position.reshape(()) + rows)
    return query.transpose(1, 2).reshape(rows, num_heads, head_dim).contiguous()


def attended_slots(position: torch.Tensor, tree: torch.Tensor | None, rows: int, capacity: int) -> torch.Tensor:
    """bool ``[T, C]``: whether row t attends cache slot c, as ``decode_attention`` defines it (every slot below
    ``position``, and slot ``position + j`` for j in row t's chain or tree). No host sync."""
    draft = torch.arange(capacity, device=position.device) - position.reshape(())  # (C,): j of slot position + j
    token = torch.arange(rows, device=position.device)[:, None]
    if tree is None:
        chosen = draft[None, :] <= token
    else:
        chosen = (tree.long()[:, None] >> draft.clamp(0, rows - 1)[None, :]) & 1 == 1
    return (draft < 0)[None, :] | (((draft >= 0) & (draft < rows))[None, :] & chosen)


def reference_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: torch.Tensor,
    scale: float,
    tree: torch.Tensor | None = None,
) -> torch.Tensor:
    """``decode_attention`` in plain torch, with HF's eager arithmetic (bf16 products, softmax in fp32, bf16
    probabilities) over the whole cache, each row's unattended slots (``attended_slots``) masked out; no host sync.
    Unattended cache entries must be finite (a zero probability times NaN or infinity is NaN)."""
    _, kv_heads, capacity, head_dim = key_cache.shape
    rows, heads = q.shape[0], q.shape[1]
    group = heads // kv_heads
    # (B, KVH, T * G, D): repeat_kv's grouping, the rows of a KV head token-major
    grouped = q.view(rows, kv_heads, group, head_dim).transpose(0, 1).reshape(1, kv_heads, rows * group, head_dim)
    scores = torch.matmul(grouped, key_cache.transpose(-1, -2)) * scale  # (B, KVH, T * G, C)
    attend = attended_slots(position, tree, rows, capacity).repeat_interleave(group, dim=0)  # (T * G, C)
    scores = scores.masked_fill(~attend, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probabilities, value_cache)  # (B, KVH, T * G, D)
    return out.view(kv_heads, rows, group, head_dim).transpose(0, 1).reshape(1, rows, heads * head_dim)
