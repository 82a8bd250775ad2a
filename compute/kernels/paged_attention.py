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
    out          [B, H, D]        bf16, or with ``operand=True`` the o projection's ``RowOperand`` of the B rows
                                  of H * D (``compute.kernels.gemv``; one row: its 1-D form)

One program per (row, KV head) serves the G query heads sharing that KV head: q is a ``[BLOCK_G, D]`` tile (G
padded to at least 16 rows, the smallest tensor-core tile) and a page's ``[P, D]`` keys and values are read
once for the G heads; a running maximum and sum (fp32, base 2) make the softmax online, one page per step.
Pages past ``lengths[b]`` are skipped, positions past it inside the last page masked, so whatever stale data a
page holds there cannot reach the output. Probabilities enter the second product as bf16, as in HF's eager
attention; scores, maxima and sums are fp32. Sizes are shapes only and lengths are read on the device, so a
call can be captured in a CUDA graph and replayed for other lengths.

Split over the pages ("flash decoding", ``compute.kernels.attention``'s design on the static cache): B * KVH
programs leave most SMs idle for a few rows (the 32B model's one row: 8 programs on an H100's 132 SMs, each
walking every page in turn), so unless the rows fill the GPU each (row, KV head) gets ``paged_splits`` programs,
grid ``(B, KVH, splits)``. A step reads a block of ``max(P, 64)`` positions (4 pages of 16, their page ids gathered
from the table), and split ``s`` takes the row's blocks ``s, s + splits, s + 2 splits, …`` below its length, a
bound read on the device: dealt out round-robin, a short row's few blocks and a long row's many spread over all
the splits alike. Each program leaves its G heads' softmax-weighted mean (fp32) and base-2 log-sum-exp in
workspaces ``[B, H, splits, D]`` and ``[B, H, splits]`` (shapes only); a split whose first block starts at or past
the length returns at once, writes nothing and is not read. The combine, grid ``(B, H / heads a program)``, weighs
the splits by ``exp2(lse - max)`` one after another in split order and rounds to bf16 once, storing the output or,
with ``operand=True``, the row operand (a program's heads are whole 128-element groups: 128 / D heads, or one; the
sum is the same for any count, so the operand is bit for bit the plain output). Every row's length is at least 1,
so split 0 always holds a position and each split read holds its first block's first one: no empty sum, no NaN.
The count (``paged_splits``) depends on shapes only: ``ceil(2 SMs / (B KVH))``, at most ``MAX_SPLITS`` and the
blocks of a full row; at 1 (B KVH of at least 2 SMs) the single kernel above runs, with no combine. For the 32B
model on an H100: one row, 33 splits (264 programs) and the combine's 40; 16 rows, 3 splits (384) and 640.
Against the single kernel the result differs only by the order of the sums (within the same bound).

With ``operand=True`` each program writes its G heads' outputs, the same bf16 values, into the o projection's row
operand instead (``compute.kernels.gemv.store_operand``: each 8-element word permuted, each 128-element group's
sum), saving the GEMV the launch that would make it (``row_operand``). A program writes whole groups only (a
group's sum is one program's), so the operand form needs ``G * D`` to be a multiple of 128 (the 32B model: 5 heads
of 128; ``paged_operand_supported``): for other shapes the caller takes the plain output, and the GEMV makes its
operand as before.

``rotary_pool_write(qkv, cos, sin, slots, key_pool, value_pool, num_heads=H, num_kv_heads=KVH)`` is the step
before it in a pass of T rows (``compute.batch_engine``): from the q|k|v product ``[T, (H + 2 KVH) D]`` (bias
included) it returns the rotated queries ``[T, H, D]`` and writes the rotated keys and the values at each row's slot
of a layer's pool (``[slots, KVH, D]``, the pages flattened), in one launch where HF's rotary takes about a dozen
and the pool's writes two. Its rounding is HF's: ``bf16(bf16(x cos) + bf16(rotate_half(x) sin))``.

On Hopper and later every kernel here launches early, as the decode step's do (``compute.kernels.pdl``: it signals
first and waits before reading anything), so in a batched decode pass the next kernel's launch overlaps this one's
work where a plain launch would wait for it to end.

