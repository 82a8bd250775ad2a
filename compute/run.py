"""``spillover run``: chat with a model, one-shot or in a REPL, with the loader started here or already running.

Every option is read once into ``compute.config.RunConfig``; ``RunConfig.loader_command`` is the one place that
says which options the loader process gets (``--model`` resolved, ``--gpu-memory``, ``--policy``, ``--device``,
``--max-context``). Without ``--connect`` the loader is started here (``compute.launch``), the one launcher both
``spillover run`` and ``run.sh`` use. ``MODEL_OPTIONS``, ``build_config``, ``drive``, ``loader_address``,
``resolved_draft`` and ``share_cores_with_loader`` are shared with ``spillover serve`` (``compute.serve.main``),
which takes the same model, budget, sampling and speculation options (``check_speculation`` checks the last, for
``spillover bench`` too).

What goes where: the reply (or, with ``--output-format json``, exactly one JSON object) on stdout; the
loader's output, progress, statistics and errors on stderr. Errors a person can fix end the command with one
line and a non-zero exit, never a traceback; a dead loader is named as such within seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click
import torch

from compute.config import DEMO_MAX_CONTEXT, KernelOptions, RunConfig, default_draft_shape, kernel_options
from compute.launch import LaunchedLoader, LoaderStartError
from compute.resolve import ModelResolveError, ResolvedModel, default_cache_dir, resolve_model
from compute.speculation import DEFAULT_CHAIN_TOKENS, DEFAULT_MAX_DRAFT_TOKENS, DRAFT_SHAPES
from protocol.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_POLICY, POLICY_NAMES
from protocol.launch import LoaderCommand
from protocol.sizes import SIZE
from quantizer.format import FormatError

def _device(requested: str | None) -> str:
    """``--device``, checked; cuda when available if not given."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is usable here (torch sees none); use --device cpu")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


class RunError(click.ClickException):
    """One line for a person; click prints it as ``Error: …`` on stderr and exits 1."""


def _finite(value: float, name: str, low: float, *, low_inclusive: bool, high: float = math.inf) -> float:
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low) and value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
        raise click.BadParameter(f"{value:g} is not a number {bound}", param_hint=name)
    return value


# fmt: off
# --speculate, also `spillover bench`'s
SPECULATE_OPTION = click.option(
    "--speculate", type=click.Choice(["ngram"]), help="Speculative decoding by prompt lookup: drafts copied from "
    "earlier text (the prompt and the reply so far), checked by the model several at a pass.")
# The options every command that runs a model takes (`spillover run` and `spillover serve`): the model, the
# sampling defaults, the budget, where the loader is, speculative decoding and how the kernels launch. A command
# adds its own and builds its RunConfig with ``build_config``.
MODEL_OPTIONS = [
    click.option("--model", metavar="PATH|REPO_ID", help="A spillover-int4 directory, a Hugging Face checkpoint "
                 "directory or repo id, or a Qwen2 .gguf file (quantized once into the cache). Default: the built-in "
                 "demo (random weights)."),
    click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                 help="Tokens per reply at most."),
    click.option("--temperature", type=float, default=0.6, show_default=True, help="0 = greedy."),
    click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling; 1 = off."),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
    click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off."),
    click.option("--policy", type=click.Choice(sorted(POLICY_NAMES)), default=DEFAULT_POLICY, show_default=True,
                 help="Which weights stay in device memory."),
    click.option("--gpu-memory", type=SIZE, metavar="SIZE", help="Device memory for both processes together, e.g. "
                 "12GiB. Default: the free device memory (the demo: less than its model, to show streaming)."),
    click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Default: cuda when available."),
    click.option("--max-context", type=click.IntRange(min=1),
                 help="Tokens of context (prompt, history and reply); the KV cache is sized for it. "
                      f"[default: {DEFAULT_MAX_CONTEXT} or the model's maximum if smaller; the demo: {DEMO_MAX_CONTEXT}]"),
    click.option("--connect", metavar="ADDR", help="Use the loader already listening at ADDR (an ipc:// or "
                 "tcp://127.0.0.1 address) instead of starting one; it keeps the budget, policy and context it was "
                 "started with."),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SPILLOVER_CACHE_DIR",
                 help="Where quantized models and the demo are kept. [default: ~/.cache/spillover]"),
    SPECULATE_OPTION,
    click.option("--draft-model", metavar="PATH|REPO_ID", help="Speculative decoding with this smaller model (same "
                 "tokenizer; quantized like --model), held resident in device memory within --gpu-memory."),
    click.option("--draft-tokens", type=click.IntRange(min=1), help="Drafted tokens each pass checks. "
                 f"[default: as many as pay for themselves at the measured cost of a pass, at most "
                 f"{DEFAULT_MAX_DRAFT_TOKENS}; a chain drafts at most {DEFAULT_CHAIN_TOKENS}]"),
    click.option("--draft-shape", type=click.Choice(DRAFT_SHAPES), help="How --draft-model drafts: chain = its "
                 "greedy continuation, one decode step (a CUDA graph replay) a token; tree = a tree of likely "
                 "continuations grown by a few wide forwards. [default: chain on cuda, tree on cpu]"),
]
# fmt: on


