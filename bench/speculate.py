"""Speculative decoding, measured: tokens per target pass on a real model pair, and what a pass costs on the GPU.

Two commands (``python -m bench.speculate COMMAND --help``):

* ``pair``: a target and a draft model (spillover-int4 directories; same tokenizer) on this machine's device, in
  one process, both held resident (``compute.draft_model.ResidentWeights``: no loader, so the numbers are the
  algorithm's and the kernels', not the ring's). For each built-in coding prompt (chat template applied) it runs
  greedy decode without speculation, with the draft model for each ``--draft-shape`` (tree, chain) and each
  ``--draft-tokens`` (nodes per draft: a tree's size, a chain's length; every pass checks that many) and, with
  ``--ngram``, with prompt lookup; it reports tokens per target pass, accepted drafts per pass, the draft's share
  of the time, decode tok/s, and whether each text is the one without speculation. ``--dequantize-once`` (CPU)
  multiplies any Linear without a CPU kernel form by a bf16 weight dequantized once instead of at each call (the
  same values, the same ``F.linear``, so the same tokens): tokens per pass do not depend on the kernels' speed.
* ``passes``: the cost of one target pass against the number of rows it checks (a random draft tree of that size
  under the tree mask), on a model served by a real loader process under each ``--gpu-memory`` budget (the
  synthetic 32B by default), the one-token decode step beside it, the draft model's time to grow a tree of each
  size, and its time to draft a chain of each length (one decode step a token, replayed from CUDA graphs).
  Random weights make acceptance meaningless, so with ``--tokens-per-pass`` (the ``pair`` result's JSON) it also
  measures exactly the rows and draft sizes that result needs and reports, for each of its drafts, the PROJECTED
  tok/s = measured tokens per pass on the real pair / (pass + draft seconds measured here), labelled as a
  projection. Needs CUDA; ``bench/run_gpu_speculate.sh`` runs it in one command.

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

from compute.speculation import DRAFT_SHAPES

PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "Explain what a Python list comprehension is and give two short examples.",
    "Write a bash one-liner that counts the lines of every .py file under the current directory.",
    "Write a C function that reverses a null-terminated string in place.",
)
DEFAULT_ROWS = (1, 2, 4, 5, 8, 9, 16, 17, 33, 64, 129, 256)  # a chain of n checks n + 1 rows
DEFAULT_TREES = (16, 64, 128)
DEFAULT_CHAINS = (4, 8, 16, 32)


def _engine(qdir: Path, device: str, max_context: int):
    from compute.draft_model import ResidentWeights
    from compute.engine import Engine
    from quantizer.checkpoint import QuantizedCheckpoint

    checkpoint = QuantizedCheckpoint(qdir)
    weights = ResidentWeights(checkpoint, device, cpu_kernel_form=device == "cpu")
    return Engine(checkpoint, weights, device=device, max_context=max_context)


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


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


@main.command()
@click.option("--target", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--draft", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=2), default=48, show_default=True)
@click.option("--draft-shape", "shapes", type=click.Choice(DRAFT_SHAPES), multiple=True, default=("tree",),
              show_default=True, help="How the draft drafts; repeat for both.")
@click.option("--draft-tokens", default="128", show_default=True,
              help="Nodes per draft (a chain's length), comma-separated: each is a run.")
@click.option("--prompts", "prompt_count", type=click.IntRange(1, len(PROMPTS)), default=len(PROMPTS), show_default=True)
@click.option("--ngram", is_flag=True, help="Also run prompt-lookup drafting.")
@click.option("--dequantize-once", is_flag=True, help="CPU: bf16 weights made once (same tokens, faster; see above).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def pair(target: Path, draft: Path, device: str, max_new_tokens: int, shapes: tuple[str, ...], draft_tokens: str,
         prompt_count: int, ngram: bool, dequantize_once: bool, json_path: Path | None) -> None:  # fmt: skip
    """Tokens per target pass and decode tok/s on a real target/draft pair, with and without speculation."""
    if dequantize_once:
        _dequantize_once()
    from compute.chat import Conversation
    from compute.draft_model import check_same_tokenizer, open_drafter
    from compute.sampling import SamplingParams
    from compute.speculation import NgramDrafter
    from quantizer.checkpoint import QuantizedCheckpoint

    max_context = 1024
    sizes = _int_list(draft_tokens)
    target_engine = _engine(target, device, max_context)
    drafters = {shape: open_drafter(QuantizedCheckpoint(draft), shape=shape, device=device, max_context=max_context,
                                    vocab_size=target_engine.vocab_size, max_tokens=max(sizes))
                for shape in dict.fromkeys(shapes)}  # fmt: skip
    for drafter in drafters.values():
        check_same_tokenizer(target_engine.tokenizer, drafter.engine.tokenizer, str(draft))
    greedy = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    tokenizer = target_engine.tokenizer
    # (label, drafter, nodes per draft, shape)
    modes = [("plain", None, None, None)]
    modes += [(f"{shape}-{size}", drafter, size, shape) for shape, drafter in drafters.items() for size in sizes]
    if ngram:
        modes.append(("ngram", NgramDrafter(), None, None))
    runs = []
    for prompt in PROMPTS[:prompt_count]:
        ids = Conversation(tokenizer, raw=False).prompt_ids(prompt)
        record = {"prompt": prompt, "prompt_tokens": len(ids), "modes": []}
        baseline = None
        for label, mode_drafter, tokens, shape in modes:
            target_engine.drafter, target_engine.draft_tokens = mode_drafter, tokens
            target_engine.reset()
            result = target_engine.generate(ids, greedy)
            text = tokenizer.decode(result.token_ids)
            record["modes"].append({**_decode_record(label, result, text, baseline), "shape": shape,
                                    "draft_tokens": tokens})  # fmt: skip
            baseline = baseline if baseline is not None else text
            click.echo(f"{label:12s} {result.decode_tokens} tok, {result.decode_tokens_per_s:.2f} tok/s, "
                       f"{record['modes'][-1]['tokens_per_pass']:.2f} tok/pass", err=True)  # fmt: skip
        runs.append(record)
        if json_path is not None:
            _write(json_path, {"command": "pair", "target": str(target), "draft": str(draft), "device": device,
                               "dequantize_once": dequantize_once, "draft_shapes": list(drafters),
                               "draft_tokens": list(sizes), "max_new_tokens": max_new_tokens, "runs": runs})  # fmt: skip
    click.echo(format_pair(runs))


def pair_tokens_per_pass(record: dict) -> dict[tuple[str, int], float]:
    """A ``pair`` JSON's tokens per target pass for each (shape, nodes per draft), over all its prompts. Records
    written before chains were measured hold one tree mode, "draft-model", at the record's ``draft_tokens``."""
    totals: dict[tuple[str, int], list[int]] = {}
    for run in record["runs"]:
        for mode in run["modes"]:
            if mode.get("shape") is not None:
                key = (mode["shape"], mode["draft_tokens"])
            elif mode["mode"] == "draft-model":
                key = ("tree", record["draft_tokens"])
            else:
                continue
            total = totals.setdefault(key, [0, 0])
            total[0] += mode["decode_tokens"]
            total[1] += mode["target_passes"]
    return {key: tokens / max(passes, 1) for key, (tokens, passes) in totals.items()}


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
                   context: int, rows: tuple[int, ...], trees: tuple[int, ...], chains: tuple[int, ...],
                   repeats: int) -> dict:  # fmt: skip
    """One budget, in this process: a loader process, the target engine on its plan, the draft resident here."""
    from compute.engine import Engine
    from compute.launch import LaunchedLoader
    from compute.sampling import SamplingParams
    from compute.speculation import verify
    from protocol.client import LoaderClient
    from protocol.launch import LoaderCommand
    from protocol.sizes import parse_size
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
            engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=9))  # prefill, warm-up, graphs
            decode = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=33))
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
                record.update(_draft_seconds(QuantizedCheckpoint(draft_dir), prompt, plan.max_context,
                                             engine.vocab_size, trees, chains, repeats, rng, label=budget))  # fmt: skip
        finally:
            client.close()
    return record


