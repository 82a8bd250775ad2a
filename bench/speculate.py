"""Speculative decoding, measured: tokens per target pass on a real model pair, and what a pass costs on the GPU.

Two commands (``python -m bench.speculate COMMAND --help``):

* ``pair``: a target and a draft model (spillover-int4 directories; same tokenizer) on this machine's device, in
  one process, both held resident (``compute.draft_model.ResidentWeights``: no loader, so the numbers are the
  algorithm's and the kernels', not the ring's). For each built-in coding prompt (chat template applied) it runs
  greedy decode without speculation, with the draft model (a tree of at most ``--draft-tokens`` nodes) and, with
  ``--ngram``, with prompt lookup; it reports tokens per target pass, accepted drafts per pass, the draft's share
  of the time, decode tok/s, and whether each text is the one without speculation. ``--dequantize-once`` (CPU)
  keeps a bf16 copy of every weight instead of dequantizing at each call: the same values and the same
  ``F.linear`` as the CPU path (``compute.kernels.reference_int4_matmul``), so the same tokens, far sooner: for
  measuring tokens per pass, which does not depend on the kernels' speed (its tok/s are not spillover's).
* ``passes``: the cost of one target pass against the number of rows it checks (1 … 512, a random draft tree of
  that size under the tree mask), on a model served by a real loader process under each ``--gpu-memory`` budget
  (the synthetic 32B by default), the one-token decode step beside it, and the draft model's time to grow a tree
  of each size. Random weights make acceptance meaningless, so with ``--tokens-per-pass`` (the ``pair`` result's
  JSON) it reports the PROJECTED tok/s = measured tokens per pass on the real pair / (pass + draft seconds)
  measured here, labelled as a projection. Needs CUDA; ``bench/run_gpu_speculate.sh`` runs it in one command.

Both write one JSON object (``--json``) and a table on stdout.
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import click
import torch

PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "Explain what a Python list comprehension is and give two short examples.",
    "Write a bash one-liner that counts the lines of every .py file under the current directory.",
    "Write a C function that reverses a null-terminated string in place.",
)
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_TREES = (16, 32, 64, 128, 256)


def _engine(qdir: Path, device: str, max_context: int, drafter=None, draft_tokens: int | None = None):
    from compute.draft_model import ResidentWeights
    from compute.engine import Engine
    from quantizer.checkpoint import QuantizedCheckpoint

    checkpoint = QuantizedCheckpoint(qdir)
    weights = ResidentWeights(checkpoint, device, cpu_kernel_form=device == "cpu")
    return Engine(checkpoint, weights, device=device, max_context=max_context, drafter=drafter,
                  draft_tokens=draft_tokens)  # fmt: skip


def _decode_record(label: str, result, text: str, baseline_text: str | None) -> dict:
    spec = result.speculation
    return {
        "mode": label,
        "decode_tokens": result.decode_tokens,
        "decode_seconds": result.decode_seconds,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "target_passes": result.decode_passes,
        "tokens_per_pass": result.decode_tokens / result.decode_passes if result.decode_passes else 0.0,
        "speculation": spec.as_dict() if spec is not None else None,
        "same_text_as_plain": None if baseline_text is None else text == baseline_text,
        "text": text,
    }


@click.group()
def main() -> None:
    """Speculative decoding benchmarks."""


@main.command()
@click.option("--target", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--draft", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=2), default=48, show_default=True)
@click.option("--draft-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--prompts", "prompt_count", type=click.IntRange(1, len(PROMPTS)), default=len(PROMPTS), show_default=True)
@click.option("--ngram", is_flag=True, help="Also run prompt-lookup drafting.")
@click.option("--dequantize-once", is_flag=True, help="CPU: bf16 weights made once (same tokens, faster; see above).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def pair(target: Path, draft: Path, device: str, max_new_tokens: int, draft_tokens: int, prompt_count: int,
         ngram: bool, dequantize_once: bool, json_path: Path | None) -> None:  # fmt: skip
    """Tokens per target pass and decode tok/s on a real target/draft pair, with and without speculation."""
    if dequantize_once:
        _dequantize_once()
    from compute.chat import Conversation
    from compute.draft_model import DraftModel, check_same_tokenizer
    from compute.sampling import SamplingParams
    from compute.speculation import NgramDrafter

    max_context = 1024
    target_engine = _engine(target, device, max_context)
    draft_engine = _engine(draft, device, max_context)
    check_same_tokenizer(target_engine.tokenizer, draft_engine.tokenizer, str(draft))
    drafter = DraftModel(draft_engine, vocab_size=target_engine.vocab_size)
    greedy = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    tokenizer = target_engine.tokenizer
    runs = []
    for prompt in PROMPTS[:prompt_count]:
        ids = Conversation(tokenizer, raw=False).prompt_ids(prompt)
        record = {"prompt": prompt, "prompt_tokens": len(ids), "modes": []}
        modes = [("plain", None, None), ("draft-model", drafter, draft_tokens)]
        if ngram:
            modes.append(("ngram", NgramDrafter(), None))
        baseline = None
        for label, mode_drafter, tokens in modes:
            target_engine.drafter, target_engine.draft_tokens = mode_drafter, tokens
            target_engine.reset()
            result = target_engine.generate(ids, greedy)
            text = tokenizer.decode(result.token_ids)
            record["modes"].append(_decode_record(label, result, text, baseline))
            baseline = baseline if baseline is not None else text
            click.echo(f"{label:12s} {result.decode_tokens} tok, {result.decode_tokens_per_s:.2f} tok/s, "
                       f"{record['modes'][-1]['tokens_per_pass']:.2f} tok/pass", err=True)  # fmt: skip
        runs.append(record)
        if json_path is not None:
            _write(json_path, {"command": "pair", "target": str(target), "draft": str(draft), "device": device,
                               "dequantize_once": dequantize_once,
                               "draft_tokens": draft_tokens, "max_new_tokens": max_new_tokens, "runs": runs})  # fmt: skip
    click.echo(format_pair(runs))


def _dequantize_once() -> None:
    """Make ``Int4Linear`` multiply by a bf16 weight dequantized at its first use (resident weights keep their
    addresses, so the address keys it) rather than at every call: ``reference_int4_matmul`` with the dequantization
    hoisted out."""
    import torch.nn.functional as F

    import compute.int4_linear
    from quantizer.format import dequantize

    weights: dict[tuple[int, int], torch.Tensor] = {}

    def int4_matmul(x, qweight, scales, bias=None):
        key = (qweight.data_ptr(), scales.data_ptr())
        if key not in weights:
            weights[key] = dequantize(qweight, scales, dtype=x.dtype)
        return F.linear(x, weights[key], None if bias is None else bias.to(x.dtype))

    compute.int4_linear.int4_matmul = int4_matmul


def format_pair(runs: list[dict]) -> str:
    lines = ["| prompt | mode | decode tok | target passes | tok/pass | accepted/pass | draft share | tok/s | same text |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    totals: dict[str, list[float]] = {}
    for index, run in enumerate(runs):
        for m in run["modes"]:
            spec = m["speculation"] or {}
            lines.append(
                f"| {index} | {m['mode']} | {m['decode_tokens']} | {m['target_passes']} | {m['tokens_per_pass']:.2f} "
                f"| {spec.get('accepted_per_pass', 0):.2f} | {100 * spec.get('draft_time_share', 0):.0f}% "
                f"| {m['decode_tokens_per_s']:.2f} | {m['same_text_as_plain']} |"
            )
            total = totals.setdefault(m["mode"], [0, 0, 0.0])
            total[0] += m["decode_tokens"]
            total[1] += m["target_passes"]
            total[2] += m["decode_seconds"]
    for mode, (tokens, passes, seconds) in totals.items():
        lines.append(f"| all | {mode} | {tokens} | {passes} | {tokens / max(passes, 1):.2f} | | | "
                     f"{tokens / max(seconds, 1e-9):.2f} | |")  # fmt: skip
    return "\n".join(lines)


def _write(path: Path, record: dict) -> None:
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
              "torch": torch.__version__, **record}  # fmt: skip
    path.write_text(json.dumps(record, indent=1) + "\n")


def _random_tree(nodes: int, rng: random.Random, vocab: int):
    """A random tree of ``nodes`` nodes, shaped like a drafted one: mostly deep, some branching."""
    from compute.speculate.tree import ROOT, DraftTree

    parents = [ROOT if i == 0 else rng.choice([i - 1, i - 1, i - 1, rng.randrange(-1, i)]) for i in range(nodes)]
    return DraftTree(tuple(rng.randrange(vocab) for _ in range(nodes)), tuple(parents), (0.0,) * nodes)


def measure_passes(model_dir: Path, draft_dir: Path | None, budget: str, *, policy: str, max_context: int,
                   context: int, rows: tuple[int, ...], trees: tuple[int, ...], repeats: int) -> dict:  # fmt: skip
    """One budget, in this process: a loader process, the target engine on its plan, the draft resident here."""
    from compute.draft_model import DraftModel, ResidentWeights
    from compute.engine import Engine
    from compute.launch import LaunchedLoader
    from protocol.launch import LoaderCommand
    from protocol.sizes import parse_size
    from compute.speculation import verify
    from protocol.client import LoaderClient
    from quantizer.checkpoint import QuantizedCheckpoint

    options = LoaderCommand(model=model_dir, gpu_memory=parse_size(budget), policy=policy, device="cuda",
                            max_context=max_context, draft_model=draft_dir)  # fmt: skip
    rng = random.Random(0)
    with LaunchedLoader.start(options) as loader:
        client = LoaderClient.connect(loader.address, timeout_s=60)
        try:
            plan = client.plan
            engine = Engine(QuantizedCheckpoint(model_dir), client, device="cuda", max_context=plan.max_context,
                            prefill_chunk=plan.prefill_chunk)  # fmt: skip
            engine.eos_token_ids = frozenset()
            vocab = min(engine.vocab_size, 4000)
            prompt = [rng.randrange(vocab) for _ in range(context)]
            from compute.sampling import SamplingParams

            engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=33))  # prefill, warm-up, graphs
            decode = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=65))
            record = {"budget": budget, "policy": plan.policy, "decode_mode": engine.decode_mode,
                      "resident_units": sum(u.pool_offset is not None for u in plan.units),
                      "streamed_units": len(plan.ring.order), "lines": [[l.what, l.nbytes] for l in plan.lines],
                      "one_token_decode_tokens_per_s": decode.decode_tokens_per_s, "pass_seconds": {}}  # fmt: skip
            engine.reset()
            engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=1))  # the cache holds the prompt
            prefix = len(engine._cached_ids)
            for k in rows:
                tree = _random_tree(k - 1, rng, vocab)
                times = []
                for _ in range(repeats + 1):  # the first: warm-up (new shapes)
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    verify(engine, rng.randrange(vocab), tree, prefix).float().argmax(-1).cpu()
                    times.append(time.perf_counter() - started)
                    engine._rewind_cache(prefix)
                record["pass_seconds"][k] = min(times[1:])
                click.echo(f"{budget}: pass of {k} rows {1e3 * record['pass_seconds'][k]:.1f} ms", err=True)
            if draft_dir is not None:
                draft_checkpoint = QuantizedCheckpoint(draft_dir)
                draft_engine = Engine(draft_checkpoint, ResidentWeights(draft_checkpoint, "cuda"), device="cuda",
                                      max_context=plan.max_context, cuda_graphs=False)  # fmt: skip
                drafter = DraftModel(draft_engine, vocab_size=engine.vocab_size)
                record["draft_seconds"] = {}
                context_ids = list(prompt)
                for size in trees:
                    times = []
                    for _ in range(repeats + 1):
                        context_ids.append(rng.randrange(vocab))  # a new token each time, as after a pass
                        torch.cuda.synchronize()
                        started = time.perf_counter()
                        drafter.propose(context_ids, size)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - started)
                    record["draft_seconds"][size] = min(times[1:])
                    click.echo(f"{budget}: draft tree of {size} {1e3 * record['draft_seconds'][size]:.1f} ms", err=True)
        finally:
            client.close()
    return record


def _in_fresh_process(*args, **kwargs) -> dict:
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_passes, *args, **kwargs).result()


def project(record: dict, tokens_per_pass: dict[int, float]) -> dict[int, float]:
    """PROJECTED tok/s per tree size: tokens per pass measured on the real pair / (pass + draft seconds here)."""
    projected = {}
    for size, tokens in tokens_per_pass.items():
        rows = size + 1
        if rows in record["pass_seconds"]:
            seconds = record["pass_seconds"][rows] + record.get("draft_seconds", {}).get(size, 0.0)
            projected[size] = tokens / seconds
    return projected


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=Path("/tmp/spillover-synth-qwen2-32b"),
              show_default=True, help="Target; `spillover synth --preset qwen2-32b` writes it when missing.")
@click.option("--draft-checkpoint", type=click.Path(path_type=Path), default=Path("/tmp/spillover-synth-qwen2-0.5b"),
              show_default=True, help="Draft; `spillover synth --preset qwen2-0.5b` writes it when missing.")
@click.option("--gpu-memory", "budgets", multiple=True, default=("24GiB", "12GiB", "8GiB"), show_default=True)
@click.option("--policy", default="hybrid", show_default=True)
@click.option("--max-context", type=click.IntRange(min=1024), default=4096, show_default=True)
@click.option("--context", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens before the passes.")
@click.option("--rows", default=",".join(map(str, DEFAULT_ROWS)), show_default=True, help="Rows per pass to time.")
@click.option("--trees", default=",".join(map(str, DEFAULT_TREES)), show_default=True, help="Draft tree sizes to time.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--tokens-per-pass", "pair_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A `pair` JSON: its draft-model tokens per pass (at its --draft-tokens) makes the projection.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def passes(checkpoint: Path, draft_checkpoint: Path, budgets: tuple[str, ...], policy: str, max_context: int,
           context: int, rows: str, trees: str, repeats: int, pair_json: Path | None, json_path: Path | None) -> None:  # fmt: skip
    """Target pass cost against rows checked, draft cost per tree, under each budget (GPU)."""
    if not torch.cuda.is_available():
        raise click.ClickException("bench.speculate passes measures GPU passes and needs a CUDA device")
    from quantizer.synth import synthesize

    for path, preset in ((checkpoint, "qwen2-32b"), (draft_checkpoint, "qwen2-0.5b")):
        if not (path / "spillover.json").is_file():
            click.echo(f"writing a synthetic {preset} checkpoint to {path} ...", err=True)
            synthesize(path, preset=preset, device="auto")
    row_counts = tuple(int(r) for r in rows.split(","))
    tree_sizes = tuple(int(t) for t in trees.split(","))
    measured_tpp = {}
    if pair_json is not None:
        pair_record = json.loads(pair_json.read_text())
        modes = [m for run in pair_record["runs"] for m in run["modes"] if m["mode"] == "draft-model"]
        tokens = sum(m["decode_tokens"] for m in modes)
        measured_tpp[pair_record["draft_tokens"]] = tokens / max(sum(m["target_passes"] for m in modes), 1)
    results = []
    for budget in budgets:
        record = _in_fresh_process(checkpoint, draft_checkpoint, budget, policy=policy, max_context=max_context,
                                   context=context, rows=row_counts, trees=tree_sizes, repeats=repeats)  # fmt: skip
        record["projected_tokens_per_s"] = project(record, measured_tpp) if measured_tpp else None
        results.append(record)
        if json_path is not None:
            _write(json_path, {"command": "passes", "gpu": torch.cuda.get_device_name(), "checkpoint": str(checkpoint),
                               "draft_checkpoint": str(draft_checkpoint), "tokens_per_pass_measured": measured_tpp,
                               "results": results})  # fmt: skip
    click.echo(format_passes(results, measured_tpp))


def format_passes(results: list[dict], measured_tpp: dict[int, float]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['budget']} ({r['resident_units']} resident / {r['streamed_units']} streamed units): "
                     f"one-token decode {r['one_token_decode_tokens_per_s']:.1f} tok/s ({r['decode_mode']})")  # fmt: skip
        lines.append("| rows | pass ms | draft tree ms |")
        lines.append("|---|---|---|")
        for k, seconds in r["pass_seconds"].items():
            draft = r.get("draft_seconds", {}).get(k - 1) or r.get("draft_seconds", {}).get(k)
            lines.append(f"| {k} | {1e3 * seconds:.1f} | {'' if draft is None else f'{1e3 * draft:.1f}'} |")
        for size, rate in (r.get("projected_tokens_per_s") or {}).items():
            lines.append(f"PROJECTED (tokens/pass {measured_tpp[size]:.2f} measured on the real pair on CPU, "
                         f"tree {size}): {rate:.1f} tok/s vs one-token decode {r['one_token_decode_tokens_per_s']:.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
