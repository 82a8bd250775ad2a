"""``spillover bench``: the whole two-process pipeline on a synthetic 32B-shaped checkpoint, beside its ceilings.

For each ``--gpu-memory`` budget it starts, in a fresh process of its own (so that nothing an earlier budget
left in the CUDA caching allocator, graph pools or library workspaces counts against a later one), a real loader
process (``compute.launch``), connects that process as the compute side (``protocol.client.LoaderClient`` +
``compute.engine.Engine``) and measures, in one run:

* start to ready: loader launch -> loader ready (arena read and pinned, pool filled) -> engine built;
* prefill tokens/s for a ``--prefill-tokens`` prompt (default 2048);
* decode tokens/s over ``--decode-tokens`` (>= 64) tokens after a warm-up, context <= 1024;
* bytes streamed host -> device per decoded token (the loader's counters);
* peak device memory of each process and their sum (NVML per process, allocator caches and contexts included);
* with ``--draft-model`` (the draft held resident, reserved in the budget) or ``--speculate ngram`` (prompt
  lookup), the same decode again with speculation: its ``compute.speculation.SpeculationStats`` (tokens per
  target pass, the draft's share of the time) and tok/s (random weights: acceptance means nothing here;
  ``bench.speculate`` measures it on a real pair);

and the ceilings, measured by this run on this machine: pinned host -> device GB/s and device -> device GB/s.
Each decode figure is reported against its roofline, ``resident_bytes / device_bw + streamed_bytes / h2d_bw``
per token, where resident bytes are the resident units plus the bf16 tied lm_head when there is one.

The model has random weights, so the text is noise; EOS is ignored so that every run decodes the same number of
tokens. Results go to a table on stdout and to ``--json``. With ``--concurrency 1,4,16,64`` each budget also
serves that many requests at once through the scheduler and the multi-sequence engine (``bench.concurrency``),
in a fresh process of its own, or with ``--http`` through an HTTP client against ``spillover serve``
(``bench.http_concurrency``); ``--no-baseline`` skips the one-conversation run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import random
import time
from pathlib import Path

import click
import torch

from compute.config import KernelOptions, kernel_options
from compute.run import SPECULATE_OPTION, check_speculation
from protocol.defaults import DEFAULT_POLICY, POLICY_NAMES
from protocol.sizes import parse_size

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = ("24GiB", "12GiB", "8GiB")
DEFAULT_CHECKPOINT = Path.home() / ".cache" / "spillover" / "synth-qwen2-32b"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ceilings:
    h2d_gbps: float  # pinned host -> device copy, GB/s (1e9 bytes)
    d2d_gbps: float  # device -> device copy, bytes read + written per second, GB/s


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetResult:
    budget: str  # --gpu-memory as given
    policy: str
    resident_units: int
    streamed_units: int
    ring_slots: int
    loader_ready_s: float  # launch -> loader ready
    engine_ready_s: float  # launch -> engine built (the whole start to ready)
    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_context: int  # tokens in the KV cache at the end of the decode run
    decode_tokens_per_s: float
    decode_mode: str  # Engine.decode_mode: "graph", "piecewise (...)" or "eager: <why>"
    resident_bytes_per_token: int  # weight bytes read from device memory per token
    streamed_bytes_per_token: float  # bytes copied host -> device per token, measured
    roofline_tokens_per_s: float
    fraction_of_roofline: float
    compute_wait_s_per_token: float  # host time compute waited for the loader to enqueue a fill, per token (a device-side wait on a copy in flight is not seen)
    peak_device_bytes: dict  # role -> bytes (NVML), and "total"
    compute_reserved_peak_bytes: int  # the compute process's CUDA caching allocator at its peak (part of its NVML)
    speculative: dict | None = None  # with --draft-model or --speculate: decode tok/s and its SpeculationStats


def measure_ceilings(nbytes: int = 1 << 30, repeats: int = 5) -> Ceilings:
    """Pinned H2D and D2D copy bandwidth, best of ``repeats`` (CUDA events)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device_a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device_b = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def best_seconds(copy) -> float:
        copy()  # warm-up
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    h2d = nbytes / best_seconds(lambda: device_a.copy_(host, non_blocking=True)) / 1e9
    d2d = 2 * nbytes / best_seconds(lambda: device_b.copy_(device_a)) / 1e9
    del host, device_a, device_b
    torch.cuda.empty_cache()
    return Ceilings(h2d_gbps=h2d, d2d_gbps=d2d)