def _draft_seconds(checkpoint, prompt: list[int], max_context: int, vocab_size: int, trees: tuple[int, ...],
                   chains: tuple[int, ...], repeats: int, rng: random.Random, *, label: str) -> dict:  # fmt: skip
    """The draft's seconds per proposal (the best of ``repeats`` after a warm-up) on CUDA: a tree of each size in
    ``trees`` ("draft_seconds"), a chain of each length in ``chains`` ("chain_seconds", its decode steps replayed
    from CUDA graphs captured in the warm-up: "draft_decode_mode" says how they ran). Each proposal follows a
    context one random token longer, as after a target pass (which is what a chain feeds then: one token)."""
    from compute.draft_model import open_drafter

    vocab = min(vocab_size, 4000)
    context_ids = list(prompt)
    result: dict = {"draft_seconds": {}, "chain_seconds": {}}
    for shape, sizes, key in (("tree", trees, "draft_seconds"), ("chain", chains, "chain_seconds")):
        if not sizes:
            continue
        drafter = open_drafter(checkpoint, shape=shape, device="cuda", max_context=max_context, vocab_size=vocab_size,
                               max_tokens=max(sizes))  # fmt: skip
        for size in sizes:
            times = []
            for _ in range(repeats + 1):  # the first: warm-up (the prompt's prefill, new shapes, graph capture)
                context_ids.append(rng.randrange(vocab))
                torch.cuda.synchronize()
                started = time.perf_counter()
                drafter.propose(context_ids, size)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            result[key][size] = min(times[1:])
            click.echo(f"{label}: draft {shape} of {size} {1e3 * result[key][size]:.1f} ms", err=True)
        if shape == "chain":
            result["draft_decode_mode"] = drafter.engine.decode_mode
        del drafter
        torch.cuda.empty_cache()
    return result


