"""Where a one-row decode pass of the batched engine spends its time, in pieces (CUDA).

``python -m bench.one_row [--checkpoint DIR] [--gpu-memory 24GiB] [--steps 64] [--prompt-tokens 128]`` starts a real
loader planned for 16 sequences, builds ``compute.batch_engine.BatchEngine`` on its plan, prefills one sequence of
``--prompt-tokens`` and times, per decode pass of that one row (milliseconds, the median of ``--steps``):

* ``replay``: the captured pass replayed on inputs already set, and a device sync (the GPU's time, launch included);
* ``set``: writing the pass's inputs into the static buffers (``DecodeInputs.set``) and a device sync;
* ``forward``: ``engine.forward([chunk])`` and the argmax read back (what a caller of the engine pays);
* ``scheduler``: the inter-token latency of one request through ``compute.scheduler.Scheduler`` (what
  ``spillover bench --concurrency 1`` reports), every event delivered to a callback; ``passes_ahead`` counts its
  passes launched before the tokens of the one before were read (``device_ids``: whether the engine can), and
  ``scheduler_itl_p50_ms_waiting`` the same with every pass waiting for the tokens before it (``compute.batching``);
* ``one_conversation``: a decode token of ``compute.engine.Engine`` (what ``spillover run`` decodes with) on the
  same loader's weights, in the same process: the baseline; ``one_conversation_replay`` its captured decode step
  replayed alone, as ``replay`` is.

As a check that the batched pass computes what the decode step does (its kernels launch early on Hopper), both
engines then decode the same 16 tokens after the same prompt: ``logits_relative_error`` is the largest
``||batched - single|| / ||single||`` over those steps (bf16 noise is ~1e-2; a kernel reading its input too early
gives ~1).

So ``forward - replay`` is the host's work around a pass and ``scheduler - forward`` the scheduler's.

``--paged-splits N`` (a cap on ``paged_splits``' count) and ``--paged-stages N`` (the split kernel's pipeline
stages) change the batched pass's attention for an experiment, one variant a run; the baseline is measured again
in each run.

With ``--profile``, the kernels of both passes are traced (``torch.profiler``, which sees into CUDA graphs) and
``kernels`` lists, per kernel name, its launches and microseconds per pass in each: the batched pass's replay and
the one-conversation engine's decode step, side by side, the largest differences first. Kernel times add up to
more than a pass where kernels launched early overlap, and leave out the gaps between launches.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import click
import torch

from compute.config import KernelOptions, kernel_options
from compute.kernels import paged_attention
from compute.kernels.attention import MAX_SPLITS


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel_times(run, steps: int) -> dict[str, tuple[float, float]]:
    """Per CUDA kernel name: (launches, microseconds) per call of ``run``, over ``steps`` traced calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            run()
        _sync()
    table: dict[str, list[float]] = {}
    for event in trace.events():
        if event.device_type == DeviceType.CUDA:
            entry = table.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    return {name: (count / steps, total / steps) for name, (count, total) in table.items()}


def _kernel_rows(batched: dict, single: dict) -> list[dict]:
    """The two passes' kernel tables side by side, the largest difference in time first."""
    rows = []
    for name in set(batched) | set(single):
        ours, theirs = batched.get(name, (0, 0.0)), single.get(name, (0, 0.0))
        rows.append({"kernel": name[:90], "batched_launches": ours[0], "batched_us": round(ours[1], 1),
                     "single_launches": theirs[0], "single_us": round(theirs[1], 1)})  # fmt: skip
    rows.sort(key=lambda row: -abs(row["batched_us"] - row["single_us"]))
    total = {"kernel": "(all)"}
    for key in ("batched_launches", "batched_us", "single_launches", "single_us"):
        total[key] = round(sum(row[key] for row in rows), 1)
    return [total, *rows]


def _median_ms(run, steps: int) -> float:
    times = []
    for _ in range(steps):
        _sync()
        started = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


@click.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=Path("/tmp/spillover-synth-qwen2-32b"),
              show_default=True)
@click.option("--gpu-memory", "budget", default="24GiB", show_default=True)
@click.option("--steps", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1, max=3000), default=128, show_default=True,
              help="Positions of the timed row's prompt (its attention's length).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--profile", is_flag=True, help="Also list both passes' kernels, traced (CUDA).")
@click.option("--paged-splits", type=click.IntRange(min=1, max=MAX_SPLITS), default=None,
              help="Cap the paged attention's splits (an experiment; default: paged_splits' count).")
@click.option("--paged-stages", type=click.IntRange(min=1, max=4), default=None,
              help="Pipeline stages of the paged split kernel's block loop (an experiment; default: SPLIT_STAGES).")
