"""``spillover perplexity``: the perplexity of a text through the real pipeline (a loader process and this one).

Method: the text is tokenized as it is (no chat template, no BOS added) and cut into non-overlapping windows of
``--context`` tokens (the last one may be shorter; one of a single token is dropped). Each window runs from an empty
KV cache; every token of a window but its first is scored by the log-probability the model gave it from the tokens
before it in the window. Perplexity = exp(mean negative log-likelihood over all scored tokens). This is the
"fixed-length windows, stride = window" method; llama.cpp's ``llama-perplexity`` also uses non-overlapping
windows of its context size but scores only the second half of each (and starts each with BOS), so its figures
are comparable in kind, not digit for digit.

``--json FILE`` also writes, per scored token, the model's top-1 token id (for agreement between two models).
Errors a person can fix (no such file, a text too short, a bad model) end with one line and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import click
import torch

from compute.config import default_budget
from compute.launch import LaunchedLoader, LoaderStartError
from compute.resolve import ModelResolveError, default_cache_dir, resolve_model
from compute.run import share_cores_with_loader
from protocol.defaults import DEFAULT_POLICY, POLICY_NAMES
from protocol.launch import LoaderCommand
from protocol.sizes import SIZE
from quantizer.format import FormatError

DEFAULT_CONTEXT = 512
SCORE_CHUNK = 256  # positions whose logits exist at once: 256 x vocab float32 (155 MB for Qwen2's 151936)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    perplexity: float  # exp(nll_sum / scored)
    nll_sum: float  # nats, over every scored token
    scored: int  # tokens scored: the text's tokens minus one per window
    windows: int
    context: int  # tokens per window
    text_tokens: int  # the tokenized text's length
    seconds: float  # wall time of the forward passes and the scoring
    top1: tuple[int, ...]  # per scored token, in order: the id the model ranked first

    def as_json(self) -> dict:
        return dataclasses.asdict(self) | {"top1": list(self.top1)}


def windows_of(ids: Sequence[int], context: int) -> list[Sequence[int]]:
    """The windows the method scores; ``ValueError`` when there is nothing to score."""
    if context < 2:
        raise ValueError(f"a window of {context} token(s) scores nothing: use at least 2")
    windows = [ids[i : i + context] for i in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed to score one")
    return windows


def perplexity_of(engine, ids: Sequence[int], context: int, chunk: int = SCORE_CHUNK) -> PerplexityResult:
    """Score ``ids`` with ``engine`` (a ``compute.engine.Engine``) in windows of ``context`` tokens (the method above)."""
    windows = windows_of(ids, context)
    start = time.perf_counter()
    nll_sum = 0.0
    top1: list[int] = []
    for window in windows:
        targets = torch.tensor(window[1:], dtype=torch.long)
        done = 0
        for logits in engine.logits_of(window, chunk):  # (rows, vocab) float32
            rows = logits[: len(targets) - done]  # the window's last position predicts nothing in it
            log_probs = torch.log_softmax(rows, dim=-1)
            nll_sum -= log_probs.gather(1, targets[done : done + len(rows)].unsqueeze(1)).sum().item()
            top1.extend(rows.argmax(dim=-1).tolist())
            done += len(rows)
    scored = len(top1)
    return PerplexityResult(
        perplexity=math.exp(nll_sum / scored),
        nll_sum=nll_sum,
        scored=scored,
        windows=len(windows),
        context=context,
        text_tokens=len(ids),
        seconds=time.perf_counter() - start,
        top1=tuple(top1),
    )


class PerplexityError(click.ClickException):
    """One line for a person."""


# fmt: off
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, metavar="PATH|REPO_ID", help="A spillover-int4 directory, a Hugging Face "
              "checkpoint directory or repo id (quantized once into the cache).")
@click.option("--text", "text_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The text file to score (UTF-8).")
@click.option("--context", type=click.IntRange(min=2), default=DEFAULT_CONTEXT, show_default=True,
              help="Tokens per window; windows do not overlap.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the text's first N tokens.")
@click.option("--policy", type=click.Choice(sorted(POLICY_NAMES)), default=DEFAULT_POLICY, show_default=True,
              help="Which weights stay in device memory.")
@click.option("--gpu-memory", type=SIZE, metavar="SIZE",
              help="Device memory for both processes. Default: as `spillover run`.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Default: cuda when available.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result, with every scored token's top-1 id, to this JSON file.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SPILLOVER_CACHE_DIR",
              help="Where quantized models are kept. [default: ~/.cache/spillover]")
# fmt: on
def perplexity(model, text_path, context, max_tokens, policy, gpu_memory, device, json_path, cache_dir) -> None:
    """Perplexity of a text under a model, through the loader and compute processes."""
    from compute.engine import Engine
    from protocol.client import LoaderClient, LoaderError
    from quantizer.checkpoint import QuantizedCheckpoint
    from transformers import AutoTokenizer

    if device == "cuda" and not torch.cuda.is_available():
        raise PerplexityError("--device cuda: no CUDA device is usable here (torch sees none); use --device cpu")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PerplexityError(f"cannot read --text {text_path}: {e}") from None
    try:
        resolved = resolve_model(model, cache_dir=cache_dir or default_cache_dir(), device=device)
    except (ModelResolveError, FormatError) as e:
        raise PerplexityError(str(e)) from None
    checkpoint = QuantizedCheckpoint(resolved.path)
    ids = AutoTokenizer.from_pretrained(resolved.path)(text, add_special_tokens=False)["input_ids"][:max_tokens]
    try:
        windows_of(ids, context)
    except ValueError as e:
        raise PerplexityError(f"{text_path}: {e}") from None
    max_context = context  # one window at a time: the KV cache holds one window
    share_cores_with_loader(device)
    options = LoaderCommand(
        model=resolved.path,
        gpu_memory=gpu_memory or default_budget(device, demo=False),
        policy=policy,
        device=device,
        max_context=max_context,
    )
    try:
        with LaunchedLoader.start(options) as launched, LoaderClient.connect(launched.address, timeout_s=60) as client:
            engine = Engine(
                checkpoint, client, device=device, max_context=max_context, prefill_chunk=client.plan.prefill_chunk
            )
            result = perplexity_of(engine, ids, context)
    except (LoaderStartError, LoaderError) as e:
        raise PerplexityError(str(e)) from None
    click.echo(
        f"perplexity {result.perplexity:.4f} over {result.scored} tokens ({result.windows} windows of {context}; "
        f"{result.text_tokens} tokens in {text_path.name}), {result.seconds:.1f} s"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result.as_json() | {"model": str(model), "text": str(text_path)}))
