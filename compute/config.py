"""The options of one ``spillover run``, checked, and the defaults that fill in what was not given.

``RunConfig`` is built once, from the command line, by ``compute.run``; ``RunConfig.loader_command`` is the one
place that says which options the loader process gets (``protocol.launch.LoaderCommand``). ``compute.session``
reads the rest.

``KernelOptions`` are the kernels' options of any process that builds an engine (``spillover run``, ``spillover
bench``, ``bench.decode``): ``kernel_options`` adds them to a click command (the environment variables
``SPILLOVER_GEMV_CONFIGS`` and ``SPILLOVER_EARLY_LAUNCH`` may set them) and ``KernelOptions.apply`` hands them to
the kernels once, before the first launch. No kernel module reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import click
import psutil
import torch

from compute.resolve import ResolvedModel
from compute.sampling import SamplingParams
from protocol.defaults import CUDA_CONTEXT_BYTES, CUDA_PROCESSES, DEFAULT_MAX_CONTEXT, MiB
from protocol.launch import LoaderCommand

# With no --model and no --gpu-memory, the demo runs under a budget that holds about half its layers, so the
# placement shows streaming (a value for the "demo" preset; on cuda the processes' CUDA contexts come on top).
DEMO_BUDGET_BYTES = 287 * MiB
DEMO_MAX_CONTEXT = 1024
# Without --gpu-memory on a real model: the free device memory (cuda), half the available host memory (cpu).
CUDA_FREE_FRACTION = 0.95
CPU_AVAILABLE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """How this process's INT4 and decode kernels launch."""

    gemv_configs: Path | None = None  # a table ``python -m bench.kernels --sweep`` wrote, merged over the built-in
    early_launch: bool = True  # decode kernels launch early on Hopper and later (``compute.kernels.pdl``)

    def apply(self) -> None:
        """Hand the options to this process's kernels, before any is launched; ValueError names a bad table."""
        from compute.kernels import pdl  # imported here: Triton is slow to import, and --help needs none of it
        from compute.kernels.gemv_configs import load_tuned_configs

        if self.gemv_configs is not None:
            load_tuned_configs(self.gemv_configs)
        pdl.set_early_launch(self.early_launch)


def _check_gemv_configs(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        from compute.kernels.gemv_configs import read_tuned_configs

        try:
            read_tuned_configs(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


def kernel_options(command: Callable) -> Callable:
    """Add ``--gemv-configs`` and ``--early-launch/--no-early-launch`` to a click command; its function receives
    them as ``gemv_configs`` and ``early_launch`` (``KernelOptions(**...)``)."""
    command = click.option(
        "--early-launch/--no-early-launch", default=True, show_default=True, envvar="SPILLOVER_EARLY_LAUNCH",
        help="Decode kernels start before the one before them ends (Hopper and later). [env: SPILLOVER_EARLY_LAUNCH]",
    )(command)  # fmt: skip
    return click.option(
        "--gemv-configs", type=click.Path(dir_okay=False, path_type=Path), envvar="SPILLOVER_GEMV_CONFIGS",
        callback=_check_gemv_configs, help="A GEMV config table `python -m bench.kernels --sweep` wrote on this "
        "GPU, used over the built-in one. [env: SPILLOVER_GEMV_CONFIGS]",
    )(command)  # fmt: skip


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
    gpu_memory: int | None  # both processes' budget in bytes (--gpu-memory 12GiB); None = chosen from what is free
    device: str  # "cuda" or "cpu"
    max_context: int | None  # KV cache tokens; None = the default (the demo uses a smaller one)
    raw: bool  # no chat template: the prompt is tokenized as it is
    output_format: str  # "text" or "json"
    connect: str | None  # address of a running loader; None = start one here
    cache_dir: Path  # where quantized checkpoints and the demo model are kept
    kernels: KernelOptions  # --gemv-configs, --early-launch
    verbose: int  # the spillover group's -v count: the loader logs at the same level
    max_batch: int = 1  # sequences per forward pass (`spillover serve --max-batch`); 1 for the chat
    kv_tokens: int | None = None  # positions of the paged KV pool when max_batch > 1; None = the planner's default
    speculate: str | None = None  # "ngram": prompt-lookup drafting; None: none (or the draft model's, if given)
    draft_model: str | None = None  # --draft-model as given (like --model); None = no draft model
    draft_tokens: int | None = None  # drafted tokens per target pass; None = sized from the measured pass cost
    draft_shape: str = "tree"  # how the draft model drafts: one of compute.speculation.DRAFT_SHAPES

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
        )

    def loader_command(self, model: ResolvedModel, draft: ResolvedModel | None = None) -> LoaderCommand:
        """The loader's share of the options: the one place that splits them between the two processes (the
        launcher adds the socket and the ready file)."""
        return LoaderCommand(
            model=model.path,
            gpu_memory=self.gpu_memory or default_budget(self.device, demo=model.is_demo),
            policy=self.policy,
            device=self.device,
            max_context=self.max_context or default_max_context(model),
            max_batch=self.max_batch,
            kv_tokens=self.kv_tokens,
            verbose=self.verbose,
            draft_model=draft.path if draft is not None else None,
        )


def default_max_context(model: ResolvedModel) -> int:
    """``--max-context`` when none is given: DEFAULT_MAX_CONTEXT (the demo's), at most what the model was built for."""
    config = json.loads((model.path / "config.json").read_text())
    default = DEMO_MAX_CONTEXT if model.is_demo else DEFAULT_MAX_CONTEXT
    return min(default, config.get("max_position_embeddings") or default)


def default_draft_shape(device: str) -> str:
    """``--draft-shape`` when none is given: a chain on CUDA, where the draft's decode steps replay as CUDA graphs
    (a token's step costs little more than its weight reads), a tree elsewhere, where a draft forward over 16 rows
    costs little more than over one and a tree gets more tokens accepted per target pass."""
    return "chain" if device == "cuda" else "tree"


def default_budget(device: str, *, demo: bool) -> int:
    """``--gpu-memory`` when none is given, in bytes."""
    if demo:
        contexts = CUDA_PROCESSES * CUDA_CONTEXT_BYTES if device == "cuda" else 0
        return DEMO_BUDGET_BYTES + contexts
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free * CUDA_FREE_FRACTION)
    return int(psutil.virtual_memory().available * CPU_AVAILABLE_FRACTION)