def run_budget(model_dir: Path, budget: str, *, policy: str, max_context: int, prefill_tokens: int,
               decode_tokens: int, ceilings: Ceilings, kernels: KernelOptions,
               draft_model: Path | None = None, speculate: str | None = None) -> BudgetResult:  # fmt: skip
    from compute.engine import Engine
    from compute.launch import LaunchedLoader
    from protocol.launch import LoaderCommand
    from compute.sampling import SamplingParams
    from compute.usage import PeakMemorySampler
    from protocol.client import LoaderClient
    from quantizer.checkpoint import QuantizedCheckpoint

    kernels.apply()
    options = LoaderCommand(model=model_dir, gpu_memory=parse_size(budget), policy=policy, device="cuda",
                            max_context=max_context, draft_model=draft_model)  # fmt: skip
    started = time.perf_counter()
    with LaunchedLoader.start(options) as loader:
        loader_ready_s = time.perf_counter() - started
        client = LoaderClient.connect(loader.address, timeout_s=60)
        try:
            checkpoint = QuantizedCheckpoint(model_dir)
            engine = Engine(checkpoint, client, device="cuda", max_context=client.plan.max_context,
                            prefill_chunk=client.plan.prefill_chunk)  # fmt: skip
            torch.cuda.synchronize()
            engine_ready_s = time.perf_counter() - started
            # Random weights: EOS would end a run at a random length; the benchmark wants a fixed one.
            engine.eos_token_ids = frozenset()
            rng = random.Random(0)
            vocab = engine.vocab_size
            greedy = SamplingParams(temperature=0.0, max_new_tokens=1)

            with PeakMemorySampler({"compute": os.getpid(), "loader": loader.pid}, device="cuda") as memory:
                engine.reset()
                engine.generate([rng.randrange(vocab) for _ in range(64)], dataclasses.replace(greedy, max_new_tokens=8))
                engine.reset()
                prefill = engine.generate([rng.randrange(vocab) for _ in range(prefill_tokens)], greedy)

                engine.reset()
                prompt = [rng.randrange(vocab) for _ in range(64)]
                engine.generate(prompt, dataclasses.replace(greedy, max_new_tokens=16))  # warm-up
                engine.reset()
                before = _totals(client)
                decode = engine.generate(prompt, dataclasses.replace(greedy, max_new_tokens=decode_tokens + 1))
                after = _totals(client)
                decode_mode = engine.decode_mode
                speculative = None
                if draft_model is not None or speculate is not None:
                    speculative = _speculative_decode(engine, draft_model, prompt, greedy, decode_tokens)
        finally:
            client.close()

    plan = client.plan
    resident = [u for u in plan.units if u.pool_offset is not None]
    streamed = [u for u in plan.units if u.pool_offset is None]
    resident_bytes = sum(u.nbytes for u in resident)
    if checkpoint.config.get("tie_word_embeddings"):
        resident_bytes += checkpoint.config["vocab_size"] * checkpoint.config["hidden_size"] * 2
    # The decode run's passes: one prefill pass (64 tokens) and decode_tokens one-token passes.
    passes = decode.decode_tokens + 1
    streamed_per_token = (after[0] - before[0]) / passes
    wait_per_token = (after[1] - before[1]) / passes
    roofline_s = resident_bytes / (ceilings.d2d_gbps * 1e9) + streamed_per_token / (ceilings.h2d_gbps * 1e9)
    roofline = 1.0 / roofline_s
    return BudgetResult(
        budget=budget,
        policy=plan.policy,
        resident_units=len(resident),
        streamed_units=len(streamed),
        ring_slots=plan.ring.slots,
        loader_ready_s=loader_ready_s,
        engine_ready_s=engine_ready_s,
        prefill_tokens=prefill.prefill_tokens,
        prefill_tokens_per_s=prefill.prefill_tokens_per_s,
        decode_tokens=decode.decode_tokens,
        decode_context=len(prompt) + len(decode.token_ids),
        decode_tokens_per_s=decode.decode_tokens_per_s,
        decode_mode=decode_mode,
        resident_bytes_per_token=resident_bytes,
        streamed_bytes_per_token=streamed_per_token,
        roofline_tokens_per_s=roofline,
        fraction_of_roofline=decode.decode_tokens_per_s / roofline,
        compute_wait_s_per_token=wait_per_token,
        peak_device_bytes=memory.report()["peak_device_memory_bytes"],
        compute_reserved_peak_bytes=torch.cuda.max_memory_reserved(),
        speculative=speculative,
    )


