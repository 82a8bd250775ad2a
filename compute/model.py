"""Building the patched HF transformers Qwen2 model for a spillover-int4 checkpoint.

``build_model(checkpoint, weights, device)`` returns a stock ``Qwen2ForCausalLM`` (eval mode, no grad) in which:

* every ``nn.Linear`` the manifest lists in its units is an ``Int4Linear`` (``compute.int4_linear``) whose weight
  is bound, for one forward of its unit, to the views ``weights.acquire(unit)`` returns, and released after;
* everything else (embeddings, norms, biases) is assigned from the checkpoint's dense tensors, moved to
  ``device`` once; a tied lm_head (``tie_word_embeddings``) is a plain Linear sharing the embedding; on CUDA an
  untied model's embedding is a ``HostEmbedding`` in pinned host memory instead (the planner does not count it);
* the rotary embedding is rebuilt on ``device`` (its ``inv_freq`` buffer is not in the checkpoint, and a module
  built on the meta device has no values for it);
* on CUDA only, the small ops around the Linears run as fused Triton kernels (``_fuse_small_ops``): every
  ``Qwen2RMSNorm`` is a ``compute.kernels.norm.FusedRMSNorm`` holding the same weight Parameter, and every SiLU
  ``Qwen2MLP`` runs ``compute.kernels.activation.swiglu_mlp_forward``. Both do HF's arithmetic (an output differs
  only where fp32 noise tips a bf16 rounding, by an ulp or two), and both are capturable in CUDA graphs. On CPU the modules are HF's, untouched.

``weights`` is anything with ``acquire(unit_name, stream=None) -> dict[str, Tensor]`` (full tensor names, e.g.
``model.layers.0.self_attn.q_proj.qweight`` / ``.scales``) and ``release(unit_name, stream=None)``: the
``protocol.client.LoaderClient`` in the product, an in-process double in tests. Units are acquired in the
model's execution order (``layers.0`` … ``layers.{L-1}``, then ``lm_head`` when untied) once per forward, which
is the order the loader's ring expects. The hooks belong to ``model.unit_binder`` (a ``UnitBinder``): after a
forward that raised half-way (a second Ctrl-C, say), ``model.unit_binder.abandon_pass()`` releases what is held
and walks the remaining units, so the ring stays in step with the next forward.

This module knows nothing about processes or the loader's placement; it only calls ``acquire``/``release``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn
import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from compute.int4_linear import Int4Linear
from compute.kernels.activation import swiglu_mlp_forward
from compute.kernels.norm import FusedRMSNorm
from protocol.messages import Plan
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import QWEIGHT_SUFFIX, SCALES_SUFFIX, FormatError
from quantizer.model_spec import SUPPORTED_ARCHITECTURES

log = logging.getLogger(__name__)



class UnitWeights(Protocol):
    """Where the quantized Linears' weights come from: the loader client, or a test double."""

    plan: Plan | None  # the loader's plan in force (which units stream, its generation); None: nothing streams

    def acquire(self, unit: str, stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]: ...

    def release(self, unit: str, stream: torch.cuda.Stream | None = None) -> None: ...


def attention_implementation() -> str:
    """Flash-attention 2 when the package is importable, else PyTorch SDPA."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def load_config(checkpoint: QuantizedCheckpoint) -> PretrainedConfig:
    """The checkpoint's ``config.json`` as a transformers config, with the attention implementation chosen."""
    architecture = checkpoint.manifest.architecture
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"{checkpoint.path}: architecture {architecture!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    config = AutoConfig.from_pretrained(checkpoint.path)
    config._attn_implementation = attention_implementation()
    return config


def build_model(
    checkpoint: QuantizedCheckpoint,
    weights: UnitWeights,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    host_embedding: bool | None = None,
) -> nn.Module:
    """The checkpoint's model on ``device``, its quantized Linears fed by ``weights`` unit by unit.

    ``host_embedding``: keep the token embedding in host memory (``HostEmbedding``); by default on CUDA for an
    untied model, which is what the planner counts on. A tied model's embedding is its lm_head: never on the host.
    """
    device = torch.device(device)
    config = load_config(checkpoint)
    model_class = getattr(transformers, checkpoint.manifest.architecture)  # a SUPPORTED_ARCHITECTURES name
    with torch.device("meta"):
        model = model_class(config).to(dtype)  # on meta, the cast costs nothing
    unit_linears = _replace_linears(model, checkpoint)
    # An untied model's embedding stays in pinned host memory on CUDA (HostEmbedding): 1.5 GB of the 32B model's
    # budget goes to resident layers instead, and a decode step moves one 10 KB row across the bus.
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if host_embedding and tied:
        raise ValueError("a tied model's embedding is its lm_head: it cannot stay in host memory")
    if host_embedding is None:
        host_embedding = device.type == "cuda" and not tied
    embedding_name = _module_name(model, model.get_input_embeddings()) + ".weight"
    _assign_dense_tensors(model, checkpoint, device, dtype, on_host={embedding_name} if host_embedding else set())
    if host_embedding:
        model.set_input_embeddings(HostEmbedding(model.get_input_embeddings().weight, device))
    _rebuild_rotary_embedding(model, config, device)
    _check_materialized(model, checkpoint)
    if device.type == "cuda":
        _fuse_small_ops(model)
    model.unit_binder = UnitBinder(weights, device)
    for unit, linears in unit_linears.items():
        model.unit_binder.install(model, unit, linears)
    model.eval()
    model.requires_grad_(False)
    log.info(
        "built %s on %s (%s, %s attention): %d units, %d INT4 Linears",
        checkpoint.manifest.architecture,
        device,
        dtype,
        config._attn_implementation,
        len(unit_linears),
        sum(len(v) for v in unit_linears.values()),
    )
    return model


