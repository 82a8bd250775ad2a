"""``spillover run``: chat with a model, one-shot or in a REPL, with the loader started here or already running.

Every option is read once into ``RunConfig``; ``RunConfig.loader_options`` is the one place that says which
options the loader process needs (``--model`` resolved, ``--gpu-memory``, ``--policy``, ``--device``,
``--max-context``). ``--print-loader-args`` prints exactly those, one per line, so ``run.sh`` can start the
loader itself and then run ``spillover run --connect ADDR`` with the same options.

What goes where: the reply (or, with ``--output-format json``, exactly one JSON object) on stdout; the
loader's output, progress, statistics and errors on stderr. Errors a person can fix end the command with one
line and a non-zero exit, never a traceback; a dead loader is named as such within seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
from pathlib import Path

import click
import psutil
import torch

from compute.launch import LaunchedLoader, LoaderOptions, LoaderStartError
from compute.resolve import ModelResolveError, ResolvedModel, default_cache_dir, resolve_model
from compute.sampling import SamplingParams
from quantizer.format import FormatError

DEFAULT_MAX_CONTEXT = 4096
# With no --model and no --gpu-memory, the demo runs under a budget that holds about half its layers,
# so the placement shows streaming (values for the "demo" preset; cuda adds two CUDA contexts).
DEMO_BUDGET = {"cpu": "287MiB", "cuda": "1567MiB"}  # cuda: + 2 × 640 MiB (loader.planner.CUDA_CONTEXT_BYTES)
DEMO_MAX_CONTEXT = 1024
# Without --gpu-memory on a real model: the free device memory (cuda), half the available host memory (cpu).
CUDA_FREE_FRACTION = 0.95
CPU_AVAILABLE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The options of one ``spillover run``, checked."""

    model: str | None  # --model as given: a directory or a Hugging Face repo id; None = the built-in demo
    prompt: str | None  # -p: one reply, then exit; None = the interactive REPL
    max_new_tokens: int  # -n: tokens per reply at most
    temperature: float  # 0 = greedy
    top_p: float  # 1.0 = off
    top_k: int  # 0 = off
    repetition_penalty: float  # 1.0 = off
    seed: int | None  # None = a fresh random seed per reply
    policy: str  # the loader's placement policy: resident, stream or hybrid
    gpu_memory: str | None  # the budget of both processes, e.g. "12GiB"; None = chosen from what is free
    device: str  # "cuda" or "cpu"
    max_context: int | None  # KV cache tokens; None = the default (the demo uses a smaller one)
    raw: bool  # no chat template: the prompt is tokenized as it is
    output_format: str  # "text" or "json"
    connect: str | None  # address of a running loader; None = start one here
    cache_dir: Path  # where quantized checkpoints and the demo model are kept
    print_loader_args: bool  # only print the loader's options (after resolving --model) and exit

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
        )

    def loader_options(self, model: ResolvedModel) -> LoaderOptions:
        """The loader's share of the options: the one place that splits them between the two processes."""
        return LoaderOptions(
            model=model.path,
            gpu_memory=self.gpu_memory or default_budget(self.device, demo=model.is_demo),
            policy=self.policy,
            device=self.device,
            max_context=self.max_context or default_max_context(model),
        )


def default_max_context(model: ResolvedModel) -> int:
    """``--max-context`` when none is given: DEFAULT_MAX_CONTEXT (the demo's), at most what the model was built for."""
    config = json.loads((model.path / "config.json").read_text())
    default = DEMO_MAX_CONTEXT if model.is_demo else DEFAULT_MAX_CONTEXT
    return min(default, config.get("max_position_embeddings") or default)


def default_budget(device: str, *, demo: bool) -> str:
    """``--gpu-memory`` when none is given, in bytes (the loader parses sizes)."""
    if demo:
        return DEMO_BUDGET[device]
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return str(int(free * CUDA_FREE_FRACTION))
    return str(int(psutil.virtual_memory().available * CPU_AVAILABLE_FRACTION))


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
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", metavar="PATH|REPO_ID", help="A spillover-int4 directory, a Hugging Face checkpoint directory "
              "or repo id (quantized once into the cache). Default: the built-in demo (random weights).")