def _in_fresh_process(*args, **kwargs) -> dict:
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_passes, *args, **kwargs).result()


def to_measure(rows: tuple[int, ...], trees: tuple[int, ...], chains: tuple[int, ...],
               tokens_per_pass: dict[tuple[str, int], float]) -> tuple[tuple[int, ...], ...]:  # fmt: skip
    """(rows, tree sizes, chain lengths) to time: those asked for, and what projecting ``tokens_per_pass`` (keyed
    by (shape, nodes per draft)) needs: a pass over each draft's size + 1 rows, each draft of its shape and size."""
    return (
        tuple(sorted({*rows, *(size + 1 for _, size in tokens_per_pass)})),
        tuple(sorted({*trees, *(size for shape, size in tokens_per_pass if shape == "tree")})),
        tuple(sorted({*chains, *(size for shape, size in tokens_per_pass if shape == "chain")})),
    )


def project(record: dict, tokens_per_pass: dict[tuple[str, int], float]) -> dict[str, float]:
    """PROJECTED tok/s per draft ("tree-128", "chain-16"): tokens per pass measured on the real pair / (the pass
    over size + 1 rows + the draft of that shape and size, both measured here). Every time it needs must have been
    measured: nothing is interpolated."""
    drafts = {"tree": record.get("draft_seconds", {}), "chain": record.get("chain_seconds", {})}
    projected = {}
    for (shape, size), tokens in sorted(tokens_per_pass.items()):
        if size + 1 not in record["pass_seconds"] or size not in drafts[shape]:
            raise ValueError(f"{record['budget']}: no measured pass of {size + 1} rows or {shape} of {size} to project "
                             f"{shape}-{size} from")  # fmt: skip
        projected[f"{shape}-{size}"] = tokens / (record["pass_seconds"][size + 1] + drafts[shape][size])
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
@click.option("--rows", default=",".join(map(str, DEFAULT_ROWS)), show_default=True,
              help="Rows per pass to time (with --tokens-per-pass, also each measured draft's size + 1).")