def _replace_linears(model: nn.Module, checkpoint: QuantizedCheckpoint) -> dict[str, tuple[Int4Linear, ...]]:
    """Swap every manifest-listed ``nn.Linear`` for an ``Int4Linear``; return unit name -> its Int4Linears."""
    units: dict[str, tuple[Int4Linear, ...]] = {}
    for unit in checkpoint.manifest.units:
        replaced = []
        for name in unit.linears:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, attr, None)
            if not isinstance(linear, nn.Linear):
                raise FormatError(
                    f"{checkpoint.path}: the manifest's unit {unit.name!r} lists {name!r}, which is not an nn.Linear "
                    f"of {checkpoint.manifest.architecture} (found {type(linear).__name__})"
                )
            int4 = Int4Linear.like(linear, name=name)
            setattr(parent, attr, int4)
            replaced.append(int4)
        units[unit.name] = tuple(replaced)
    return units


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _assign_dense_tensors(
    model: nn.Module, checkpoint: QuantizedCheckpoint, device: torch.device, dtype: torch.dtype,
    on_host: set[str] = frozenset(),
) -> None:  # fmt: skip
    """Put the checkpoint's dense tensors into the meta model by assignment: one copy, disk -> ``device``; the
    tensors named in ``on_host`` go to host memory instead (pinned for a CUDA ``device``; never through it)."""
    expected = model.state_dict().keys()
    state = {}
    for name in checkpoint.dense_tensor_names():
        if name not in expected:
            raise FormatError(
                f"{checkpoint.path}: tensor {name!r} has no place in {checkpoint.manifest.architecture} "
                "built from its config.json (is the checkpoint from another model?)"
            )
        if name in on_host:
            host = checkpoint.tensor(name).to(dtype=dtype)
            state[name] = host.pin_memory() if device.type == "cuda" else host
        else:
            state[name] = checkpoint.tensor(name).to(device=device, dtype=dtype)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys)
    if tied:
        # assign=True replaced the embedding Parameter, which broke the tie made at construction: make it again.
        model.lm_head.weight = model.get_input_embeddings().weight
        missing.discard("lm_head.weight")
    if missing:
        raise FormatError(f"{checkpoint.path}: the checkpoint has no tensor for {sorted(missing)}")


class HostEmbedding(nn.Module):
    """The token embedding of an untied model, kept in (pinned) host memory: looking tokens up gathers their rows
    on the host and copies them to ``device`` asynchronously, on the current stream.

    ``forward(input_ids)`` takes the ids on the host (the engine passes them so; ids on the device are fetched
    first, which waits for the device). The decode step does not call it: it copies the one row it needs into a
    static device buffer itself (``compute.decode_step.DecodeStep``), outside any captured graph. The rows are exact
    copies, so the model computes what it would with the embedding on the device.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device | str):
        super().__init__()
        if weight.is_cuda or weight.dim() != 2:
            raise ValueError(f"HostEmbedding needs a 2-D host tensor, got {tuple(weight.shape)} on {weight.device}")
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab, hidden], pinned when device is CUDA
        self.device = torch.device(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)
        rows = torch.empty(
            (ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=self.device.type == "cuda"
        )
        torch.index_select(self.weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, -1).to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, on the host, rows copied to {self.device}"


def _rebuild_rotary_embedding(model: nn.Module, config: PretrainedConfig, device: torch.device) -> None:
    # inv_freq is a non-persistent buffer: built on meta it has no values, and no checkpoint carries it.
    # Building a fresh module computes it exactly as transformers does (float32, from config.rope_parameters).
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)


def _fuse_small_ops(model: nn.Module) -> None:
    """Swap in the fused norm and SwiGLU kernels: at batch-1 decode HF's small kernels (six per RMSNorm, two per
    activation, 1-5 us each even in a replayed graph) are a large part of a token's time (docs/performance.md).

    The unit hooks sit on decoder layers and the lm_head, never on a norm or an MLP, so they are unaffected.
    """
    norms = [(name, module) for name, module in model.named_modules() if isinstance(module, Qwen2RMSNorm)]
    for name, norm in norms:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, FusedRMSNorm.like(norm))
    mlps = 0
    if model.config.hidden_act == "silu":  # the kernel is SiLU's: any other activation keeps HF's forward
        for module in model.modules():
            if isinstance(module, Qwen2MLP):
                module.forward = functools.partial(swiglu_mlp_forward, module)
                mlps += 1
    log.info("fused kernels: %d RMSNorms, %d MLP activations", len(norms), mlps)


def _check_materialized(model: nn.Module, checkpoint: QuantizedCheckpoint) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise FormatError(f"{checkpoint.path}: no values for {left} after loading the checkpoint")


def _unit_module(model: nn.Module, linears: tuple[Int4Linear, ...]) -> nn.Module:
    """The innermost module containing all of a unit's Linears (a decoder layer, or the lm_head itself)."""
    parts = [linear.name.split(".") for linear in linears]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return model.get_submodule(".".join(common))