@click.option("-p", "--prompt", help="Reply to this prompt and exit. Default: an interactive chat.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per reply at most.")
@click.option("--temperature", type=float, default=0.6, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling; 1 = off.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", type=click.IntRange(min=0), help="Makes a reply reproducible. Default: random.")
@click.option("--policy", default="hybrid", show_default=True,
              help="Which weights stay in device memory: resident, stream or hybrid.")
@click.option("--gpu-memory", metavar="SIZE", help="Device memory for both processes together, e.g. 12GiB. "
              "Default: the free device memory (the demo: less than its model, to show streaming).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Default: cuda when available.")
@click.option("--max-context", type=click.IntRange(min=1),
              help="Tokens of context (prompt, history and reply); the KV cache is sized for it. "
                   f"[default: {DEFAULT_MAX_CONTEXT} or the model's maximum if smaller; the demo: {DEMO_MAX_CONTEXT}]")
@click.option("--raw", is_flag=True, help="No chat template: the prompt is tokenized as it is.")
@click.option("--output-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object on stdout (needs -p).")
@click.option("--connect", metavar="ADDR", help="Use the loader already listening at ADDR (an ipc:// or "
              "tcp://127.0.0.1 address) instead of starting one; it keeps the budget, policy and context it was "
              "started with.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SPILLOVER_CACHE_DIR",
              help="Where quantized models and the demo are kept. [default: ~/.cache/spillover]")
@click.option("--print-loader-args", is_flag=True,
              help="Print the loader's options, one per line (--model DIR first), and exit. Used by run.sh.")
@click.pass_context
# fmt: on
def run(ctx: click.Context, **options) -> None:
    """Chat with a model whose INT4 weights stream from a loader process."""
    config = _build_config(options)
    verbose = ctx.find_root().params.get("verbose", 0)
    # SIGTERM ends the program through the normal exit path, so the loader is stopped and files are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        model = resolve_model(config.model, cache_dir=config.cache_dir, device=config.device)
        loader_options = config.loader_options(model)
        if model.is_demo:
            click.echo(f"spillover: {model.label}; run with --model to use a real model", err=True)
        if config.print_loader_args:
            click.echo("\n".join(loader_options.argv()))
            return
        _serve(config, model, loader_options, verbose)
    except (ModelResolveError, LoaderStartError, FormatError) as e:
        raise RunError(str(e)) from None
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)


def _build_config(options: dict) -> RunConfig:
    if options["output_format"] == "json" and options["prompt"] is None:
        raise click.UsageError("--output-format json needs a prompt (-p): the chat REPL writes text only")
    if options["connect"] and options["print_loader_args"]:
        raise click.UsageError("--print-loader-args and --connect do not go together")
    return RunConfig(
        model=options["model"],
        prompt=options["prompt"],
        max_new_tokens=options["max_new_tokens"],
        temperature=_finite(options["temperature"], "--temperature", 0, low_inclusive=True),
        top_p=_finite(options["top_p"], "--top-p", 0, low_inclusive=False, high=1),
        top_k=options["top_k"],
        repetition_penalty=_finite(options["repetition_penalty"], "--repetition-penalty", 0, low_inclusive=False),
        seed=options["seed"],
        policy=options["policy"],
        gpu_memory=options["gpu_memory"],
        device=_device(options["device"]),
        max_context=options["max_context"],
        raw=options["raw"],
        output_format=options["output_format"],
        connect=options["connect"],
        cache_dir=options["cache_dir"] or default_cache_dir(),
        print_loader_args=options["print_loader_args"],
    )


def _serve(config: RunConfig, model: ResolvedModel, loader_options: LoaderOptions, verbose: int) -> None:
    """Connect to (or start) the loader, build the engine, and answer the prompt or run the REPL."""
    # Imported here: transformers is slow to import, and --help or --print-loader-args do not need it.
    from compute.chat import ReplyRefused
    from compute.session import LoaderLost, Session

    with contextlib.ExitStack() as stack:
        launched = None
        if config.connect:
            address = config.connect
        else:
            launched = stack.enter_context(LaunchedLoader.start(loader_options, verbose=verbose))
            address = launched.address
        try:
            session = stack.enter_context(Session.open(address, model, config))
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
        except ReplyRefused as e:
            raise RunError(str(e)) from None