def model_options(command):
    """Decorate a click command with MODEL_OPTIONS and the kernel options."""
    for option in reversed(MODEL_OPTIONS):
        command = option(command)
    return kernel_options(command)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("-p", "--prompt", help="Reply to this prompt and exit. Default: an interactive chat.")
@click.option("--seed", type=click.IntRange(min=0), help="Makes a reply reproducible. Default: random.")
@click.option("--raw", is_flag=True, help="No chat template: the prompt is tokenized as it is.")
@click.option("--output-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object on stdout (needs -p).")
@click.pass_context
def run(ctx: click.Context, **options) -> None:
    """Chat with a model whose INT4 weights stream from a loader process."""
    drive(ctx, build_config(options, verbose=ctx.find_root().params.get("verbose", 0)), _chat)


# a model command's own work, once the model is resolved: (config, model, the loader's command line)
ModelCommand = Callable[[RunConfig, ResolvedModel, LoaderCommand], None]


def drive(ctx: click.Context, config: RunConfig, serve: ModelCommand) -> None:
    """What every model command does around its own work: SIGTERM as a normal exit, ``--model`` resolved, the
    kernel options applied, and the errors a person can fix as one line."""
    # SIGTERM ends the program through the normal exit path, so the loader is stopped and files are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        model = resolve_model(config.model, cache_dir=config.cache_dir, device=config.device)
        draft = None
        if config.draft_model is not None:
            draft = resolve_model(config.draft_model, cache_dir=config.cache_dir, device=config.device)
        if model.is_demo:
            click.echo(f"spillover: {model.label}; run with --model to use a real model", err=True)
        config.kernels.apply()
        serve(config, model, config.loader_command(model, draft))
    except (ModelResolveError, LoaderStartError, FormatError) as e:
        raise RunError(str(e)) from None
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)


def check_speculation(
    speculate: str | None, draft_model: str | Path | None, draft_tokens: int | None = None, draft_shape: str | None = None
) -> None:
    """``--speculate``, ``--draft-model``, ``--draft-tokens`` and ``--draft-shape`` together make sense, else
    ``click.UsageError``."""
    if speculate and draft_model:
        raise click.UsageError("--speculate ngram and --draft-model are two ways of drafting: choose one")
    if draft_tokens and not (speculate or draft_model):
        raise click.UsageError("--draft-tokens needs --speculate ngram or --draft-model")
    if draft_shape and not draft_model:
        raise click.UsageError("--draft-shape needs --draft-model")


