"""Embedding rows looked up by token ids the device holds, from a table in pinned host memory.

With the token embedding in host memory (``compute.model.HostEmbedding``), a pass whose token ids only the device
knows yet (the argmax of the pass before it, not read back: ``compute.batching.BatchRunner`` launches such a pass
before reading the tokens of the one before) cannot gather its rows on the host. ``embedding_rows`` gathers them
where they are: a pinned table's address is valid on the device (unified addressing), so one kernel reads each
row over the bus (10 KiB a row for the 32B model) into a device buffer, on the current stream, without a sync.

On CPU (the table, ids and output all host tensors) it is ``torch.index_select``. The rows are exact copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["embedding_rows"]

_BLOCK = 1024  # elements a program copies


@triton.jit
def _embedding_rows_kernel(table_ptr, ids_ptr, out_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id(0)`` of ``out``, elements ``program_id(1) * BLOCK …``: row ``ids[row]`` of the table."""
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < H
    token = tl.load(ids_ptr + row).to(tl.int64)
    values = tl.load(table_ptr + token * H + columns, mask=inside)
    tl.store(out_ptr + row.to(tl.int64) * H + columns, values, mask=inside)


def embedding_rows(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = table[ids[i]]`` for the int64 ids ``[rows]`` on ``out``'s device; ``table`` ``[vocab, hidden]``
    contiguous in host memory (pinned when ``out`` is on CUDA), ``out`` ``[rows, hidden]`` contiguous, of the
    table's dtype. Returns ``out``. Ids outside the table are the caller's to prevent (the device cannot check
    them without a sync)."""
    if table.dim() != 2 or table.device.type != "cpu" or not table.is_contiguous():
        raise ValueError(f"the table must be a contiguous 2-D host tensor, got {tuple(table.shape)} on {table.device}")
    rows, hidden = ids.numel(), table.shape[1]
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.device != out.device:
        raise ValueError(
            f"ids must be int64 [rows] on {out.device}, got {ids.dtype} {tuple(ids.shape)} on {ids.device}"
        )
    if tuple(out.shape) != (rows, hidden) or out.dtype != table.dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {table.dtype} [{rows}, {hidden}] tensor, got {out.dtype} {tuple(out.shape)}"
        )
    if out.device.type == "cpu":
        return torch.index_select(table, 0, ids, out=out)
    if out.device.type != "cuda" or not table.is_pinned():
        raise ValueError(f"rows for {out.device} are read from a pinned host table (this one is not pinned)")
    if rows:
        _embedding_rows_kernel[(rows, triton.cdiv(hidden, _BLOCK))](table, ids, out, H=hidden, BLOCK=_BLOCK)
    return out
