"""Do greedy replies depend on the batch? Requests run one at a time, then all at once, on a real model.

    python -m bench.batch_equality --model QDIR [--device cpu] [--tokens 8] [--max-batch 8]

Starts a loader for the spillover-int4 model QDIR (every unit resident), builds ``compute.batch_engine.BatchEngine``
on its plan and drives it through ``compute.scheduler.Scheduler``: first each of a few chat prompts alone
(``max_batch`` 1), then all of them submitted together. Prints, per request, whether the two greedy replies are
equal token for token and, where not, the first step where they part. A random model's flat logits turn
rounding noise into different tokens; a real model's greedy choices are stable to it, so on a real model the
replies should be equal (the batching tests state the rule for near-ties). Exits 1 when any reply differs.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import click

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What does HTTP status 404 mean?",
    "Name three sorting algorithms.",
    "How do I open a file in C?",
    "Explain a Python list comprehension.",
    "What is a mutex?",
    "Write SQL that counts the rows of a table.",
    "What is the capital of France?",
]


def replies(scheduler, prompts: list[list[int]], params) -> list[tuple[int, ...]]:
    """Submit every prompt at once and wait for all replies (token ids, in prompt order)."""
    from compute.scheduler import GenerationRequest, TokenEvent

    events: dict[int, list] = {}
    ended = threading.Condition()

    def record(slot):
        def on_event(event):
            with ended:
                slot.append(event)
                ended.notify_all()

        return on_event

    ids = []
    for prompt in prompts:
        slot: list = []
        ids.append(scheduler.submit(GenerationRequest(prompt_ids=tuple(prompt), params=params), record(slot)))
        events[ids[-1]] = slot
    with ended:
        ended.wait_for(lambda: all(s and not isinstance(s[-1], TokenEvent) for s in events.values()), timeout=3600)
    return [tuple(e.token_id for e in events[i] if isinstance(e, TokenEvent)) for i in ids]


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--tokens", default=8, show_default=True, type=click.IntRange(min=1), help="Reply length per request.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-context", default=512, show_default=True, type=click.IntRange(min=16))
def main(model_dir: Path, device: str, tokens: int, max_batch: int, max_context: int) -> None:
    from compute.batch_engine import BatchEngine
    from compute.launch import LaunchedLoader
    from compute.sampling import SamplingParams
    from compute.scheduler import Scheduler
    from protocol.client import LoaderClient
    from protocol.launch import LoaderCommand
    from quantizer.checkpoint import QuantizedCheckpoint

    checkpoint = QuantizedCheckpoint(model_dir)
    options = LoaderCommand(
        model=model_dir, gpu_memory=64 << 30, policy="resident", device=device, max_context=max_context,
        max_batch=max_batch, kv_tokens=max_batch * max_context,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=tokens)
    with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=120) as client:
        engine = BatchEngine.for_plan(checkpoint, client, device=device)
        prompts = [
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            for text in PROMPTS
        ]
        one = Scheduler(engine, max_batch=1)
        one.start()
        started = time.perf_counter()
        alone = [replies(one, [prompt], params)[0] for prompt in prompts]
        alone_s = time.perf_counter() - started
        one.close(drain=True)
        many = Scheduler(engine, max_batch=max_batch)
        many.start()
        started = time.perf_counter()
        together = replies(many, prompts, params)
        together_s = time.perf_counter() - started
        many.close(drain=True)
    differing = 0
    for text, single, batched in zip(PROMPTS, alone, together):
        if single == batched:
            click.echo(f"equal    {text!r}: {engine.tokenizer.decode(single)!r}")
            continue
        differing += 1
        step = next((i for i, (a, b) in enumerate(zip(single, batched)) if a != b), min(len(single), len(batched)))
        click.echo(f"DIFFERS  {text!r} at step {step}: alone {single}, batched {batched}")
    click.echo(
        f"{len(PROMPTS) - differing} of {len(PROMPTS)} greedy replies equal; one at a time {alone_s:.1f} s, "
        f"all at once {together_s:.1f} s ({device}, {tokens} tokens each, max batch {max_batch})"
    )
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