``reference_paged_decode_attention`` is the plain torch definition the kernel is tested against. The Triton
interpreter (CPU tensors) runs the same kernel with its dots in fp32 (its bf16 ``tl.dot`` is wrong, as
``compute.kernels.attention`` notes).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from compute.kernels.attention import MAX_SPLITS, online_softmax_step, qk_scores, rotary_projection
from compute.kernels.gemv import RowOperand, store_operand
from compute.kernels.pdl import early_launch, pdl, signal_dependents, wait_for_producers

__all__ = [
    "paged_attention_supported",
    "paged_decode_attention",
    "paged_operand_supported",
    "paged_splits",
    "reference_paged_decode_attention",
    "reference_rotary_pool_write",
    "rotary_pool_write",
]

_MIN_DOT_ROWS = 16
_LOG2_E = 1.4426950408889634
_BLOCK_POSITIONS = 64  # positions a step of the split kernel at least: 4 pages of 16, whole pages for larger ones
_PROGRAMS_PER_SM = 2  # the split count aims at this many split programs per SM
_CPU_SMS = 132  # the SM count assumed on the CPU (the interpreter): an H100's
# Software pipelining of the split kernel's block loop: none. Two stages hold two blocks' keys and values in shared
# memory (38.9 KB a program on sm_90 against 22.5 KB). Alone, the attention chain runs as fast either way; in a
# whole one-row pass, beside the kernels launched early around it, 2 stages made the pass 4% slower at 128 positions
# and 2% at 2048 (measured on an H100; docs/performance.md).
SPLIT_STAGES = 1


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, out_ptr, sums_ptr, qk_scale,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, W: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_IN_FP32: tl.constexpr, OPERAND: tl.constexpr, EARLY: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)``, KV head ``program_id(1)``: the attention output of its G query heads, stored as bf16
    or, with OPERAND (``G * D`` a multiple of 128), as groups ``kv * G * D / 128 …`` of the row's operand."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    wait_for_producers(EARLY)
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
            scores = tl.where(valid[None, :], qk_scores(q, k, DOT_IN_FP32) * qk_scale, float("-inf"))  # (BLOCK_G, P)
            m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, DOT_IN_FP32)
    out = (acc / l_i[:, None]).to(tl.bfloat16)
    if OPERAND:
        # The tile's real rows are its first G * D elements (row-major): this program's whole groups of the row's
        # operand; the padding rows after them fall past ``last`` and are not written.
        first = kv * (G * D // 128)
        last = first + G * D // 128
        row_base = row.to(tl.int64) * (KVH * G * D)
        store_operand(out_ptr + row_base, sums_ptr + row_base // 128, tl.reshape(out.to(tl.float32), (BLOCK_G * D,)),
                      first, last, BLOCK_G * D // 128)  # fmt: skip
    else:
        tl.store(out_ptr + q_rows[:, None] * D + d[None, :], out, mask=real[:, None])


@triton.jit
def _paged_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, part_ptr, lse_ptr, qk_scale,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, W: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    EARLY: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)``, KV head ``program_id(1)``, split ``program_id(2)``: the row's blocks of BLOCK_N
    positions (BLOCK_N / P pages) ``split, split + SPLITS, …`` below its length, for its G query heads.

    Writes, for each head h of them, the softmax-weighted mean of the split's values (fp32, ``part [B, H, SPLITS,
    D]``) and the base-2 log-sum-exp of its scaled scores (``lse [B, H, SPLITS]``), if the split's first block
    starts below the length; otherwise nothing (the combine does not read it). A split that runs holds the first
    position of its first block, so each of its heads has a finite maximum and a positive sum."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl; every program waits, live or not
    wait_for_producers(EARLY)
    row = tl.program_id(0)
    kv = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    if split * BLOCK_N < length:
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        real = g < G  # rows past G pad the tile: q reads as 0 there, nothing is stored
        q_rows = (row * KVH * G + kv * G + g).to(tl.int64)  # rows of q [B * H, D]
        q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        table_row = table_ptr + row.to(tl.int64) * W
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        # Blocks split, split + SPLITS, … up to the row's last: a bound read on the device, no step past the length
        for block in range(split, tl.cdiv(length, BLOCK_N), SPLITS):
            n = block * BLOCK_N + tl.arange(0, BLOCK_N)  # positions
            valid = n < length
            page = tl.load(table_row + n // P, mask=valid, other=0).to(tl.int64)  # each position's page
            ptrs = ((page * P + n % P) * KVH + kv)[:, None] * D + d[None, :]  # (BLOCK_N, D)
            k = tl.load(k_ptr + ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + ptrs, mask=valid[:, None], other=0.0)
            scores = qk_scores(q, k, DOT_IN_FP32) * qk_scale
            scores = tl.where(valid[None, :], scores, float("-inf"))  # (BLOCK_G, BLOCK_N)
            # the first block's first position is valid: every row's maximum is finite from the first step
            m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, DOT_IN_FP32)
        slots = q_rows * SPLITS + split
        tl.store(part_ptr + slots[:, None] * D + d[None, :], acc / l_i[:, None], mask=real[:, None])
        tl.store(lse_ptr + slots, m_i + tl.log2(l_i), mask=real)


