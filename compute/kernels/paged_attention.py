"""Decode attention over a paged KV cache: one query row per sequence, every sequence in one launch.

``paged_decode_attention(q, key_pages, value_pages, page_table, lengths, scale)`` returns, for each row ``b``,
``softmax(scale * q[b] K_b^T) V_b`` where ``K_b``/``V_b`` are the keys/values of row ``b``'s sequence at
positions ``0 .. lengths[b] - 1``, read from its pages; query head ``h`` reads KV head ``h // (H / KVH)``
(HF's ``repeat_kv``). Operands (B rows, H query heads, KVH KV heads, D head size a power of two in 16 .. 256,
N pages of P positions, W pages per row at most):

    q            [B, H, D]        bf16, contiguous (rotated queries)
    key_pages    [N, P, KVH, D]   bf16, contiguous (one layer of ``compute.kv_pages.KVPagePool.keys``); values alike
    page_table   [B, W]           int32: row b's position p is in page page_table[b, p // P] at offset p % P
    lengths      [B]              int32, 1 <= lengths[b] <= W * P: positions row b attends over
    out          [B, H, D]        bf16

One program per (row, KV head) serves the G query heads sharing that KV head: q is a ``[BLOCK_G, D]`` tile (G
padded to at least 16 rows, the smallest tensor-core tile) and a page's ``[P, D]`` keys and values are read
once for the G heads; a running maximum and sum (fp32, base 2) make the softmax online, one page per step.
Pages past ``lengths[b]`` are skipped, positions past it inside the last page masked, so whatever stale data a
page holds there cannot reach the output. Probabilities enter the second product as bf16, as in HF's eager
attention; scores, maxima and sums are fp32. Sizes are shapes only and lengths are read on the device, so a
call can be captured in a CUDA graph and replayed for other lengths.

``reference_paged_decode_attention`` is the plain torch definition the kernel is tested against. The Triton
interpreter (CPU tensors) runs the same kernel with its dots in fp32 (its bf16 ``tl.dot`` is wrong, as
``compute.kernels.attention`` notes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["paged_attention_supported", "paged_decode_attention", "reference_paged_decode_attention"]

_MIN_DOT_ROWS = 16
_LOG2_E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, out_ptr, qk_scale,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, W: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Row ``program_id(0)``, KV head ``program_id(1)``: the attention output of its G query heads."""
    row = tl.program_id(0)
    kv = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    t = tl.arange(0, P)
    real = g < G  # rows past G pad the tile: q reads as 0 there, nothing is stored
    heads = kv * G + g
    q_rows = (row * KVH * G + heads).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    length = tl.load(lengths_ptr + row)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    # A constant trip count (the interpreter cannot loop to a loaded bound); pages past the length are skipped.
    for step in range(W):
        first = step * P
        if first < length:
            page = tl.load(table_ptr + row.to(tl.int64) * W + step).to(tl.int64)
            valid = first + t < length
            ptrs = ((page * P + t) * KVH + kv)[:, None] * D + d[None, :]  # (P, D)
            k = tl.load(k_ptr + ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + ptrs, mask=valid[:, None], other=0.0)
            if DOT_IN_FP32:
                scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))  # (BLOCK_G, P)
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if DOT_IN_FP32:
                acc = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(tl.bfloat16), v, acc)
            m_i = m_new
    out = (acc / l_i[:, None]).to(tl.bfloat16)
    tl.store(out_ptr + q_rows[:, None] * D + d[None, :], out, mask=real[:, None])


def paged_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The kernel runs on CUDA, bf16, for power-of-two head sizes from 16 to 256."""
    return device.type == "cuda" and dtype == torch.bfloat16 and 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def _check(q, key_pages, value_pages, page_table, lengths) -> None:
    if q.dim() != 3 or key_pages.dim() != 4 or key_pages.shape != value_pages.shape:
        raise ValueError(
            f"q must be [B, H, D] and the pages [N, P, KVH, D] alike, got q {tuple(q.shape)}, keys "
            f"{tuple(key_pages.shape)}, values {tuple(value_pages.shape)}"
        )
    batch, heads, dim = q.shape
    _, page_tokens, kv_heads, page_dim = key_pages.shape
    if page_dim != dim or heads % kv_heads:
        raise ValueError(f"q has {heads} heads of {dim}; the pages {kv_heads} KV heads of {page_dim}")
    if page_tokens < 16 or page_tokens & (page_tokens - 1):
        raise ValueError(f"pages of {page_tokens} positions: the kernel needs a power of two of at least 16")
    if q.dtype != torch.bfloat16 or key_pages.dtype != torch.bfloat16 or value_pages.dtype != torch.bfloat16:
        raise ValueError(f"q and the pages must be bf16, got {q.dtype}, {key_pages.dtype}, {value_pages.dtype}")
    if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be int32 [B = {batch}, W], got {page_table.dtype} {tuple(page_table.shape)}")
    if lengths.dtype != torch.int32 or tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must be int32 [B = {batch}], got {lengths.dtype} {tuple(lengths.shape)}")
    if not all(t.is_contiguous() for t in (q, key_pages, value_pages, page_table, lengths)):
        raise ValueError("q, the pages, page_table and lengths must be contiguous")


def paged_decode_attention(
    q: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query row per sequence over its pages; see the module docstring. [B, H, D] bf16."""
    _check(q, key_pages, value_pages, page_table, lengths)
    batch, heads, dim = q.shape
    _, page_tokens, kv_heads, _ = key_pages.shape
    groups = heads // kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    scale = dim**-0.5 if scale is None else scale
    _paged_decode_kernel[(batch, kv_heads)](
        q, key_pages, value_pages, page_table, lengths, out, scale * _LOG2_E,
        KVH=kv_heads, G=groups, D=dim, P=page_tokens, W=page_table.shape[1],
        BLOCK_G=max(_MIN_DOT_ROWS, triton.next_power_of_2(groups)), DOT_IN_FP32=not q.is_cuda,
        num_warps=4,
    )  # fmt: skip
    return out


def reference_paged_decode_attention(
    q: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition in float32, row by row: gather the row's positions from its pages, then softmax(s q K^T) V."""
    batch, heads, dim = q.shape
    _, page_tokens, kv_heads, _ = key_pages.shape
    scale = dim**-0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(batch):
        length = int(lengths[b])
        positions = torch.arange(length, device=q.device)
        pages = page_table[b].long()[positions // page_tokens]
        keys = key_pages[pages, positions % page_tokens].float()  # (length, KVH, D)
        values = value_pages[pages, positions % page_tokens].float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # (H, length, D)
        values = values.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        scores = torch.einsum("hd,hld->hl", q[b].float(), keys) * scale
        out[b] = torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), values)
    return out.to(q.dtype)

