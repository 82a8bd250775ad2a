"""Reading a spillover-int4 model directory: manifest, config, tensors, and verification against the manifest.

Both processes read through this class: the loader takes the quantized Linears (``qweight``/``scales``), the
compute process takes everything else (embeddings, norms, biases). Nothing here allocates device memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quantizer.format import (
    QWEIGHT_SUFFIX,
    SCALES_SUFFIX,
    FormatError,
    Manifest,
    TensorEntry,
    read_manifest,
    sha256_file,
)

# safetensors dtype strings <-> torch dtypes, for the dtypes this format stores.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def tensor_view(unit_bytes: torch.Tensor, offset: int, nbytes: int, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The tensor stored at ``offset`` (``nbytes`` bytes, safetensors ``dtype``, ``shape``) of a unit's uint8 bytes,
    as a typed view (no copy): how the arena, the pool's client and the tests read a unit's tensors."""
    return unit_bytes[offset : offset + nbytes].view(SAFETENSORS_DTYPES[dtype]).view(tuple(shape))


class QuantizedCheckpoint:
    """A spillover-int4 model directory, opened read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FormatError(f"{self.path} is not a directory")
        self.manifest: Manifest = read_manifest(self.path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FormatError(f"{self.path} has no config.json")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except ValueError as e:
            raise FormatError(f"{config_path} is not valid JSON: {e}") from None
        self._entries = {t.name: t for t in self.manifest.tensors}

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise FormatError(f"{self.path}: tensor {name!r} is not in the manifest") from None

    def has(self, name: str) -> bool:
        return name in self._entries

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (a CPU tensor)."""
        entry = self.entry(name)
        with safe_open(self.path / entry.file, framework="pt") as f:
            return f.get_tensor(name)

    @cached_property
    def quantized_tensor_names(self) -> frozenset[str]:
        return frozenset(m + s for m in self.manifest.linears for s in (QWEIGHT_SUFFIX, SCALES_SUFFIX))

    def dense_tensor_names(self) -> list[str]:
        """Every stored tensor that is not part of a quantized Linear weight (embeddings, norms, biases)."""
        return [t.name for t in self.manifest.tensors if t.name not in self.quantized_tensor_names]

    def verify(self, checksums: bool = True) -> None:
        """Raise ``FormatError`` naming the first problem: a shard missing, of the wrong size or corrupt (sha256),
        a tensor not in its shard as the manifest describes it, or a quantized Linear without its two tensors."""
        for shard in self.manifest.shards:
            shard_path = self.path / shard.file
            if not shard_path.is_file():
                raise FormatError(f"shard {shard_path} is missing")
            size = os.path.getsize(shard_path)
            if size != shard.nbytes:
                raise FormatError(f"shard {shard_path} has {size} bytes, the manifest says {shard.nbytes}")
            if checksums and sha256_file(shard_path) != shard.sha256:
                raise FormatError(f"shard {shard_path} does not match its sha256 in the manifest")
        names = {shard.file for shard in self.manifest.shards}
        for t in self.manifest.tensors:
            if t.file not in names:
                raise FormatError(f"tensor {t.name!r} is in {t.file}, which is not a listed shard")
        for module in self.manifest.linears:
            for suffix in (QWEIGHT_SUFFIX, SCALES_SUFFIX):
                if not self.has(module + suffix):
                    raise FormatError(f"{self.path}: quantized Linear {module} has no tensor {module + suffix}")
        self._verify_headers()

    def _verify_headers(self) -> None:
        for shard in self.manifest.shards:
            shard_path = self.path / shard.file
            stored: dict[str, tuple[str, tuple[int, ...]]] = {}
            try:
                with safe_open(shard_path, framework="pt") as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        stored[name] = (piece.get_dtype(), tuple(piece.get_shape()))
            except SafetensorError as e:
                raise FormatError(f"shard {shard_path} is not a readable safetensors file ({e})") from None
            for t in self.manifest.tensors:
                if t.file != shard.file:
                    continue
                if t.name not in stored:
                    raise FormatError(f"tensor {t.name!r} is not in {shard_path}, though the manifest says so")
                if stored[t.name] != (t.dtype, t.shape):
                    raise FormatError(
                        f"tensor {t.name!r} in {shard_path} is {stored[t.name][0]} {stored[t.name][1]}, "
                        f"the manifest says {t.dtype} {t.shape}"
                    )
