"""Decode tokens/s with every unit resident, eager against the CUDA-graph decode step, on a synthetic 32B-shaped model.

``python -m bench.decode --layers 16 --json decode.json`` writes (or reuses) a synthetic ``qwen2-32b`` checkpoint
of that depth, starts a real loader process under the ``resident`` policy, connects an ``Engine`` to it, and
decodes the same greedy reply twice: once eagerly (``engine.cuda_graphs = False``) and once replaying the
captured decode step. Each figure is set beside the device->device copy rate this run measures: the weight bytes
read per token divided by the time per token is the bandwidth the decode step achieves, and ``16.5 GB`` (the whole
32B model's INT4 weights) over that bandwidth is what the full-depth model would take at the same efficiency.

The model has random weights: EOS is ignored so that every run decodes the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path

import click
import torch

from compute.config import KernelOptions, kernel_options
from protocol.sizes import SIZE

log = logging.getLogger(__name__)

FULL_MODEL_WEIGHT_BYTES = 16.5e9  # INT4 weights of the 64-layer 32B model, lm_head included


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeRun:
    mode: str  # "eager" or "cuda_graph"
    decode_mode: str  # Engine.decode_mode: what the engine actually did ("graph", "eager: <why>", ...)
    context: int  # prompt tokens in the cache before the timed decode
    decode_tokens: int
    tokens_per_s: float
    ms_per_token: float
    weight_gbps: float  # weight bytes read per token / time per token, GB/s
    fraction_of_d2d: float  # weight_gbps / the measured device->device rate
    full_model_tokens_per_s: float  # FULL_MODEL_WEIGHT_BYTES at weight_gbps


def run(checkpoint_dir: Path, *, gpu_memory: int, max_context: int, context: int, decode_tokens: int,
        d2d_gbps: float, device: str = "cuda", profile_path: Path | None = None,
        kernels: KernelOptions = KernelOptions()) -> list[DecodeRun]:  # fmt: skip
    """Both decode modes through a real resident loader on ``device``; see the module docstring. With
    ``profile_path``, a few more graph-replayed tokens run under the torch profiler and its table of device time
    per kernel is written there."""
    from compute.engine import Engine
    from compute.launch import LaunchedLoader
    from protocol.launch import LoaderCommand
    from compute.sampling import SamplingParams
    from protocol.client import LoaderClient
    from quantizer.checkpoint import QuantizedCheckpoint

    kernels.apply()
    options = LoaderCommand(model=checkpoint_dir, gpu_memory=gpu_memory, policy="resident", device=device,
                            max_context=max_context)  # fmt: skip
    runs = []
    with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=120) as client:
        weight_bytes = sum(unit.nbytes for unit in client.plan.units)
        engine = Engine(QuantizedCheckpoint(checkpoint_dir), client, device=device, max_context=max_context,
                        prefill_chunk=client.plan.prefill_chunk)  # fmt: skip
        engine.eos_token_ids = frozenset()
        rng = random.Random(0)
        prompt = [rng.randrange(engine.vocab_size) for _ in range(context)]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=decode_tokens + 1)
        for mode in ("eager", "cuda_graph"):
            engine.cuda_graphs = mode == "cuda_graph"
            engine.reset()
            engine.generate(prompt, dataclasses.replace(greedy, max_new_tokens=8))  # warm-up; captures the graph
            engine.reset()
            result = engine.generate(prompt, greedy)
            seconds = result.decode_seconds / result.decode_tokens
            gbps = weight_bytes / seconds / 1e9
            runs.append(DecodeRun(
                mode=mode, decode_mode=engine.decode_mode, context=context,
                decode_tokens=result.decode_tokens, tokens_per_s=result.decode_tokens_per_s,
                ms_per_token=seconds * 1e3, weight_gbps=gbps, fraction_of_d2d=gbps / d2d_gbps,
                full_model_tokens_per_s=gbps * 1e9 / FULL_MODEL_WEIGHT_BYTES,
            ))  # fmt: skip
            log.info("%s: %.1f tok/s", mode, result.decode_tokens_per_s)
        if profile_path is not None:
            profile_path.write_text(profile_decode(engine, prompt, greedy))
    return runs


def profile_decode(engine, prompt: list[int], greedy, tokens: int = 9) -> str:
    """Device time per kernel over ``tokens - 1`` decode steps (after one prefill), as the profiler tabulates it."""
    from torch.profiler import ProfilerActivity, profile

    engine.reset()
    engine.generate(prompt[:-1], dataclasses.replace(greedy, max_new_tokens=1))  # the prefill, outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompt, dataclasses.replace(greedy, max_new_tokens=tokens))  # ends synchronized: ids are read
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=70)
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA"]
    return table + "\n\n" + format_timeline(decode_timeline(kernels))


@dataclasses.dataclass(frozen=True)
class TimelineRow:
    name: str
    start_us: float  # mean start, from the start of the step
    duration_us: float  # mean start-to-end of the kernel (with early launch, its wait for the one before included)
    gap_us: float  # mean start minus the previous kernel's end: the launch gap (negative: it started early)


def decode_timeline(kernels: list[tuple[str, float, float]]) -> tuple[int, float, list[TimelineRow]]:
    """(steps, mean µs per step, one row per kernel of a step) for the trailing run of identical decode steps in
    ``kernels`` ((name, start µs, end µs), any order): the shortest period P with the last P kernel names equal to
    the P before them is one step; every earlier repeat of it is averaged in."""
    kernels = sorted(kernels, key=lambda k: k[1])
    names = [k[0] for k in kernels]
    period = next((p for p in range(1, len(names) // 2 + 1) if names[-p:] == names[-2 * p : -p]), None)
    if period is None:
        return 0, 0.0, []
    steps = 1
    while len(names) >= (steps + 1) * period and names[-(steps + 1) * period : -steps * period] == names[-period:]:
        steps += 1
    runs = [kernels[len(kernels) - (s + 1) * period : len(kernels) - s * period] for s in range(steps)]
    rows = []
    for i in range(period):
        start = sum(r[i][1] - r[0][1] for r in runs) / steps
        duration = sum(r[i][2] - r[i][1] for r in runs) / steps
        gap = sum(r[i][1] - r[i - 1][2] for r in runs) / steps if i else 0.0
        rows.append(TimelineRow(names[-period + i], start, duration, gap))
    step_us = sum(r[-1][2] - r[0][1] for r in runs) / steps
    return steps, step_us, rows


def format_timeline(timeline: tuple[int, float, list[TimelineRow]]) -> str:
    """Per kernel name of a decode step: count, summed duration and gaps; then the first 24 kernels in order."""
    steps, step_us, rows = timeline
    if not rows:
        return "no repeated decode step found among the profiled kernels"
    by_name: dict[str, list[TimelineRow]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    lines = [
        (
            f"decode step timeline: {steps} steps of {len(rows)} kernels, {step_us:.1f} us per step (kernel time "
            f"{sum(r.duration_us for r in rows):.1f} us, positive gaps {sum(max(r.gap_us, 0) for r in rows):.1f} us)"
        ),
        f"{'kernel':<44} {'calls':>5} {'us total':>9} {'us mean':>8} {'gap mean':>9}",
    ]
    for name, group in sorted(by_name.items(), key=lambda kv: -sum(r.duration_us for r in kv[1])):
        total = sum(r.duration_us for r in group)
        gap = sum(r.gap_us for r in group) / len(group)
        lines.append(f"{name[:44]:<44} {len(group):>5} {total:>9.1f} {total / len(group):>8.2f} {gap:>9.2f}")
    lines.append(f"{'first kernels of the step':<44} {'start':>9} {'us':>8} {'gap':>9}")
    lines += [f"{r.name[:44]:<44} {r.start_us:>9.1f} {r.duration_us:>8.2f} {r.gap_us:>9.2f}" for r in rows[:24]]
    return "\n".join(lines)


def format_table(runs: list[DecodeRun], d2d_gbps: float, weight_bytes_note: str) -> str:
    lines = [
        f"device->device copy {d2d_gbps:.0f} GB/s; {weight_bytes_note}",
        f"{'mode':<11} {'tok/s':>8} {'ms/tok':>8} {'weights GB/s':>13} {'of d2d':>7} {'32B tok/s':>10}  decode mode",
    ]
    for r in runs:
        lines.append(
            f"{r.mode:<11} {r.tokens_per_s:>8.1f} {r.ms_per_token:>8.2f} {r.weight_gbps:>13.0f} "
            f"{r.fraction_of_d2d:>7.0%} {r.full_model_tokens_per_s:>10.1f}  {r.decode_mode}"
        )
    return "\n".join(lines)


@click.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A spillover-int4 model; a synthetic qwen2-32b one is written there when missing.")  # fmt: skip
@click.option("--layers", type=click.IntRange(min=1), default=16, show_default=True,
              help="Depth of the synthetic model when one is written.")  # fmt: skip
@click.option("--gpu-memory", type=SIZE, default="24GiB", show_default=True)
@click.option("--max-context", type=click.IntRange(min=16), default=4096, show_default=True)
@click.option("--context", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt tokens.")
@click.option("--decode-tokens", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results here.")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path), default=None,
              help="Write the profiler's device time per kernel for a few graph-replayed tokens here.")  # fmt: skip
@kernel_options
def main(checkpoint: Path, layers: int, gpu_memory: int, max_context: int, context: int, decode_tokens: int,
         json_path: Path | None, profile_path: Path | None, gemv_configs: Path | None,
         early_launch: bool) -> None:  # fmt: skip
    """Decode tok/s, eager against CUDA graphs, everything resident."""
    from bench.pipeline import measure_ceilings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        raise click.ClickException("bench.decode measures CUDA-graph decode and needs a CUDA device")
    if context + decode_tokens + 1 > max_context:
        raise click.ClickException(f"--context {context} + --decode-tokens {decode_tokens} exceed --max-context")
    if not (checkpoint / "spillover.json").is_file():
        from quantizer.synth import synthesize

        click.echo(f"writing a {layers}-layer synthetic qwen2-32b checkpoint to {checkpoint} ...", err=True)
        synthesize(checkpoint, preset="qwen2-32b", layers=layers, device="auto", progress=False)
    d2d = measure_ceilings().d2d_gbps
    runs = run(checkpoint, gpu_memory=gpu_memory, max_context=max_context, context=context,
               decode_tokens=decode_tokens, d2d_gbps=d2d, profile_path=profile_path,
               kernels=KernelOptions(gemv_configs=gemv_configs, early_launch=early_launch))  # fmt: skip
    from quantizer.checkpoint import QuantizedCheckpoint

    config = QuantizedCheckpoint(checkpoint).config
    note = f"{config['num_hidden_layers']} layers, max_context {max_context}, context {context}"
    click.echo(format_table(runs, d2d, note))
    if json_path is not None:
        record = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "checkpoint": str(checkpoint),
            "layers": config["num_hidden_layers"],
            "max_context": max_context,
            "d2d_gbps": d2d,
            "runs": [dataclasses.asdict(r) for r in runs],
        }
        json_path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
