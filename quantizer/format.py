"""The spillover-int4 format, version 1: the one definition of the quantized math and of the directory.

Every reader and kernel in the project is held to the functions here. The math:

* blocks are ``BLOCK_SIZE`` (128) consecutive elements of one row of a row-major ``[out, in]`` weight;
* ``absmax`` is taken in float32; ``scale = bf16(absmax / 7)``, and 1.0 where ``absmax`` is 0;
* ``q = clamp(round_half_even(w_f32 / scale_f32), -8, 7)`` where ``scale_f32`` is the bf16 scale widened;
* byte ``j`` of a packed row holds element ``2j`` in its high nibble and ``2j + 1`` in its low nibble,
  each a 4-bit two's complement number;
* the dequantized value is ``q * scale``.

A quantized model is a directory holding the source's ``config.json`` (plus ``generation_config.json`` and
the tokenizer files), safetensors shards, and ``spillover.json``, the manifest described by ``Manifest``.
For each ``nn.Linear`` weight ``X.weight`` of shape ``[out, in]`` the shards hold ``X.qweight`` (uint8,
``[out, in / 2]``) and ``X.scales`` (bfloat16, ``[out, in / 128]``); every other tensor is stored unchanged.

This module knows nothing about processes, devices or models; it must stay importable without a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

FORMAT_NAME = "spillover-int4"
FORMAT_VERSION = 1
BLOCK_SIZE = 128
MANIFEST_NAME = "spillover.json"
QWEIGHT_SUFFIX = ".qweight"
SCALES_SUFFIX = ".scales"
QMIN, QMAX = -8, 7


class FormatError(ValueError):
    """A tensor or directory does not follow the spillover-int4 format; the message says what and where."""


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise FormatError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if w.shape[1] % BLOCK_SIZE:
        raise FormatError(
            f"weight of shape {tuple(w.shape)}: in={w.shape[1]} is not a multiple of the block size {BLOCK_SIZE}"
        )


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [..., n] (n even) -> uint8 [..., n / 2]; element 2j in the high nibble."""
    if q.shape[-1] % 2:
        raise FormatError(f"pack_nibbles needs an even last dimension, got shape {tuple(q.shape)}")
    nib = q.to(torch.int16) & 0xF  # two's complement nibble
    return ((nib[..., 0::2] << 4) | nib[..., 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m] -> int8 [..., 2m] in [-8, 7]; the inverse of ``pack_nibbles``."""
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_nibbles needs uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    hi = p >> 4
    lo = p & 0xF
    both = torch.stack((hi, lo), dim=-1).flatten(-2)  # [..., 2m], element 2j = high nibble of byte j
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (qweight uint8 [out, in / 2], scales bfloat16 [out, in / 128]).

    Runs on whatever device ``w`` is on; the result is bit-identical on CPU and GPU.
    """
    _check_weight(w)
    out_features, in_features = w.shape
    # A private float32 copy, divided, rounded and clamped in place: the caller's tensor is never modified and
    # the temporaries stay at a few bytes per element (quantize_checkpoint's memory bound depends on it).
    blocks = w.to(torch.float32, copy=True).reshape(out_features, in_features // BLOCK_SIZE, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=-1)  # (out, in / 128) float32
    scales = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 7).to(torch.bfloat16)
    q = blocks.div_(scales.to(torch.float32).unsqueeze(-1)).round_().clamp_(QMIN, QMAX)  # round_: half to even
    return pack_nibbles(q.reshape(out_features, in_features)), scales


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(qweight uint8 [out, in / 2], scales bf16 [out, in / 128]) -> [out, in] weight in ``dtype``.

    The product ``q * scale`` is exact in float32 (a 4-bit integer times a bf16), then rounded to ``dtype``.
    """
    out_features, half_in = qweight.shape
    if scales.shape != (out_features, half_in * 2 // BLOCK_SIZE) or (half_in * 2) % BLOCK_SIZE:
        raise FormatError(
            f"qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not describe one weight "
            f"(expected scales of shape ({out_features}, {half_in * 2 // BLOCK_SIZE}))"
        )
    # A byte -> (high, low) table lookup: the same integers as unpack_nibbles, several times faster on CPU,
    # where this is the INT4 Linear's whole cost.
    table = _byte_to_nibble_pair(qweight.device)
    w = torch.nn.functional.embedding(qweight.to(torch.int32), table).reshape(out_features, -1, BLOCK_SIZE)
    w.mul_(scales.to(torch.float32).unsqueeze(-1))
    return w.reshape(out_features, half_in * 2).to(dtype)


_NIBBLE_TABLES: dict[torch.device, torch.Tensor] = {}


def _byte_to_nibble_pair(device: torch.device) -> torch.Tensor:
    """float32 [256, 2]: row b holds the two signed nibbles of byte b, high first (``unpack_nibbles``)."""
    table = _NIBBLE_TABLES.get(device)
    if table is None:
        table = unpack_nibbles(torch.arange(256, dtype=torch.uint8).unsqueeze(-1)).to(torch.float32).to(device)
        _NIBBLE_TABLES[device] = table
    return table


def quantized_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of one quantized Linear weight: packed nibbles plus bf16 scales."""
    return out_features * in_features // 2 + out_features * (in_features // BLOCK_SIZE) * 2


def sha256_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
    name: str  # the tensor's name in its shard, e.g. "model.layers.0.self_attn.q_proj.qweight"
    dtype: str  # safetensors dtype string: "U8", "BF16", "F32", ...
    shape: tuple[int, ...]
    file: str  # shard file name, relative to the model directory


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardEntry:
    file: str  # shard file name, relative to the model directory
    nbytes: int  # file size in bytes
    sha256: str  # hex digest of the whole file


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitEntry:
    """A group of Linears that is placed and streamed as one piece: one decoder layer, or the lm_head."""

    name: str  # "layers.0" ... "layers.{L-1}", "lm_head"
    linears: tuple[str, ...]  # module names of its nn.Linears, e.g. "model.layers.0.self_attn.q_proj"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """Contents of ``spillover.json``."""

    architecture: str  # the source config's architectures[0], e.g. "Qwen2ForCausalLM"
    source: str  # where the weights came from: a repo id, a path, or "synthetic:<preset>"
    units: tuple[UnitEntry, ...]  # every quantized nn.Linear, grouped by unit, in execution order
    tensors: tuple[TensorEntry, ...]
    shards: tuple[ShardEntry, ...]
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    block_size: int = BLOCK_SIZE

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT_NAME:
                raise FormatError(f"{where}: format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
            if raw.get("version") != FORMAT_VERSION:
                raise FormatError(f"{where}: version {raw.get('version')!r} is not supported (only {FORMAT_VERSION})")
            if raw.get("block_size") != BLOCK_SIZE:
                raise FormatError(f"{where}: block size {raw.get('block_size')!r} is not supported (only {BLOCK_SIZE})")
            return cls(
                architecture=str(raw["architecture"]),
                source=str(raw["source"]),
                units=tuple(UnitEntry(name=u["name"], linears=tuple(u["linears"])) for u in raw["units"]),
                tensors=tuple(
                    TensorEntry(name=t["name"], dtype=t["dtype"], shape=tuple(t["shape"]), file=t["file"])
                    for t in raw["tensors"]
                ),
                shards=tuple(
                    ShardEntry(file=s["file"], nbytes=int(s["nbytes"]), sha256=s["sha256"]) for s in raw["shards"]
                ),
            )
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{where} is not a valid spillover manifest: {e!r}") from None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for unit in self.units for name in unit.linears)

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise FormatError(f"tensor {name!r} is not in the manifest")


def read_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{model_dir} is not a spillover-int4 model: {MANIFEST_NAME} is missing")
    return Manifest.from_json(path.read_text(), where=str(path))