def build_config(options: dict, *, verbose: int) -> RunConfig:
    """The RunConfig of a model command's options; those only ``spillover run`` has may be absent."""
    if options.get("output_format") == "json" and options.get("prompt") is None:
        raise click.UsageError("--output-format json needs a prompt (-p): the chat REPL writes text only")
    check_speculation(options.get("speculate"), options.get("draft_model"), options.get("draft_tokens"),
                      options.get("draft_shape"))
    device = _device(options["device"])
    return RunConfig(
        model=options["model"],
        prompt=options.get("prompt"),
        max_new_tokens=options["max_new_tokens"],
        temperature=_finite(options["temperature"], "--temperature", 0, low_inclusive=True),
        top_p=_finite(options["top_p"], "--top-p", 0, low_inclusive=False, high=1),
        top_k=options["top_k"],
        repetition_penalty=_finite(options["repetition_penalty"], "--repetition-penalty", 0, low_inclusive=False),
        seed=options.get("seed"),
        policy=options["policy"],
        gpu_memory=options["gpu_memory"],
        device=device,
        max_context=options["max_context"],
        raw=options.get("raw", False),
        output_format=options.get("output_format", "text"),
        connect=options["connect"],
        cache_dir=options["cache_dir"] or default_cache_dir(),
        kernels=KernelOptions(gemv_configs=options["gemv_configs"], early_launch=options["early_launch"]),
        verbose=verbose,
        speculate=options.get("speculate"),
        draft_model=options.get("draft_model"),
        draft_tokens=options.get("draft_tokens"),
        draft_shape=options.get("draft_shape") or default_draft_shape(device),
        max_batch=options.get("max_batch", 1),
        kv_tokens=options.get("kv_tokens"),
    )


def share_cores_with_loader(device: str) -> None:
    """On CPU, compute's intra-op threads: ``compute.session.cpu_compute_threads`` (one core fewer than the machine;
    ``OMP_NUM_THREADS`` rules when set)."""
    if device == "cpu":
        from compute.session import cpu_compute_threads

        torch.set_num_threads(cpu_compute_threads())


def resolved_draft(config: RunConfig, loader_command: LoaderCommand) -> ResolvedModel | None:
    """The draft model ``drive`` resolved (the one the loader's budget reserves), or None without ``--draft-model``."""
    if loader_command.draft_model is None:
        return None
    return ResolvedModel(path=loader_command.draft_model, label=config.draft_model, is_demo=False)


def loader_address(
    stack: contextlib.ExitStack, config: RunConfig, loader_command: LoaderCommand
) -> tuple[str, LaunchedLoader | None]:
    """The address of the loader: ``--connect``'s, or that of one started here (stopped when ``stack`` closes)."""
    if config.connect:
        return config.connect, None
    launched = stack.enter_context(LaunchedLoader.start(loader_command))
    return launched.address, launched


def _chat(config: RunConfig, model: ResolvedModel, loader_command: LoaderCommand) -> None:
    """Connect to (or start) the loader, build the engine, and answer the prompt or run the REPL."""
    # Imported here: transformers is slow to import, and --help does not need it.
    from compute.chat import ReplyRefused
    from compute.draft_model import DraftModelError
    from compute.session import LoaderLost, Session

    share_cores_with_loader(config.device)
    draft = resolved_draft(config, loader_command)
    with contextlib.ExitStack() as stack:
        address, launched = loader_address(stack, config, loader_command)
        try:
            session = stack.enter_context(Session.open(address, model, config, draft=draft))
            if config.prompt is None:
                session.chat()
            elif config.output_format == "json":
                reply = session.answer_json(config.prompt)
                click.echo(json.dumps(reply))
                if reply["finish_reason"] == "stopped":
                    sys.exit(130)
            elif session.answer(config.prompt).stopped:
                sys.exit(130)
        except LoaderLost as e:
            code = launched.exit_code() if launched else None
            raise RunError(f"{e}" + (f" (it exited with code {code})" if code is not None else "")) from None
        except (ReplyRefused, DraftModelError) as e:
            raise RunError(str(e)) from None