class UnitBinder:
    """Binds each unit's weights around its module's forward, and knows where the current forward pass is.

    Every forward pass visits the units in execution order, each acquired before its module runs and released
    after; a unit visited out of that order is refused at once (the loader's ring would refuse it later, less
    clearly). ``abandon_pass`` brings an interrupted pass to its end without computing anything; ``skip`` passes
    resident units whose forward a replayed CUDA graph ran (no hooks run in a replay).
    """

    def __init__(self, weights: UnitWeights, device: torch.device):
        self.weights = weights
        self.device = device
        self.units: list[tuple[str, tuple[Int4Linear, ...]]] = []  # execution order
        self.next_unit = 0  # index in ``units`` of the unit the current pass visits next
        self.held: str | None = None  # the unit acquired and not yet released

    def install(self, model: nn.Module, unit: str, linears: tuple[Int4Linear, ...]) -> None:
        index = len(self.units)
        self.units.append((unit, linears))
        module = _unit_module(model, linears)
        module.register_forward_pre_hook(lambda _module, _args: self._bind(index))
        module.register_forward_hook(lambda _module, _args, _output: self._release(index))

    @property
    def in_pass(self) -> bool:
        """A forward pass has begun and not reached its end."""
        return self.next_unit != 0 or self.held is not None

    def abandon_pass(self) -> None:
        """Finish an interrupted forward pass with the loader: release the unit held, then acquire and release
        every unit the pass did not reach, so the next pass starts where the loader's ring expects it."""
        if self.held is not None:
            self._release(self.next_unit)
        while self.next_unit != 0:
            self._bind(self.next_unit)
            self._release(self.next_unit)

    def skip(self, units: Sequence[str]) -> None:
        """Advance the pass over ``units``, next in execution order, whose forward a replayed CUDA graph ran
        without hooks: they are resident, bound at capture to views whose addresses do not move while the plan
        holds, so there is nothing to acquire or release (the loader client's acquire and release of a resident
        unit are only a lookup). Refused, as ``_bind`` refuses, when they are not the units the pass is at."""
        for unit in units:
            expected = self.units[self.next_unit][0]
            if unit != expected or self.held is not None:
                raise RuntimeError(
                    f"a replayed graph passed unit {unit!r} out of order: the forward pass is at {expected!r}"
                    + (f" and {self.held!r} is still held" if self.held else "")
                )
            self.next_unit = (self.next_unit + 1) % len(self.units)

    @contextlib.contextmanager
    def bound(self, index: int) -> Iterator[None]:
        """Unit ``index`` acquired and its Linears bound inside the block, released after it: what the hooks do
        around a module's forward, for callers that run the unit's computation without calling the module."""
        self._bind(index)
        try:
            yield
        finally:
            self._release(index)

    def _stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _bind(self, index: int) -> None:
        unit, linears = self.units[index]
        if index != self.next_unit or self.held is not None:
            expected = self.units[self.next_unit][0]
            raise RuntimeError(
                f"unit {unit!r} ran out of order: the forward pass is at {expected!r}"
                + (f" and {self.held!r} is still held" if self.held else "")
                + " (run the whole model, not a part of it)"
            )
        tensors = self.weights.acquire(unit, self._stream())
        self.held = unit
        for linear in linears:
            try:
                linear.bind(tensors[linear.name + QWEIGHT_SUFFIX], tensors[linear.name + SCALES_SUFFIX])
            except KeyError as e:
                raise RuntimeError(
                    f"the weights for unit {unit!r} have no tensor {e.args[0]!r} (got {sorted(tensors)})"
                ) from None

    def _release(self, index: int) -> None:
        unit, linears = self.units[index]
        for linear in linears:
            linear.unbind()
        self.weights.release(unit, self._stream())
        self.held = None
        self.next_unit = (index + 1) % len(self.units)