@triton.jit
def _paged_combine_kernel(
    part_ptr, lse_ptr, lengths_ptr, out_ptr, sums_ptr,
    H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HEADS: tl.constexpr, OPERAND: tl.constexpr, EARLY: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)``, query heads ``program_id(1) * HEADS …``: the splits' partial outputs weighed by
    ``exp2(lse)``, added in split order, rounded to bf16 once, stored as bf16 or, with OPERAND, as the row
    operand's groups the heads cover whole (``HEADS * D`` a multiple of 128). Splits whose first block starts at or
    past the row's length were not written and are not read (``compute.kernels.attention._combine_kernel``'s design,
    the live positions a row's own)."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    wait_for_producers(EARLY)
    row = tl.program_id(0)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    length = tl.load(lengths_ptr + row)
    s = tl.arange(0, BLOCK_S)
    used = (s < SPLITS) & (s * BLOCK_N < length)  # split 0 always: every length is at least 1
    rows = row.to(tl.int64) * H + heads  # (HEADS,) rows of the workspaces
    top = tl.max(tl.load(lse_ptr + rows[:, None] * SPLITS + s[None, :], mask=used[None, :], other=float("-inf")),
                 axis=1)  # fmt: skip
    # One split at a time, in order, so that the sum does not depend on HEADS: the operand (HEADS = 128 / D) is
    # bit for bit the plain output (HEADS = 1).
    d = tl.arange(0, D)
    h = tl.arange(0, HEADS)
    total = tl.zeros((HEADS, D), tl.float32)
    weights = tl.zeros((HEADS,), tl.float32)
    for split in tl.static_range(SPLITS):
        slot = rows * SPLITS + split
        written = split * BLOCK_N < length  # as lane counts below: see attention._rotary_cache_write_kernel
        weight = tl.exp2(tl.load(lse_ptr + slot, mask=h < tl.where(written, HEADS, 0), other=float("-inf")) - top)
        live_d = d < tl.where(written, D, 0)
        part = tl.load(part_ptr + slot[:, None] * D + d[None, :], mask=live_d[None, :], other=0.0)
        total += part * weight[:, None]
        weights += weight
    out = (total / weights[:, None]).to(tl.bfloat16)  # (HEADS, D)
    if OPERAND:
        row_base = row.to(tl.int64) * (H * D)
        store_operand(out_ptr + row_base, sums_ptr + row_base // 128, tl.reshape(out.to(tl.float32), (HEADS * D,)),
                      tl.program_id(1) * (HEADS * D // 128), H * D // 128, HEADS * D // 128)  # fmt: skip
    else:
        tl.store(out_ptr + rows[:, None] * D + d[None, :], out)



def paged_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The kernel runs on CUDA, bf16, for power-of-two head sizes from 16 to 256."""
    return device.type == "cuda" and dtype == torch.bfloat16 and 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def paged_operand_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether ``paged_decode_attention(operand=True)`` takes these heads: a program's ``G * D`` outputs (G query
    heads a KV head) must be whole 128-element groups of the operand."""
    return num_kv_heads > 0 and num_heads % num_kv_heads == 0 and (num_heads // num_kv_heads * head_dim) % 128 == 0


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
    operand: bool = False,
    splits: int | None = None,
) -> torch.Tensor | RowOperand:
    """Attention of one query row per sequence over its pages; see the module docstring. [B, H, D] bf16, or with
    ``operand`` (where ``paged_operand_supported``) the rows ``[B, H * D]`` as the next GEMV's ``RowOperand`` (of
    one row, 1-D, for B = 1): the same bf16 values. ``splits`` overrides ``paged_splits`` (1 … ``MAX_SPLITS``;
    for tests): one launch for 1, else the split kernel and the combine."""
    _check(q, key_pages, value_pages, page_table, lengths)
    if splits is not None and not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be 1 … {MAX_SPLITS}, got {splits}")
    batch, heads, dim = q.shape
    _, page_tokens, kv_heads, _ = key_pages.shape
    groups = heads // kv_heads
    if operand:
        if not paged_operand_supported(heads, kv_heads, dim):
            raise ValueError(
                f"paged_decode_attention(operand=True) needs G * D a multiple of 128, got {groups} * {dim} "
                f"({heads} heads, {kv_heads} KV heads)"
            )
        out = RowOperand.empty(heads * dim, q.dtype, q.device, rows=None if batch == 1 else batch)
    else:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    scale = dim**-0.5 if scale is None else scale
    early = early_launch(q.device)
    width = page_table.shape[1]
    block_g = max(_MIN_DOT_ROWS, triton.next_power_of_2(groups))
    splits = splits or paged_splits(batch, kv_heads, width, page_tokens, q.device)
    if splits == 1:
        _paged_decode_kernel[(batch, kv_heads)](
            q, key_pages, value_pages, page_table, lengths, out.values if operand else out,
            out.sums if operand else out, scale * _LOG2_E,
            KVH=kv_heads, G=groups, D=dim, P=page_tokens, W=width,
            BLOCK_G=block_g, DOT_IN_FP32=not q.is_cuda, OPERAND=operand, EARLY=early, num_warps=4, **pdl(early),
        )  # fmt: skip
        return out
    block_n = max(page_tokens, _BLOCK_POSITIONS)
    part = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    _paged_split_kernel[(batch, kv_heads, splits)](
        q, key_pages, value_pages, page_table, lengths, part, lse, scale * _LOG2_E,
        KVH=kv_heads, G=groups, D=dim, P=page_tokens, W=width, SPLITS=splits, BLOCK_G=block_g, BLOCK_N=block_n,
        DOT_IN_FP32=not q.is_cuda, EARLY=early, num_warps=4, num_stages=SPLIT_STAGES, **pdl(early),
    )  # fmt: skip
    # With the operand a program takes whole 128-element groups of its row: 128 / D heads (D <= 128), or one
    combine_heads = max(1, 128 // dim) if operand else 1
    _paged_combine_kernel[(batch, heads // combine_heads)](
        part, lse, lengths, out.values if operand else out, out.sums if operand else out,
        H=heads, D=dim, SPLITS=splits, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(splits),
        HEADS=combine_heads, OPERAND=operand, EARLY=early, num_warps=4, **pdl(early),
    )  # fmt: skip
    return out


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (``_CPU_SMS`` for the CPU, where the interpreter runs the kernels)."""
    if device.type != "cuda":
        return _CPU_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_splits(batch: int, kv_heads: int, width: int, page_tokens: int, device: torch.device) -> int:
    """Programs per (row, KV head) for ``paged_decode_attention``: about ``_PROGRAMS_PER_SM`` programs per SM in all
    (``ceil(2 SMs / (B KVH))``), at most ``MAX_SPLITS`` and at most the blocks of a full row (``W`` pages in blocks of
    ``max(P, 64)`` positions). Shapes only, never lengths, so that a graph captured for B rows replays for any.
    1 (B KVH of at least 2 SMs, or rows of one block): the single kernel."""
    blocks = triton.cdiv(width * page_tokens, max(page_tokens, _BLOCK_POSITIONS))
    wanted = triton.cdiv(_PROGRAMS_PER_SM * _multiprocessors(device), max(1, batch * kv_heads))
    return max(1, min(wanted, MAX_SPLITS, blocks))


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



@triton.jit
def _rotary_pool_write_kernel(
    part_ptr, bias_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, stride_split, stride_row,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    EARLY: tl.constexpr,
):  # fmt: skip
    """Row ``program_id(0)``, head ``program_id(1)`` (q heads, then k heads, then v heads) of the q|k|v product
    (``bf16(sum of SPLITS partial rows + bias)``): rotated into ``q``, rotated into the key pool at the row's
    slot, or as it is into the value pool."""
    signal_dependents(EARLY)  # launched early: compute.kernels.pdl
    wait_for_producers(EARLY)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, D)
    cos = tl.load(cos_ptr + row * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + row * D + d).to(tl.float32)
    x, rotated = rotary_projection(part_ptr + row * stride_row, stride_split, bias_ptr, head * D, cos, sin, D, SPLITS,
                                   HAS_BIAS)  # fmt: skip
    if head < H:
        tl.store(q_ptr + (row * H + head) * D + d, rotated)
    else:
        slot = tl.load(slots_ptr + row).to(tl.int64)
        if head < H + KVH:
            tl.store(k_ptr + (slot * KVH + head - H) * D + d, rotated)
        else:
            tl.store(v_ptr + (slot * KVH + head - H - KVH) * D + d, x.to(tl.bfloat16))


def reference_rotary_pool_write(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, key_pool: torch.Tensor,
    value_pool: torch.Tensor, *, num_heads: int, num_kv_heads: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``rotary_pool_write`` in plain torch: the projection rounded to bf16 (partials summed in split order, bias
    added), HF's ``apply_rotary_pos_emb`` row by row, ``index_copy_`` into the pool."""
    if qkv.dim() == 3:  # fp32 partial sums [S, T, N]
        total = qkv[0].clone()
        for part in qkv[1:]:
            total += part
        qkv = (total + (bias.float() if bias is not None else 0)).to(torch.bfloat16)
    elif bias is not None:
        qkv = qkv + bias
    rows, head_dim = qkv.shape[0], cos.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos, sin = cos.reshape(rows, 1, head_dim), sin.reshape(rows, 1, head_dim)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(rows, -1, head_dim)
        half = torch.cat((-x[..., head_dim // 2 :], x[..., : head_dim // 2]), dim=-1)
        return (x * cos) + (half * sin)

    key_pool.index_copy_(0, slots, rotate(k))
    value_pool.index_copy_(0, slots, v.reshape(rows, num_kv_heads, head_dim))
    return rotate(q)


def rotary_pool_write(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, key_pool: torch.Tensor,
    value_pool: torch.Tensor, *, num_heads: int, num_kv_heads: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The rotated queries ``[T, H, D]`` of the q|k|v projection, after writing the rotated keys and the values to
    ``key_pool``/``value_pool`` ``[slots, KVH, D]`` bf16 at ``slots`` [T] int64 (module docstring). ``qkv`` is the
    projection without its bias, bf16 ``[T, (H + 2 KVH) D]`` (unit stride along features) or the GEMV's fp32
    split-K partial sums ``[S, T, (H + 2 KVH) D]`` (``int4_gemv(partials=True)``), summed here; ``bias`` bf16
    ``[(H + 2 KVH) D]`` or None; ``cos``/``sin`` ``[T, D]`` bf16 (any shape of T * D contiguous elements)."""
    partials = qkv.dim() == 3
    rows, width, head_dim = qkv.shape[-2], qkv.shape[-1], cos.shape[-1]
    if width != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [..., T, (H + 2 KVH) D] with unit stride, got {tuple(qkv.shape)}")
    if partials and (qkv.dtype != torch.float32 or not qkv.is_contiguous()):
        raise ValueError(f"partial sums must be contiguous fp32 [S, T, N], got {qkv.dtype} {tuple(qkv.shape)}")
    if cos.numel() != rows * head_dim or sin.numel() != rows * head_dim:
        raise ValueError(f"cos and sin must hold {rows} rows of {head_dim}, got {tuple(cos.shape)}")
    if tuple(key_pool.shape[1:]) != (num_kv_heads, head_dim) or not key_pool.is_contiguous():
        raise ValueError(f"the pool must be [slots, {num_kv_heads}, {head_dim}] contiguous, got {tuple(key_pool.shape)}")
    if head_dim & (head_dim - 1) or slots.shape != (rows,):
        raise ValueError(f"head_dim {head_dim} must be a power of two and slots [{rows}], got {tuple(slots.shape)}")
    if bias is not None and tuple(bias.shape) != (width,):
        raise ValueError(f"bias must be [{width}], got {tuple(bias.shape)}")
    q = torch.empty((rows, num_heads, head_dim), dtype=torch.bfloat16, device=qkv.device)
    early = early_launch(qkv.device)
    if rows:
        _rotary_pool_write_kernel[(rows, num_heads + 2 * num_kv_heads)](
            qkv, bias if bias is not None else cos, cos.contiguous(), sin.contiguous(), slots, q, key_pool, value_pool,
            rows * width if partials else 0, qkv.stride(-2),
            H=num_heads, KVH=num_kv_heads, D=head_dim, SPLITS=qkv.shape[0] if partials else 1,
            HAS_BIAS=bias is not None, EARLY=early, num_warps=1, **pdl(early),
            enable_fp_fusion=False,  # keep HF's two roundings before the sum
        )  # fmt: skip
    return q
