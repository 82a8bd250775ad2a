"""What a model is made of, read from its ``config.json`` alone: parameters, Linears, and the units they form.

The model is built on the meta device (no memory, no weights), and its ``nn.Linear`` modules are found by type,
never by matching names. Linears are grouped into units in execution order (docs/architecture.md, "Units"): one
per decoder layer, then ``lm_head`` when it is not tied to the embedding. Quantizing and synthesizing both start
from the ``ModelSpec`` built here, so the two always agree on which tensors a model has.

The facts both processes derive from a config are defined here once: ``head_dim``, ``kv_heads`` and
``kv_cache_nbytes`` (the loader's planner counts the KV cache with it, compute allocates it), and
``SUPPORTED_ARCHITECTURES``. They take a ``config.json`` dict or a transformers config alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from quantizer.format import BLOCK_SIZE, UnitEntry

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)  # transformers class names the format and compute support
BF16_BYTES = 2


def _field(config: Mapping | object, name: str):
    """``config[name]`` of a config.json dict, or the attribute of a transformers config; None when absent."""
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def head_dim(config: Mapping | object) -> int:
    """Elements of one attention head: ``head_dim`` when the config names it, else hidden_size / heads."""
    return _field(config, "head_dim") or _field(config, "hidden_size") // _field(config, "num_attention_heads")


def kv_heads(config: Mapping | object) -> int:
    """Key/value heads: ``num_key_value_heads``, else as many as query heads (no grouping)."""
    return _field(config, "num_key_value_heads") or _field(config, "num_attention_heads")


def kv_cache_nbytes(config: Mapping | object, max_context: int, itemsize: int = BF16_BYTES) -> int:
    """Bytes of a static KV cache for ``max_context`` tokens: keys and values, every layer, every KV head
    (2 x layers x kv_heads x head_dim x max_context x itemsize). The loader's planner counts this, and compute
    allocates it."""
    return 2 * _field(config, "num_hidden_layers") * kv_heads(config) * head_dim(config) * max_context * itemsize


class UnsupportedModelError(ValueError):
    """The config describes a model this format cannot hold; the message says why and what is supported."""


ROLES = ("linear", "embedding", "norm", "bias")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParameterSpec:
    name: str  # the parameter's name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    role: str  # one of ROLES, from the owning module's type: "linear" is a quantized nn.Linear weight

    @property
    def linear(self) -> bool:
        return self.role == "linear"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    architecture: str  # config.architectures[0]
    tied: bool  # lm_head shares the embedding's weight (tie_word_embeddings): it is neither stored nor a unit
    parameters: tuple[ParameterSpec, ...]  # every stored parameter, in module (execution) order
    units: tuple[UnitEntry, ...]  # the quantized Linears grouped by unit, in execution order


def describe_model(config: dict) -> ModelSpec:
    """Build the model of ``config`` (a parsed config.json) on the meta device and describe it.

    Raises ``UnsupportedModelError`` for an architecture other than those in ``SUPPORTED_ARCHITECTURES`` and
    for a Linear whose input size is not a multiple of the block size.
    """
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r} in config.json: "
            f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # Imported here: transformers takes seconds to import and only this step needs it.
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        hf_config = AutoConfig.for_model(config.get("model_type", "qwen2"), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as e:  # unknown model_type, missing or mistyped fields
        # transformers' messages can list hundreds of model types: keep the first sentence.
        reason = str(e).strip().split(". ")[0][:200] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"config.json does not describe a buildable {architecture}: {reason}") from None
    if type(model).__name__ != architecture:
        raise UnsupportedModelError(
            f"config.json names {architecture} but its model_type {config.get('model_type')!r} builds "
            f"{type(model).__name__}; supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    module_names = {id(module): name for name, module in model.named_modules()}
    units: list[UnitEntry] = []
    claimed: set[str] = set()
    for index, layer in enumerate(model.model.layers):
        prefix = module_names[id(layer)]
        linears = tuple(
            f"{prefix}.{name}" for name, module in layer.named_modules() if isinstance(module, nn.Linear)
        )
        units.append(UnitEntry(name=f"layers.{index}", linears=linears))
        claimed.update(linears)
    lm_head = model.get_output_embeddings()
    lm_head_name = module_names[id(lm_head)]
    if not tied:
        units.append(UnitEntry(name="lm_head", linears=(lm_head_name,)))
        claimed.add(lm_head_name)

    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (tied and name == lm_head_name):
            continue
        if name not in claimed:
            raise UnsupportedModelError(f"Linear {name} belongs to no decoder layer and is not the lm_head")
        if module.in_features % BLOCK_SIZE:
            raise UnsupportedModelError(
                f"Linear {name} has in_features={module.in_features}, not a multiple of the block size "
                f"{BLOCK_SIZE}: this format cannot hold it"
            )

    parameters: list[ParameterSpec] = []
    seen: set[int] = set()  # a tied weight is listed once, under the embedding that owns it first
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}"
            parameters.append(ParameterSpec(name=name, shape=tuple(param.shape), role=_role(module, param_name, name)))
    return ModelSpec(architecture=architecture, tied=tied, parameters=tuple(parameters), units=tuple(units))


def _role(module: nn.Module, param_name: str, name: str) -> str:
    """What a parameter is, from the type of the module holding it (never from its name's wording)."""
    if isinstance(module, nn.Linear):
        return "linear" if param_name == "weight" else "bias"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if param_name == "weight" and type(module).__name__.endswith("Norm"):
        return "norm"
    raise UnsupportedModelError(
        f"parameter {name} of a {type(module).__name__} is neither a Linear, an embedding nor a norm"
    )
