"""Kernel microbenchmark: the INT4 GEMV and the prefill path on the 32B model's Linear shapes (CUDA only).

``python -m bench.kernels [--json PATH] [--sweep]`` measures, in one run:

* the device->device copy rate (a large ``copy_``, bytes read plus written): the ceiling the GEMV is held to;
* per shape, the GEMV at M = 1 inside a CUDA graph (the way decode runs it), as microseconds per call and
  GB/s of weight bytes (qweight + scales) against that ceiling, cycling through enough weight copies that
  the 50 MB L2 cache cannot serve them;
* the prefill path at M = 2048 in TFLOP/s, beside cuBLAS on an already dequantized bf16 weight;
* the crossover in rows between the GEMV and the prefill path (``GEMV_MAX_ROWS``);
* with ``--sweep``, every GEMV config of a small grid per shape, and the best as ``TUNED_CONFIGS`` source;
  the tables after the sweep use those configs.

It prints tables and writes everything to JSON. Nothing here is imported by the engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
import triton

from compute.kernels import GEMV_MAX_ROWS, reference_int4_matmul
from compute.kernels.gemm import int4_gemm
from compute.kernels.gemv import int4_gemv, row_operand
from compute.kernels.gemv_configs import TUNED_CONFIGS, GemvConfig, MmaConfig, gemv_config
from quantizer.format import dequantize, quantize, quantized_nbytes

log = logging.getLogger("bench.kernels")

# (name, N = out features, K = in features) of DeepSeek-R1-Distill-Qwen-32B's Linears, and how many of each
# one forward pass runs (64 layers; q and o share a shape, so do k and v, and gate and up; one lm_head).
SHAPES_32B = [
    ("q/o 5120->5120", 5120, 5120, 128),
    ("k/v 5120->1024", 1024, 5120, 128),
    ("gate/up 5120->27648", 27648, 5120, 128),
    ("down 27648->5120", 5120, 27648, 64),
    ("lm_head 5120->152064", 152064, 5120, 1),
]
# The GEMVs of one decode step as compute.decode runs them (q/k/v as one matrix, gate/up as one), and whether
# it leaves the split-K partial sums to the kernel that consumes them (``int4_gemv(partials=True)``).
DECODE_SHAPES_32B = [
    ("q|k|v 5120->7168", 7168, 5120, 64, True),
    ("o 5120->5120", 5120, 5120, 64, True),
    ("gate|up 5120->55296", 55296, 5120, 64, False),
    ("down 27648->5120", 5120, 27648, 64, True),
    ("lm_head 5120->152064", 152064, 5120, 1, False),
]
ROTATION_BYTES = 400 * 10**6  # weight copies cycled per timing: several times the H200's 50 MB L2
PREFILL_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class Weights:
    """Copies of one random quantized weight, so that consecutive calls read DRAM, not L2."""

    qweights: list[torch.Tensor]  # uint8 [N, K/2] each
    scales: list[torch.Tensor]  # bf16 [N, K/128] each

    @property
    def nbytes(self) -> int:
        """Bytes one GEMV must read: a weight's packed nibbles plus its scales."""
        return self.qweights[0].numel() + self.scales[0].numel() * 2


def make_weights(n: int, k: int, copies: int | None = None) -> Weights:
    if copies is None:
        copies = max(2, min(64, math.ceil(ROTATION_BYTES / quantized_nbytes(n, k))))
    qweight, scales = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    return Weights([qweight.clone() for _ in range(copies)], [scales.clone() for _ in range(copies)])