def _speculative_decode(engine, draft_model: Path | None, prompt: list[int], greedy, decode_tokens: int) -> dict:
    """The decode run again, drafted by ``draft_model`` held resident in this process (in the shape ``spillover run``
    drafts on CUDA by default), or by prompt lookup (None)."""
    from compute.config import default_draft_shape
    from compute.draft_model import open_drafter
    from compute.speculation import NgramDrafter
    from quantizer.checkpoint import QuantizedCheckpoint

    if draft_model is None:
        engine.drafter = NgramDrafter()
    else:
        engine.drafter = open_drafter(QuantizedCheckpoint(draft_model), shape=default_draft_shape("cuda"),
                                      device="cuda", max_context=engine.max_context,
                                      vocab_size=engine.vocab_size)  # fmt: skip
    engine.reset()
    engine.generate(prompt, dataclasses.replace(greedy, max_new_tokens=16))  # warm-up
    engine.reset()
    result = engine.generate(prompt, dataclasses.replace(greedy, max_new_tokens=decode_tokens + 1))
    engine.drafter = None
    return {"decode_tokens_per_s": result.decode_tokens_per_s, **result.speculation.as_dict()}


def run_budget_in_a_fresh_process(model_dir: Path, budget: str, **kwargs) -> BudgetResult:
    """``run_budget`` in a spawned process of its own, as a compute process of the product runs: one process, one
    engine, from an empty CUDA context (spawned, not forked: CUDA does not survive a fork)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_budget, model_dir, budget, **kwargs).result()


def _totals(client) -> tuple[int, float]:
    """(bytes streamed, seconds compute waited) summed over policies, since the loader started."""
    stats = client.stats()
    return (sum(p.streamed_bytes for p in stats.policies), sum(p.compute_wait_seconds for p in stats.policies))


def format_table(ceilings: Ceilings, results: list[BudgetResult]) -> str:
    gib = 2**30
    lines = [
        f"ceilings: pinned host->device {ceilings.h2d_gbps:.1f} GB/s, device->device {ceilings.d2d_gbps:.0f} GB/s",
        "| budget | policy | resident/streamed units | ready s | prefill tok/s | decode tok/s | roofline tok/s "
        "| of roofline | decode mode | streamed GB/token | host wait ms/token | peak loader+compute GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = r.peak_device_bytes
        peak_text = (
            f"{(peak.get('loader') or 0) / gib:.2f} + {(peak.get('compute') or 0) / gib:.2f} = "
            f"{(peak.get('total') or 0) / gib:.2f}"
        )
        lines.append(
            f"| {r.budget} | {r.policy} | {r.resident_units}/{r.streamed_units} (K={r.ring_slots}) "
            f"| {r.engine_ready_s:.1f} | {r.prefill_tokens_per_s:.0f} | {r.decode_tokens_per_s:.1f} "
            f"| {r.roofline_tokens_per_s:.1f} | {100 * r.fraction_of_roofline:.0f}% | {r.decode_mode} "
            f"| {r.streamed_bytes_per_token / 1e9:.2f} | {1e3 * r.compute_wait_s_per_token:.1f} | {peak_text} |"
        )
    for r in results:
        if r.speculative is not None:
            spec = r.speculative
            lines.append(
                f"{r.budget} with {spec['drafter']} drafts (random weights: acceptance means nothing): "
                f"{spec['decode_tokens_per_s']:.1f} tok/s, {spec['tokens_per_pass']:.2f} tok/pass, "
                f"draft {100 * spec['draft_time_share']:.0f}% of the time"
            )
    return "\n".join(lines)


@click.command("bench")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=DEFAULT_CHECKPOINT, show_default=True,
              help="A spillover-int4 model; made with `spillover synth --preset qwen2-32b` when missing.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Depth of the synthetic model (default: 64).")
@click.option("--gpu-memory", "budgets", multiple=True, default=DEFAULT_BUDGETS, show_default=True,
              help="Budgets to run (repeat the option).")
@click.option("--policy", type=click.Choice(sorted(POLICY_NAMES)), default=DEFAULT_POLICY, show_default=True)
@click.option("--max-context", type=click.IntRange(min=256), default=4096, show_default=True)
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=64), default=128, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the results here.")
@click.option("--draft-model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also decode speculatively with this spillover-int4 draft (e.g. `spillover synth --preset qwen2-0.5b`).")
@SPECULATE_OPTION
@click.option("--concurrency", default=None,
              help="Also serve this many requests at once, e.g. 1,4,16,64 (bench.concurrency).")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences per pass (--concurrency).")
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None,
              help="Paged KV pool (--concurrency; default: a full batch of requests).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt per request (--concurrency).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Reply per request (--concurrency).")
@click.option("--max-pass-tokens", type=click.IntRange(min=2), default=None,
              help="Tokens a pass carries at most (--concurrency; default: the plan's prefill chunk).")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="With --concurrency, also run the one-conversation engine.")
@click.option("--http", is_flag=True,
              help="With --concurrency, measure with an HTTP client against `spillover serve` (bench.http_concurrency).")
@kernel_options
def bench(checkpoint: Path, layers: int | None, budgets: tuple[str, ...], policy: str, max_context: int,
          prefill_tokens: int, decode_tokens: int, json_path: Path | None, concurrency: str | None, max_batch: int,
          kv_tokens: int | None, prompt_tokens: int, new_tokens: int, max_pass_tokens: int | None, baseline: bool,
          http: bool,
          draft_model: Path | None, speculate: str | None,
          gemv_configs: Path | None, early_launch: bool) -> None:  # fmt: skip
    """Benchmark the two-process pipeline on a synthetic 32B-shaped model under each budget."""
    from bench.concurrency import format_concurrency_table, parse_levels, run_concurrency_in_a_fresh_process
    from bench.http_concurrency import run_http_concurrency

    try:
        levels = parse_levels(concurrency) if concurrency is not None else []
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--concurrency") from None
    check_speculation(speculate, draft_model)
    if not torch.cuda.is_available():
        raise click.ClickException("spillover bench measures the GPU pipeline and needs a CUDA device")
    if prefill_tokens + 1 > max_context:
        raise click.ClickException(f"--prefill-tokens {prefill_tokens} does not fit in --max-context {max_context}")
    if prompt_tokens + new_tokens > max_context:
        raise click.ClickException(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} do not fit in --max-context {max_context}"
        )
    for budget in budgets:
        try:
            parse_size(budget)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--gpu-memory") from None
    if not (checkpoint / "spillover.json").is_file():
        from quantizer.synth import synthesize

        click.echo(f"writing a synthetic qwen2-32b checkpoint to {checkpoint} ...", err=True)
        synthesize(checkpoint, preset="qwen2-32b", layers=layers, device="auto")
    from compute.launch import LoaderStartError

    ceilings = measure_ceilings()
    click.echo(f"ceilings: H2D {ceilings.h2d_gbps:.1f} GB/s, D2D {ceilings.d2d_gbps:.0f} GB/s", err=True)
    results, served = [], []
    for budget in budgets:
        click.echo(f"--gpu-memory {budget} ...", err=True)
        try:
            kernels = KernelOptions(gemv_configs=gemv_configs, early_launch=early_launch)
            if baseline or not levels:
                results.append(run_budget_in_a_fresh_process(
                    checkpoint, budget, policy=policy, max_context=max_context, prefill_tokens=prefill_tokens,
                    decode_tokens=decode_tokens, ceilings=ceilings, kernels=kernels, draft_model=draft_model,
                    speculate=speculate,
                ))  # fmt: skip
                click.echo(format_table(ceilings, results[-1:]).splitlines()[-1], err=True)
            if levels:
                options = {"levels": levels, "policy": policy, "max_batch": max_batch, "kv_tokens": kv_tokens,
                           "max_context": max_context, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                           "max_pass_tokens": max_pass_tokens}
                if http:  # the server is its own process: its kernels take their defaults
                    served.append(run_http_concurrency(checkpoint, budget, **options))
                else:
                    served.append(run_concurrency_in_a_fresh_process(checkpoint, budget, kernels=kernels, **options))
                click.echo("\n".join(format_concurrency_table(served[-1:]).splitlines()[2:]), err=True)
        except LoaderStartError as e:  # a budget too small, say: the loader's own message is on stderr above
            raise click.ClickException(f"--gpu-memory {budget}: {e}") from None
        if json_path is not None:  # after every budget, so a run cut short keeps what it measured
            _write_json(json_path, checkpoint, ceilings, results, served)
    if results:
        click.echo(format_table(ceilings, results))
    if served:
        one_request = {r.budget: r.decode_tokens_per_s for r in results}
        click.echo(format_concurrency_table(served, one_request))


def _write_json(path: Path, checkpoint: Path, ceilings: Ceilings, results: list[BudgetResult], served=()) -> None:
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "checkpoint": str(checkpoint),
        "ceilings": dataclasses.asdict(ceilings),
        "results": [dataclasses.asdict(r) for r in results],
        "concurrency": [dataclasses.asdict(r) for r in served],
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
