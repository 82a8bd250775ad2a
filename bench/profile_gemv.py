"""Run the decode step's INT4 GEMV for one shape a few times, for a hardware-counter profiler to look at.

    ncu --clock-control none -k regex:_gemv_mma --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python -m bench.profile_gemv --n 55296 --k 5120
"""

from __future__ import annotations

import click
import torch

from compute.kernels.gemv import int4_gemv, row_operand
from compute.kernels.gemv_configs import gemv_config
from quantizer.format import quantize


@click.command()
@click.option("--n", type=int, default=55296, show_default=True, help="Output features (the gate|up matrix).")
@click.option("--k", type=int, default=5120, show_default=True, help="Input features.")
@click.option("--calls", type=int, default=8, show_default=True)
def main(n: int, k: int, calls: int) -> None:
    qweight, scales = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    x = row_operand(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
    for _ in range(calls):
        int4_gemv(x, qweight, scales)
    torch.cuda.synchronize()
    click.echo(f"{calls} calls of the {n}x{k} GEMV, config {gemv_config('mma', n, k)}")


if __name__ == "__main__":
    main()
