"""One decode row's attention, static cache against paged pool, on the 32B model's shapes (CUDA only).

``python -m bench.attention [--json PATH]`` times, per layer, the two kernels' chains a one-row decode pass runs
between the q|k|v GEMV and the o GEMV:

* ``static``: ``rotary_cache_write`` then ``decode_attention(operand=True)`` over a ``[1, KVH, C, D]`` cache (what
  ``spillover run``'s decode step runs; its split count follows the capacity C);
* ``paged``: ``rotary_pool_write`` then ``paged_decode_attention(operand=True)`` over the pool's pages (what the
  batched engine runs for one row), at ``paged_splits``' count and at fewer splits; with ``--stages 1,2`` the split
  kernel's block loop pipelined in each of those stage counts (``paged_attention.SPLIT_STAGES``).

Each chain is captured for 64 layers, each with a cache of its own, back to back in one CUDA graph, with early
launch on and off (``compute.kernels.pdl``); figures are microseconds per layer at a few sequence lengths. The
32B model has 40 query heads and 8 KV heads of 128. Nothing here is imported by the engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from bench.kernels import print_table, time_in_graph
from compute.kernels import paged_attention, pdl
from compute.kernels.attention import decode_attention, rotary_cache_write
from compute.kernels.paged_attention import paged_decode_attention, paged_splits, rotary_pool_write

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 40, 8, 128, 64
QKV_SPLITS = 8  # split-K partial rows the q|k|v GEMV leaves
PAGE_TOKENS = 16


def _operands(length: int) -> dict:
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    cos, sin = (torch.randn(1, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return {
        "partials": torch.randn(QKV_SPLITS, 1, width, device="cuda"),
        "bias": torch.randn(width, device="cuda", dtype=torch.bfloat16), "cos": cos, "sin": sin,
        "position": torch.tensor([length - 1], device="cuda"),
    }


def static_calls(length: int, capacity: int) -> list:
    ops = _operands(length)
    caches = [
        tuple(torch.randn(1, KV_HEADS, capacity, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(LAYERS)
    ]
    cache_length = torch.zeros((), dtype=torch.int64, device="cuda")

    def layer(keys: torch.Tensor, values: torch.Tensor) -> None:
        q = rotary_cache_write(ops["partials"], ops["bias"], ops["cos"], ops["sin"], keys, values, ops["position"],
                               cache_length, num_heads=HEADS, num_kv_heads=KV_HEADS)  # fmt: skip
        decode_attention(q, keys, values, ops["position"], HEAD_DIM**-0.5, operand=True)

    return [lambda k=k, v=v: layer(k, v) for k, v in caches]


def paged_calls(length: int, capacity: int, splits: int | None) -> list:
    ops = _operands(length)
    pages = capacity // PAGE_TOKENS
    pools = [
        tuple(torch.randn(pages + 1, PAGE_TOKENS, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
              for _ in range(2))
        for _ in range(LAYERS)
    ]  # fmt: skip
    table = torch.randperm(pages, device="cuda", dtype=torch.int32)[None]  # one row's pages, scattered
    lengths = torch.tensor([length], device="cuda", dtype=torch.int32)
    slot = int(table[0, (length - 1) // PAGE_TOKENS]) * PAGE_TOKENS + (length - 1) % PAGE_TOKENS
    slots = torch.tensor([slot], device="cuda")
    qkv = ops["partials"]

    def layer(keys: torch.Tensor, values: torch.Tensor) -> None:
        q = rotary_pool_write(qkv, ops["cos"], ops["sin"], slots, keys.view(-1, KV_HEADS, HEAD_DIM),
                              values.view(-1, KV_HEADS, HEAD_DIM), num_heads=HEADS, num_kv_heads=KV_HEADS,
                              bias=ops["bias"])  # fmt: skip
        paged_decode_attention(q, keys, values, table, lengths, scale=HEAD_DIM**-0.5, operand=True, splits=splits)

    return [lambda k=k, v=v: layer(k, v) for k, v in pools]


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--lengths", default="128,512,2048", show_default=True, help="Sequence lengths (positions attended).")
@click.option("--capacity", default=4096, show_default=True, help="The cache's / page table's positions (max context).")
@click.option("--stages", default=None, help="Pipeline stages of the paged split kernel to time, e.g. 1,2 "
              "(default: SPLIT_STAGES).")
def main(json_path: Path | None, lengths: str, capacity: int, stages: str | None) -> None:
    """Time one decode row's rotary write and attention, static cache against paged pool."""
    if not torch.cuda.is_available():
        raise click.ClickException("bench.attention needs a CUDA device; none is visible")
    default_stages = paged_attention.SPLIT_STAGES
    stage_counts = [int(n) for n in stages.split(",")] if stages else [default_stages]
    auto = paged_splits(1, KV_HEADS, capacity // PAGE_TOKENS, PAGE_TOKENS, torch.device("cuda"))
    rows = []
    for early in (True, False):
        pdl.set_early_launch(early)
        for length in (int(n) for n in lengths.split(",")):
            cases = [(f"static C={capacity}", static_calls, (length, capacity))]
            if length < 1024:
                cases.append(("static C=1024", static_calls, (length, 1024)))
            cases = [(name, None, make, args) for name, make, args in cases]
            cases += [(f"paged splits={s}{' (auto)' if s == auto else ''}{f' stages={n}' if s > 1 else ''}", n,
                       paged_calls, (length, capacity, s))
                      for n in stage_counts for s in sorted({auto, 16, 8, 4, 1}, reverse=True)
                      if s > 1 or n == stage_counts[0]]  # fmt: skip
            for name, stage_count, make, args in cases:
                paged_attention.SPLIT_STAGES = stage_count or default_stages
                calls = make(*args)
                us = time_in_graph(calls) * 1e6
                rows.append({"early_launch": early, "length": length, "chain": name, "us_per_layer": us})
                del calls
                torch.cuda.empty_cache()
    pdl.set_early_launch(True)
    paged_attention.SPLIT_STAGES = default_stages
    print_table(f"{torch.cuda.get_device_name()}: one row's rotary write + attention, per layer", rows, [
        ("early launch", "early_launch", ""), ("length", "length", "d"), ("chain", "chain", ""),
        ("us per layer", "us_per_layer", ".2f"),
    ])  # fmt: skip
    if json_path:
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
                  "capacity": capacity, "rows": rows}
        json_path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
