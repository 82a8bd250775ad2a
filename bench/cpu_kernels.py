"""The CPU INT4 matmul alone, beside a bf16 ``F.linear`` of the same shape, on Qwen2.5-0.5B's Linear shapes.

    python -m bench.cpu_kernels [--threads 1] [--rows 1 --rows 16 ...] [--repeats 50]

Random weights packed by ``protocol.cpu_kernel_form.pack_for_cpu_kernel``, timed with
``compute.kernels.cpu.cpu_int4_matmul``; each figure is the minimum and the median over ``--repeats`` calls
(the minimum is what the kernel can do, the median what a shared machine gave it). The weights of the small
shapes stay in cache between calls, so their one-row rates are above what a whole model's pass gets.
"""

from __future__ import annotations

import statistics
import time

import click
import torch
import torch.nn.functional as F

from compute.kernels.cpu import cpu_int4_matmul
from protocol.cpu_kernel_form import pack_for_cpu_kernel
from quantizer.format import quantize

# (name, N, K) of Qwen2.5-Coder-0.5B: hidden 896, 14 query / 2 KV heads of 64, MLP 4864, vocab 151936
SHAPES = (("q/o", 896, 896), ("k/v", 128, 896), ("gate/up", 4864, 896), ("down", 896, 4864), ("lm_head", 151936, 896))


def timed(call, repeats: int) -> tuple[float, float]:
    """(minimum, median) milliseconds of ``call()``."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, statistics.median(times) * 1e3


@click.command()
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--rows", "rows_list", type=click.IntRange(min=1), multiple=True, help="Rows of x (default: 1, 16, 128).")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True)
def main(threads: int, rows_list: tuple[int, ...], repeats: int) -> None:
    torch.set_num_threads(threads)
    for name, n, k in SHAPES:
        qweight, scales = quantize(torch.randn(n, k) * 0.02)
        packed, scales_and_zeros = pack_for_cpu_kernel(qweight, scales)
        weight = torch.randn(n, k, dtype=torch.bfloat16)
        for rows in rows_list or (1, 16, 128):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            count = max(3, repeats // 10) if n * rows > 10**7 else repeats
            int4 = timed(lambda: cpu_int4_matmul(x, packed, scales_and_zeros), count)
            bf16 = timed(lambda: F.linear(x, weight), count)
            click.echo(
                f"{name:8} [{n:6} x {k:4}] rows {rows:4}: INT4 {int4[0]:8.3f} / {int4[1]:8.3f} ms "
                f"({n * k / 2 / int4[0] / 1e6:5.1f} GB/s of weights at the minimum), "
                f"bf16 F.linear {bf16[0]:8.3f} / {bf16[1]:8.3f} ms   [min / median, {threads} thread(s)]"
            )


if __name__ == "__main__":
    main()