@click.option("--trees", default=",".join(map(str, DEFAULT_TREES)), show_default=True,
              help="Draft tree sizes to time (with --tokens-per-pass, also each measured tree's).")
@click.option("--chains", default=",".join(map(str, DEFAULT_CHAINS)), show_default=True,
              help="Draft chain lengths to time (with --tokens-per-pass, also each measured chain's).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--tokens-per-pass", "pair_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A `pair` JSON: its tokens per pass for each draft shape and size make the projection.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def passes(checkpoint: Path, draft_checkpoint: Path, budgets: tuple[str, ...], policy: str, max_context: int,
           context: int, rows: str, trees: str, chains: str, repeats: int, pair_json: Path | None,
           json_path: Path | None) -> None:  # fmt: skip
    """Target pass cost against rows checked, draft cost per tree and per chain, under each budget (GPU)."""
    if not torch.cuda.is_available():
        raise click.ClickException("bench.speculate passes measures GPU passes and needs a CUDA device")
    from quantizer.synth import synthesize

    for path, preset in ((checkpoint, "qwen2-32b"), (draft_checkpoint, "qwen2-0.5b")):
        if not (path / "spillover.json").is_file():
            click.echo(f"writing a synthetic {preset} checkpoint to {path} ...", err=True)
            synthesize(path, preset=preset, device="auto")
    measured_tpp = pair_tokens_per_pass(json.loads(pair_json.read_text())) if pair_json is not None else {}
    row_counts, tree_sizes, chain_lengths = to_measure(_int_list(rows), _int_list(trees), _int_list(chains),
                                                       measured_tpp)  # fmt: skip
    results = []
    for budget in budgets:
        record = _in_fresh_process(checkpoint, draft_checkpoint, budget, policy=policy, max_context=max_context,
                                   context=context, rows=row_counts, trees=tree_sizes, chains=chain_lengths,
                                   repeats=repeats)  # fmt: skip
        record["projected_tokens_per_s"] = project(record, measured_tpp) if measured_tpp else None
        results.append(record)
        if json_path is not None:
            _write(json_path, {"command": "passes", "gpu": torch.cuda.get_device_name(), "checkpoint": str(checkpoint),
                               "draft_checkpoint": str(draft_checkpoint),
                               "tokens_per_pass_measured": {f"{shape}-{size}": tpp
                                                            for (shape, size), tpp in measured_tpp.items()},
                               "results": results})  # fmt: skip
    click.echo(format_passes(results, measured_tpp))


def format_passes(results: list[dict], measured_tpp: dict[tuple[str, int], float]) -> str:
    lines = []
    tpp = {f"{shape}-{size}": tokens for (shape, size), tokens in measured_tpp.items()}
    for r in results:
        lines.append(f"{r['budget']} ({r['resident_units']} resident / {r['streamed_units']} streamed units): "
                     f"one-token decode {r['one_token_decode_tokens_per_s']:.1f} tok/s ({r['decode_mode']})")  # fmt: skip
        lines.append("| rows | pass ms | draft tree of rows - 1, ms | draft chain of rows - 1, ms |")
        lines.append("|---|---|---|---|")
        for k, seconds in r["pass_seconds"].items():
            cells = [r.get(key, {}).get(k - 1) for key in ("draft_seconds", "chain_seconds")]
            cells = ["" if c is None else f"{1e3 * c:.1f}" for c in cells]
            lines.append(f"| {k} | {1e3 * seconds:.1f} | {cells[0]} | {cells[1]} |")
        if r.get("draft_decode_mode"):
            lines.append(f"draft chain decode steps: {r['draft_decode_mode']}")
        for label, rate in (r.get("projected_tokens_per_s") or {}).items():
            lines.append(f"PROJECTED {label} (tokens/pass {tpp[label]:.2f} measured on the real pair on CPU): "
                         f"{rate:.1f} tok/s vs one-token decode {r['one_token_decode_tokens_per_s']:.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