@kernel_options
def main(
    checkpoint: Path, budget: str, steps: int, prompt_tokens: int, device: str, json_path: Path | None, profile: bool,
    paged_splits: int | None, paged_stages: int | None, **kernels,
) -> None:  # fmt: skip
    """Time the batched engine's one-row decode pass in pieces (see the module docstring)."""
    import random

    KernelOptions(**kernels).apply()
    if paged_splits is not None:
        full = paged_attention.paged_splits
        paged_attention.paged_splits = lambda *shape: min(full(*shape), paged_splits)
    if paged_stages is not None:
        paged_attention.SPLIT_STAGES = paged_stages

    from bench.concurrency import measure_level
    from compute.batch_engine import BatchEngine, Chunk
    from compute.engine import Engine
    from compute.launch import LaunchedLoader
    from compute.sampling import SamplingParams
    from compute.scheduler import Scheduler
    from protocol.client import LoaderClient
    from protocol.launch import LoaderCommand
    from protocol.sizes import parse_size
    from quantizer.checkpoint import QuantizedCheckpoint

    options = LoaderCommand(model=checkpoint, gpu_memory=parse_size(budget), policy="hybrid", device=device,
                            max_context=4096, max_batch=16, kv_tokens=4096)  # fmt: skip
    rng = random.Random(0)
    with (
        LaunchedLoader.start(options) as loader,
        LoaderClient.connect(loader.address, timeout_s=120) as client,
        torch.inference_mode(),  # the engine's static buffers are inference tensors: written only in this mode
    ):
        engine = BatchEngine.for_plan(QuantizedCheckpoint(checkpoint), client, device=device)
        vocab = min(engine.vocab_size, 1000)
        prompt = tuple(rng.randrange(vocab) for _ in range(prompt_tokens))
        pool = engine.kv_pool
        pool.reserve("s", len(prompt) + 2 * steps + 8)
        engine.forward([Chunk("s", prompt, 0, logits=True)])
        position = len(prompt)

        def forward() -> None:
            nonlocal position
            logits = engine.forward([Chunk("s", (int(rng.randrange(vocab)),), position, logits=True)])
            int(logits.float().argmax(-1)[0])
            position += 1

        forward()  # captures the one-row pass
        forward_ms = _median_ms(forward, steps)
        chunk = [Chunk("s", (7,), position, logits=True)]
        set_ms = replay_ms = float("nan")  # without CUDA graphs there is no captured pass
        batched_kernels: dict = {}
        if 1 in engine.decoder._graphs:
            inputs, graphs = engine.decoder._graphs[1]
            set_ms = _median_ms(lambda: inputs.set(engine, chunk), steps)
            replay_ms = _median_ms(lambda: engine.decoder._run_segments(inputs, graphs), steps)
            if profile:
                batched_kernels = _kernel_times(lambda: engine.decoder._run_segments(inputs, graphs), steps)
        pool.release("s")
        can_go_ahead = engine.device_ids
        scheduler_itl_ms, passes_ahead = {}, 0
        for ahead in (False, True) if can_go_ahead else (False,):  # every pass waiting for its tokens, then not
            engine.device_ids = ahead
            scheduler = Scheduler(engine, max_batch=16, max_waiting=4)
            scheduler.start()
            try:
                measure_level(scheduler, concurrency=1, prompt_tokens=prompt_tokens, new_tokens=8, rng=rng)  # warm-up
                level = measure_level(scheduler, concurrency=1, prompt_tokens=prompt_tokens, new_tokens=steps, rng=rng)
                scheduler_itl_ms[ahead] = 1e3 * level.itl_p50_s
                passes_ahead = scheduler.stats().passes_ahead
            finally:
                scheduler.close(drain=False)
        engine.device_ids = can_go_ahead
        single = Engine(QuantizedCheckpoint(checkpoint), client, device=device, max_context=4096)  # as the batched pool
        single.eos_token_ids = frozenset()
        greedy = SamplingParams(temperature=0, max_new_tokens=steps)
        single.generate(list(prompt), greedy)  # captures the decode step
        single.reset()
        one_conversation_ms = 1e3 / single.generate(list(prompt), greedy).decode_tokens_per_s
        one_conversation_replay_ms = float("nan")
        if single._decoder.graphs is not None:  # the same slot each time, as the batched replay
            single._decoder.step.set(7, len(prompt))
            one_conversation_replay_ms = _median_ms(single._decoder.graphs.run, steps)
        kernels_table = None
        if profile and device == "cuda":
            single.reset()
            single.generate(list(prompt), SamplingParams(temperature=0, max_new_tokens=1))
            single_kernels = _kernel_times(lambda: single._decode_step(7, len(prompt)), steps)  # the same slot
            kernels_table = _kernel_rows(batched_kernels, single_kernels)
        single.reset()
        single.generate(list(prompt), SamplingParams(temperature=0, max_new_tokens=1))  # the cache holds the prompt
        pool.reserve("c", len(prompt) + 17)
        engine.forward([Chunk("c", prompt, 0, logits=True)])
        error = 0.0
        for offset in range(16):
            token = rng.randrange(vocab)
            ours = engine.forward([Chunk("c", (token,), len(prompt) + offset, logits=True)])[0].float()
            theirs = single._decode_step(token, len(prompt) + offset).float()
            difference = float((ours - theirs).norm() / theirs.norm())
            error = difference if not math.isfinite(difference) else max(error, difference)  # NaN must show
            if not math.isfinite(error):
                break
    result = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "budget": budget, "decode_mode": engine.decoder.mode,
              "replay_ms": replay_ms, "set_ms": set_ms, "forward_ms": forward_ms,
              "scheduler_itl_p50_ms": scheduler_itl_ms.get(True, scheduler_itl_ms[False]),
              "scheduler_itl_p50_ms_waiting": scheduler_itl_ms[False], "passes_ahead": passes_ahead,
              "device_ids": can_go_ahead, "one_conversation_ms": one_conversation_ms,
              "one_conversation_replay_ms": one_conversation_replay_ms,
              "logits_relative_error": error, "prompt_tokens": prompt_tokens, "paged_splits": paged_splits,
              "paged_stages": paged_stages}  # fmt: skip
    if kernels_table is not None:
        result["kernels"] = kernels_table
    click.echo(json.dumps(result, indent=1))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
