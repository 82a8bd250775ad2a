"""The options of one ``spillover run``, checked, and the defaults that fill in what was not given.

``RunConfig`` is built once, from the command line, by ``compute.run``; ``RunConfig.loader_options`` is the one
place that says which options the loader process needs. ``compute.session`` reads the rest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import psutil
import torch

from compute.launch import LoaderOptions
from compute.resolve import ResolvedModel
from compute.sampling import SamplingParams
from protocol.defaults import CUDA_CONTEXT_BYTES, CUDA_PROCESSES, DEFAULT_MAX_CONTEXT, MiB

# With no --model and no --gpu-memory, the demo runs under a budget that holds about half its layers, so the
# placement shows streaming (a value for the "demo" preset; on cuda the processes' CUDA contexts come on top).
DEMO_BUDGET_BYTES = 287 * MiB
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
        contexts = CUDA_PROCESSES * CUDA_CONTEXT_BYTES if device == "cuda" else 0
        return str(DEMO_BUDGET_BYTES + contexts)
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return str(int(free * CUDA_FREE_FRACTION))
    return str(int(psutil.virtual_memory().available * CPU_AVAILABLE_FRACTION))
