"""``spillover bench --concurrency 1,4,16,64``: many requests at once, through the scheduler, under one budget.

For a budget, ``run_concurrency`` starts a real loader planned for ``--max-batch`` sequences and a paged KV pool
(``compute.launch``), builds ``compute.batch_engine.BatchEngine`` on its plan and a ``compute.scheduler.Scheduler``
over it (the API the HTTP server drives), and for each concurrency level N submits N requests at once (random
prompts of ``prompt_tokens``, greedy, ``new_tokens`` each, EOS ignored so that every reply has the same length)
and waits for all of them. It records, from the events' arrival times in the engine thread:

* aggregate decode tokens/s: the tokens after each request's first, over the time from the first request's
  first token to the last token (prefill is in TTFT; where requests arrive one after another, as over HTTP, the
  first one's first token comes a prefill pass before the others' and the span holds that pass too), the tokens
  that arrived while all N requests were streaming over that window (the steady state of N streams: from the last
  first token to the first last token; none when the level queues requests past ``--max-batch``), and the whole
  run's completion tokens over its wall time;
* time to first token (submit -> first TokenEvent) and inter-token latency (gaps between a request's
  consecutive tokens), p50 and p99 over every request and gap;
* forward passes and tokens per pass (the scheduler's counters), and the peak device memory of each process
  (NVML, ``compute.usage.PeakMemorySampler``) against the budget.

Requests beyond ``--max-batch`` wait in the scheduler's queue: their wait is part of their TTFT. Warm-up levels
of 1, 2, 4, ... ``max_batch`` short requests run first: kernels compile and CUDA graphs are captured outside the
timing.
It runs on CPU as well (tests drive it on a tiny model); ``spillover bench`` runs it on CUDA.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

WAIT_S = 1800.0  # the longest a level may take before the benchmark gives up on it


@dataclasses.dataclass(frozen=True, kw_only=True)
class LevelResult:
    concurrency: int  # requests submitted at once
    prompt_tokens: int  # per request
    new_tokens: int  # per request
    wall_s: float  # first submit -> last token
    decode_tokens_per_s: float  # tokens after each request's first / (first first token -> last token)
    all_streaming_tokens_per_s: float  # tokens while all stream / (last first token -> first last token); nan if none
    total_tokens_per_s: float  # every completion token / wall_s
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    passes: int  # forward passes the level took
    tokens_per_pass: float  # completion and prompt tokens fed per pass, on average
    passes_ahead: int = 0  # of those passes, how many were launched before the tokens of the pass before them were read

    @classmethod
    def measure(
        cls, requests: Sequence[tuple[float, Sequence[float], int]], *, prompt_tokens: int, new_tokens: int,
        started: float, passes: int, passes_ahead: int = 0,
    ) -> LevelResult:  # fmt: skip
        """A level's figures from each request's (sent at, arrival time of each token, completion tokens), the
        level's start and the forward passes it took (every time from ``time.perf_counter``)."""
        concurrency = len(requests)
        timed = [(sent, arrivals) for sent, arrivals, _ in requests if arrivals]
        firsts = [arrivals[0] for _, arrivals in timed]
        last = max((arrivals[-1] for _, arrivals in timed), default=started)
        gaps = [b - a for _, arrivals in timed for a, b in zip(arrivals, arrivals[1:])]
        ttfts = [arrivals[0] - sent for sent, arrivals in timed]
        completion = sum(tokens for _, _, tokens in requests)
        steady = last - min(firsts) if firsts else 0.0
        # while every request streams: after the last one's first token, up to the first one's last
        together_from = max(firsts, default=0.0)
        together_to = min((arrivals[-1] for _, arrivals in timed), default=0.0)
        together = sum(together_from < t <= together_to for _, arrivals in timed for t in arrivals)
        return cls(
            concurrency=concurrency,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            wall_s=last - started,
            decode_tokens_per_s=(completion - concurrency) / steady if steady > 0 else float("nan"),
            all_streaming_tokens_per_s=(
                together / (together_to - together_from)
                if len(timed) == concurrency and together_to > together_from and together
                else float("nan")
            ),
            total_tokens_per_s=completion / (last - started) if last > started else float("nan"),
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            itl_p50_s=percentile(gaps, 50),
            itl_p99_s=percentile(gaps, 99),
            passes=passes,
            tokens_per_pass=(completion + concurrency * prompt_tokens - concurrency) / max(passes, 1),
            passes_ahead=passes_ahead,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConcurrencyResult:
    budget: str  # --gpu-memory as given
    budget_bytes: int
    policy: str
    resident_units: int
    streamed_units: int
    max_batch: int
    kv_tokens: int
    pass_tokens: int | None  # tokens a pass carried at most (the scheduler's; -1 where not reported)
    device: str
    decode_mode: str  # BatchEngine.decoder.mode after the levels: "graphs (buckets ...)" or "eager: <why>"
    levels: list[LevelResult]
    peak_device_bytes: dict  # role -> bytes (NVML; None where it cannot be measured), and "total"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def measure_level(
    scheduler, *, concurrency: int, prompt_tokens: int, new_tokens: int, rng: random.Random
) -> LevelResult:
    """Submit ``concurrency`` requests at once and time their events until all have ended."""
    from compute.sampling import SamplingParams
    from compute.scheduler import FinishEvent, GenerationRequest, TokenEvent

    vocab = scheduler.engine.vocab_size
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    arrivals: dict[int, list[float]] = {}
    ended: dict[int, object] = {}
    done = threading.Condition()

    def on_event(event) -> None:  # the engine thread
        now = time.perf_counter()
        with done:
            if isinstance(event, TokenEvent):
                arrivals.setdefault(event.request_id, []).append(now)
            else:
                ended[event.request_id] = event
                done.notify_all()

    before = scheduler.stats()
    prompts = [tuple(rng.randrange(vocab) for _ in range(prompt_tokens)) for _ in range(concurrency)]
    started = time.perf_counter()
    ids = [scheduler.submit(GenerationRequest(prompt_ids=p, params=params), on_event) for p in prompts]
    with done:
        if not done.wait_for(lambda: len(ended) == concurrency, timeout=WAIT_S):
            raise TimeoutError(f"{concurrency} requests did not end within {WAIT_S:.0f} s")
    failed = [event for event in ended.values() if not isinstance(event, FinishEvent)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {concurrency} requests failed: {failed[0]}")
    after = scheduler.stats()
    timed = [(started, arrivals.get(i, []), len(arrivals.get(i, []))) for i in ids]
    return LevelResult.measure(timed, prompt_tokens=prompt_tokens, new_tokens=new_tokens, started=started,
                               passes=after.passes - before.passes,
                               passes_ahead=after.passes_ahead - before.passes_ahead)  # fmt: skip


def run_concurrency(
    model_dir: Path, budget: str, *, levels: list[int], policy: str = "hybrid", max_batch: int = 16,
    kv_tokens: int | None = None, max_context: int = 4096, prompt_tokens: int = 128, new_tokens: int = 128,
    device: str = "cuda", seed: int = 0, kernels=None, max_pass_tokens: int | None = None,
) -> ConcurrencyResult:  # fmt: skip
    """Every level under one loader and one engine; see the module docstring. ``kernels``: a
    ``compute.config.KernelOptions`` to apply first (None: the kernels' defaults)."""
    from compute.batch_engine import BatchEngine
    from compute.launch import LaunchedLoader
    from compute.scheduler import Scheduler
    from compute.usage import PeakMemorySampler
    from protocol.client import LoaderClient
    from protocol.launch import LoaderCommand
    from protocol.sizes import parse_size
    from quantizer.checkpoint import QuantizedCheckpoint

    if kernels is not None:
        kernels.apply()
    if kv_tokens is None:  # room for a full batch of these requests, and for one whole context
        kv_tokens = max(max_context, max_batch * (prompt_tokens + new_tokens))
    options = LoaderCommand(
        model=model_dir, gpu_memory=parse_size(budget), policy=policy, device=device, max_context=max_context,
        max_batch=max_batch, kv_tokens=kv_tokens,
    )  # fmt: skip
    rng = random.Random(seed)
    with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=120) as client:
        engine = BatchEngine.for_plan(QuantizedCheckpoint(model_dir), client, device=device)
        engine.eos_token_ids = frozenset()  # random weights: EOS would end replies at random lengths
        scheduler = Scheduler(engine, max_batch=max_batch, max_waiting=max(levels) + max_batch,
                              max_pass_tokens=max_pass_tokens)  # fmt: skip
        pass_tokens = scheduler.stats().pass_tokens
        scheduler.start()
        try:
            for n in sorted({min(b, max_batch) for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch}):
                # every bucket of rows once: kernels compile and CUDA graphs are captured outside the timing
                measure_level(scheduler, concurrency=n, prompt_tokens=prompt_tokens, new_tokens=3, rng=rng)
            with PeakMemorySampler({"compute": os.getpid(), "loader": loader.pid}, device=device) as memory:
                results = [
                    measure_level(scheduler, concurrency=n, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rng=rng)
                    for n in levels
                ]
        finally:
            scheduler.close(drain=False)
        plan = client.plan
        decode_mode = engine.decoder.mode
    return ConcurrencyResult(
        budget=budget,
        budget_bytes=parse_size(budget),
        policy=plan.policy,
        resident_units=sum(u.pool_offset is not None for u in plan.units),
        streamed_units=sum(u.pool_offset is None for u in plan.units),
        max_batch=plan.max_batch,
        kv_tokens=plan.kv_tokens,
        pass_tokens=pass_tokens,
        device=device,
        decode_mode=decode_mode,
        levels=results,
        peak_device_bytes=memory.report()["peak_device_memory_bytes"],
    )