def time_in_graph(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median seconds per call of ``calls`` captured back to back in one CUDA graph."""
    for call in calls[:2]:
        call()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    del graph
    return sorted(times)[len(times) // 2]


def time_eager(call: Callable[[], object], repeats: int = 10) -> float:
    """Median seconds of one call, for calls long enough (milliseconds) that launch overhead does not matter."""
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure_copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Device->device ``copy_`` rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_eager(lambda: dst.copy_(src), repeats=20)
    return 2 * nbytes / seconds


def gemv_calls(
    weights: Weights, x: torch.Tensor, config: GemvConfig | MmaConfig | None, partials: bool = False
) -> list[Callable[[], object]]:
    # One row is made into the one-row kernel's operand once, outside the timed calls: in the decode step the kernel
    # that produces the row writes it (compute.decode).
    operand = row_operand(x) if x.shape[0] == 1 else x
    return [
        (lambda q=q, s=s: int4_gemv(operand, q, s, None, config, partials=partials))
        for q, s in zip(weights.qweights, weights.scales)
    ]


def check_gemv(weights: Weights, m: int, config: GemvConfig | MmaConfig | None) -> float:
    """Relative error of the GEMV against the torch reference on one fresh input (a sanity check, not a test)."""
    x = torch.randn(m, weights.qweights[0].shape[1] * 2, device="cuda", dtype=torch.bfloat16)
    y = int4_gemv(x, weights.qweights[0], weights.scales[0], None, config).float()
    ref = reference_int4_matmul(x.float(), weights.qweights[0], weights.scales[0])
    return float((y - ref).norm() / ref.norm())


def bench_decode(copy_bw: float) -> list[dict]:
    """The GEMVs of a decode step at M = 1 (``DECODE_SHAPES_32B``), with the configs ``gemv_config`` picks."""
    rows = []
    for name, n, k, per_forward, partials in DECODE_SHAPES_32B:
        weights = make_weights(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        calls = gemv_calls(weights, x, None, partials)
        seconds = time_in_graph(calls)
        eager_seconds = time_eager(lambda: [call() for call in calls]) / len(calls)
        rows.append(
            dict(
                shape=name, n=n, k=k, per_forward=per_forward, partials=partials,
                us=seconds * 1e6, eager_us=eager_seconds * 1e6,
                gbps=weights.nbytes / seconds / 1e9, of_copy=weights.nbytes / seconds / copy_bw,
                config=dataclasses.asdict(gemv_config("mma", n, k)), rel_err=check_gemv(weights, 1, None),
            )
        )
        del weights
    return rows


def bench_glue() -> list[dict]:
    """The decode step's small kernels between the GEMVs, alone, on the 32B shapes: 64 calls back to back in one
    CUDA graph, so each figure is a kernel's time plus the graph's launch gap (no early launch: nothing waits)."""
    from compute.kernels.activation import silu_mul
    from compute.kernels.norm import add_partials, add_partials_workspace, rms_norm

    hidden, intermediate = 5120, 27648

    def row(n: int) -> torch.Tensor:
        return torch.randn(1, 1, n, device="cuda", dtype=torch.bfloat16)

    x, weight, workspace = row(hidden).view(1, -1), row(hidden).view(-1), add_partials_workspace("cuda")
    gate, up = row(intermediate), row(intermediate)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("rms_norm -> operand", lambda: rms_norm(x, weight, 1e-6, operand=True)),
        ("silu_mul 27648 -> operand", lambda: silu_mul(gate.view(1, -1), up.view(1, -1), operand=True)),
    ]
    for splits in (8, 16):
        residual, parts = row(hidden), torch.randn(splits, 1, hidden, device="cuda")
        cases += [
            (f"add_partials, {splits} partial rows", lambda r=residual, p=parts: add_partials(r, p)),
            (f"add_partials, {splits} partial rows + norm -> operand",
             lambda r=residual, p=parts: add_partials(r, p, None, weight, 1e-6, operand=True, workspace=workspace)),
        ]  # fmt: skip
    rows = []
    for name, call in cases:
        rows.append(dict(kernel=name, us=time_in_graph([call] * 64) * 1e6))
    return rows


def bench_prefill() -> list[dict]:
    """int4_gemm at M = 2048 for every 32B shape, beside cuBLAS on the bf16 weight it dequantizes to."""
    rows = []
    for name, n, k, per_forward in SHAPES_32B:
        qweight, scales = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(PREFILL_ROWS, k, device="cuda", dtype=torch.bfloat16)
        seconds = time_eager(lambda: int4_gemm(x, qweight, scales))
        weight = dequantize(qweight, scales)
        cublas_seconds = time_eager(lambda: torch.nn.functional.linear(x, weight))
        flops = 2 * PREFILL_ROWS * n * k
        rows.append(
            dict(
                shape=name, n=n, k=k, per_forward=per_forward, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                cublas_bf16_tflops=flops / cublas_seconds / 1e12,
            )
        )
        del qweight, scales, weight
    return rows


def bench_crossover(rows_list: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 32, 64)) -> list[dict]:
    """GEMV against the prefill path for growing M, on the shapes that dominate a layer: ``gemv_us`` is what
    ``int4_gemv`` picks (the tensor-core kernel up to 16 rows, making the rows' operand in each call past one row),
    ``dot_us`` the dot kernel at the same rows (2 rows on)."""
    out = []
    for name, n, k, _ in SHAPES_32B[:4]:
        weights = make_weights(n, k)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gemv_s = time_in_graph(gemv_calls(weights, x, None), replays=10)
            dot_s = time_in_graph(gemv_calls(weights, x, gemv_config("dot", n, k)), replays=10) if m > 1 else None
            gemm_s = time_in_graph(
                [(lambda q=q, s=s: int4_gemm(x, q, s)) for q, s in zip(weights.qweights[:8], weights.scales[:8])],
                replays=10,
            )
            out.append(dict(shape=name, n=n, k=k, m=m, gemv_us=gemv_s * 1e6, gemm_us=gemm_s * 1e6,
                            dot_us=None if dot_s is None else dot_s * 1e6))  # fmt: skip
        del weights
    return out


# The one-row kernel: 16-row tiles a warp, warps a program, groups a step (loaded a step ahead), splits along K.
# splits 12 and 13: down's 216 groups in 12 or 13 splits fill about one wave of one-warp programs at 16 warps an SM
SWEEP_MMA = dict(tiles=(1, 2, 4), warps=(1, 2, 4), groups=(1, 2), splits=(1, 2, 4, 8, 12, 13, 16))
SWEEP_DOT = dict(block_n=(32, 64), groups=(1, 2), split_k=(1, 4, 8), num_warps=(4,), num_stages=(2, 3))
SWEEP_DOT_ROWS = 8


def _by_share(shapes: list[tuple]) -> list[tuple]:
    """(name, N, K, per forward, ...) shapes by the weight bytes they read per token, most first: a sweep cut short by
    its budget has then tuned the ones that matter most."""
    return sorted(shapes, key=lambda shape: -shape[1] * shape[2] * shape[3])


def sweep_configs(kernel: str, n: int) -> list[GemvConfig | MmaConfig]:
    """The grid of ``kernel`` for ``n`` output rows, less configs that launch fewer programs than an H200 has SMs
    or more than ~60 of one warp an SM (never the best), or that hold more than 32 words a thread (spills)."""
    if kernel in ("mma", "mma-rows"):
        configs = [MmaConfig(*values) for values in itertools.product(*SWEEP_MMA.values())]
        keep = [c for c in configs if c.tiles * c.warps <= 4 and 132 <= math.ceil(n / c.rows) * c.splits <= 8192]
        return keep
    configs = [GemvConfig(*values) for values in itertools.product(*SWEEP_DOT.values())]
    return [
        c for c in configs
        if 4 <= c.block_n * c.groups * 16 // (c.num_warps * 32) <= 32 and 132 <= math.ceil(n / c.block_n) * c.split_k
    ]  # fmt: skip


def sweep_gemv(
    budget_s: float, kernels: tuple[str, ...] = ("mma", "dot"), only: tuple[str, ...] = ()
) -> tuple[list[dict], dict[tuple[str, int, int], GemvConfig | MmaConfig]]:
    """Time every config of the grids of ``kernels`` on their shapes (the one-row kernel: the decode step's, the dot
    kernel: the model's Linears; with ``only``, the shapes whose name starts with one of them), within ``budget_s``
    seconds; the best per shape. The config in force comes first for each shape: a sweep cut short by its budget
    can then only keep it or find better."""
    shapes = {
        "mma": (1, [(name, n, k, partials) for name, n, k, _, partials in _by_share(DECODE_SHAPES_32B)]),
        # the batched decode layer's GEMVs at a full batch of 16 rows (compute.batch_engine), the same shapes
        "mma-rows": (16, [(name, n, k, partials) for name, n, k, _, partials in _by_share(DECODE_SHAPES_32B)]),
        "dot": (SWEEP_DOT_ROWS, [(name, n, k, False) for name, n, k, _ in SHAPES_32B]),
    }
    if only:
        shapes = {kernel: (rows, [s for s in listed if s[0].startswith(only)]) for kernel, (rows, listed) in shapes.items()}
    plan = [
        (kernel, rows, shape, [gemv_config(kernel, shape[1], shape[2])] + sweep_configs(kernel, shape[1]))
        for kernel in kernels
        for rows, kernel_shapes in (shapes[kernel],)
        for shape in kernel_shapes
    ]
    return _time_plan(plan, budget_s)


def _time_plan(plan: list, budget_s: float) -> tuple[list[dict], dict[tuple[str, int, int], GemvConfig | MmaConfig]]:
    """Time ``plan``'s (kernel, rows, (name, N, K, partials), configs) in order within ``budget_s``; the best per
    (kernel, N, K)."""
    deadline = time.monotonic() + budget_s
    results: list[dict] = []
    best: dict[tuple[str, int, int], tuple[float, GemvConfig | MmaConfig]] = {}
    for kernel, m, (name, n, k, partials), configs in plan:
        weights = make_weights(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for cfg in configs:
            if time.monotonic() > deadline:
                log.warning("sweep stopped at its budget of %.0f s", budget_s)
                return results, {key: cfg for key, (_, cfg) in best.items()}
            try:
                seconds = time_in_graph(gemv_calls(weights, x, cfg, partials), replays=5)
            except triton.runtime.errors.OutOfResources as e:  # raised while compiling, before any capture
                log.info("skipping %s: %s", cfg, e)
                continue
            results.append(dict(kernel=kernel, shape=name, n=n, k=k, m=m, us=seconds * 1e6,
                                gbps=weights.nbytes / seconds / 1e9, config=dataclasses.asdict(cfg)))
            if seconds < best.get((kernel, n, k), (math.inf, None))[0]:
                best[(kernel, n, k)] = (seconds, cfg)
        del weights
    return results, {key: cfg for key, (_, cfg) in best.items()}


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (header, key in each row, format spec)."""
    click.echo(f"\n{title}")
    click.echo("  ".join(f"{header:>22}" for header, _, _ in columns))
    for row in rows:
        click.echo("  ".join(f"{'' if row[key] is None else format(row[key], spec):>22}" for _, key, spec in columns))


@click.command()
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("bench_kernels.json"), show_default=True, help="Where to write all measurements.")
@click.option("--sweep/--no-sweep", default=False, help="Also time a grid of GEMV configs per shape.")
@click.option("--sweep-seconds", type=float, default=90.0, show_default=True, help="Time budget of the sweep.")
@click.option("--sweep-kernels", type=click.Choice(["mma", "mma-rows", "dot", "both"]), default="both",
              show_default=True, help="Which grid to sweep: mma (one row, decode), mma-rows (the tensor-core kernel at "
              "16 rows, batched decode) or dot (the dot kernel, 8 rows); both = mma and dot.")
@click.option("--sweep-shape", "sweep_shapes", multiple=True, metavar="NAME",
              help="Sweep only the shapes whose name starts with NAME (repeatable), e.g. 'down'.")  # fmt: skip
@click.option("--crossover/--no-crossover", default=True, help="Time GEMV against the prefill path for M up to 64.")
def main(json_path: Path, sweep: bool, sweep_seconds: float, sweep_kernels: str, sweep_shapes: tuple[str, ...],
         crossover: bool) -> None:  # fmt: skip
    """Benchmark the INT4 kernels on the 32B shapes and compare them with the measured copy rate."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise click.ClickException("bench.kernels needs a CUDA device; none is visible")
    report: dict = dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__, gemv_max_rows=GEMV_MAX_ROWS,
    )
    copy_bw = measure_copy_bandwidth()
    report["copy_gbps"] = copy_bw / 1e9
    click.echo(f"{report['gpu']}: device->device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    if sweep:
        kernels = ("mma", "dot") if sweep_kernels == "both" else (sweep_kernels,)
        report["sweep"], tuned = sweep_gemv(sweep_seconds, kernels, sweep_shapes)
        report["tuned"] = {f"{kernel} {n} {k}": dataclasses.asdict(cfg) for (kernel, n, k), cfg in tuned.items()}
        TUNED_CONFIGS.update(tuned)  # the tables below then show the configs just found
        click.echo("\nTUNED_CONFIGS = {")
        for (kernel, n, k), cfg in sorted(tuned.items()):
            click.echo(f"    ({kernel!r}, {n}, {k}): {cfg!r},")
        click.echo("}")
    report["decode"] = bench_decode(copy_bw)
    decode_s = sum(row["us"] * row["per_forward"] for row in report["decode"]) * 1e-6
    report["decode_linears_ms_per_token"] = decode_s * 1e3
    print_table("GEMV, M = 1, in a CUDA graph", report["decode"], [
        ("shape", "shape", ""), ("us (graph)", "us", ".1f"), ("us (eager)", "eager_us", ".1f"),
        ("GB/s (graph)", "gbps", ".0f"), ("of copy", "of_copy", ".0%"),
        ("rel err", "rel_err", ".1e"),
    ])
    click.echo(f"all Linears of one decode token: {decode_s * 1e3:.2f} ms -> {1 / decode_s:.0f} tok/s before other costs")
    report["glue"] = bench_glue()
    print_table("the decode step's other kernels, alone, in a CUDA graph", report["glue"], [
        ("kernel", "kernel", ""), ("us per call", "us", ".2f"),
    ])
    report["prefill"] = bench_prefill()
    # A prefill needs the lm_head for the last position only: count the layers' Linears.
    prefill_s = sum(row["ms"] * row["per_forward"] for row in report["prefill"] if row["per_forward"] > 1) * 1e-3
    report["prefill_linears_tok_s"] = PREFILL_ROWS / prefill_s
    print_table(f"prefill path, M = {PREFILL_ROWS}", report["prefill"], [
        ("shape", "shape", ""), ("ms", "ms", ".2f"), ("TFLOP/s", "tflops", ".0f"),
        ("cuBLAS bf16 TFLOP/s", "cublas_bf16_tflops", ".0f"),
    ])
    click.echo(f"all layer Linears of a {PREFILL_ROWS}-token prefill: {prefill_s * 1e3:.0f} ms -> "
               f"{PREFILL_ROWS / prefill_s:.0f} tok/s before attention and other costs")
    if crossover:
        report["crossover"] = bench_crossover()
        print_table("GEMV against the prefill path, in a CUDA graph", report["crossover"], [
            ("shape", "shape", ""), ("M", "m", "d"), ("GEMV us", "gemv_us", ".1f"), ("dot kernel us", "dot_us", ".1f"),
            ("prefill us", "gemm_us", ".1f"),
        ])
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    click.echo(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