def format_concurrency_table(results: list[ConcurrencyResult], baseline: dict[str, float] | None = None) -> str:
    """One row per budget and level; ``baseline`` (budget -> one request's decode tok/s under ``spillover run``'s
    engine) adds the speed-up of the aggregate over it."""
    gib = 2**30
    lines = [
        "| budget | policy | resident/streamed | max batch | KV tokens | pass tokens | concurrency | decode tok/s "
        "| x one request | all streaming tok/s (x) | total tok/s | TTFT p50/p99 s | ITL p50/p99 ms | tokens/pass "
        "| passes ahead | decode | peak loader+compute GiB (budget) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = r.peak_device_bytes
        peak_text = (
            f"{(peak.get('loader') or 0) / gib:.2f} + {(peak.get('compute') or 0) / gib:.2f} = "
            f"{(peak.get('total') or 0) / gib:.2f} ({r.budget_bytes / gib:.0f})"
        )
        alone = next((lv.decode_tokens_per_s for lv in r.levels if lv.concurrency == 1), None)
        one = (baseline or {}).get(r.budget) or alone
        for lv in r.levels:
            speedup = f"{lv.decode_tokens_per_s / one:.1f}" if one else "-"
            streaming = lv.all_streaming_tokens_per_s
            together = "-" if streaming != streaming else f"{streaming:.1f}" + (f" ({streaming / one:.1f})" if one else "")
            lines.append(
                f"| {r.budget} | {r.policy} | {r.resident_units}/{r.streamed_units} | {r.max_batch} | {r.kv_tokens} "
                f"| {r.pass_tokens} | {lv.concurrency} | {lv.decode_tokens_per_s:.1f} | {speedup} | {together} "
                f"| {lv.total_tokens_per_s:.1f} "
                f"| {lv.ttft_p50_s:.2f}/{lv.ttft_p99_s:.2f} | {1e3 * lv.itl_p50_s:.1f}/{1e3 * lv.itl_p99_s:.1f} "
                f"| {lv.tokens_per_pass:.1f} | {lv.passes_ahead}/{lv.passes} | {r.decode_mode} | {peak_text} |"
            )
    return "\n".join(lines)


def run_concurrency_in_a_fresh_process(model_dir: Path, budget: str, **kwargs) -> ConcurrencyResult:
    """``run_concurrency`` in a spawned process of its own (an empty CUDA context, as ``spillover serve`` has)."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_concurrency, model_dir, budget, **kwargs).result()


def parse_levels(text: str) -> list[int]:
    """``"1,4,16,64"`` -> [1, 4, 16, 64]; ValueError naming the bad piece."""
    levels = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece.isdigit() or int(piece) < 1:
            raise ValueError(f"--concurrency {text!r}: {piece!r} is not a whole number of requests >= 1")
        levels.append(int(piece))
    return levels

