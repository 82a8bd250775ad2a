"""``quantize_checkpoint``: a Hugging Face safetensors checkpoint (or a GGUF file, handed to
``quantizer.gguf_import``) -> a spillover-int4 directory, streamed.

Host memory stays bounded whatever the model's size: tensors are read in pieces of a few MB (``CHUNK_BYTES``)
(a few rows at a time, each through a fresh ``safe_open`` so no mapping of a multi-GB shard stays resident),
quantized (on the GPU when there is one), and appended to output shards whose layout was planned up front
(``quantizer.writer``). Every input is checked before anything is written, and every problem a person can
fix raises ``QuantizeError`` with one line saying what is wrong and where.

This module reads checkpoints and writes the format; it never builds a real model or touches the loader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from quantizer import format as fmt
from quantizer.checkpoint import SAFETENSORS_DTYPES
from quantizer.devices import resolve_device
from quantizer.model_spec import ModelSpec, UnsupportedModelError, describe_model
from quantizer.writer import (
    ModelWriteError,
    PlannedTensor,
    ShardWriter,
    check_destination,
    linear_group,
    plan_shards,
    planned_file_bytes,
    write_model_directory,
)

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# Copied unchanged next to the weights: the config and everything a tokenizer may consist of.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face repo id: Org/Name
# Source bytes read, quantized and written as one piece: bounds the memory a tensor of any size needs (quantizing
# a piece takes several times its bf16 size in float32 temporaries: ~20 MB here, measured by the peak-RSS test).
CHUNK_BYTES = 2 << 20
# On CUDA the float32 temporaries live in device memory, so host memory holds only the piece itself: larger pieces
# cost no more host memory than the CPU's small ones plus their temporaries, and save per-piece overhead.
CUDA_CHUNK_BYTES = 32 << 20


class QuantizeError(Exception):
    """An input or environment problem a person can fix; the message is one line naming the file or value."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceTensor:
    """One tensor of the source checkpoint, as its shard's header describes it."""

    file: str  # shard file name inside the checkpoint directory
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def resolve_source(src: str | Path) -> tuple[Path, str]:
    """(local checkpoint directory, the source's name for the manifest); downloads a Hub repo id first."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QuantizeError(
                f"{path} is neither a directory nor a GGUF file: SRC must be a checkpoint directory, a .gguf file "
                "or a repo id"
            )
        return path, str(path.resolve())
    if not REPO_ID.fullmatch(str(src)):
        raise QuantizeError(f"{src} does not exist, and is not a Hugging Face repo id of the form Org/Name")
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face Hub", src)
    try:
        local = snapshot_download(repo_id=str(src), allow_patterns=["*.safetensors", INDEX_NAME, *COPIED_FILES])
    except Exception as e:  # the hub raises many types (offline, missing repo, auth, HTTP): all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantizeError(
            f"could not download {src} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            f"check the repo id and the network, or pass a local checkpoint directory"
        ) from None
    return Path(local), str(src)


def _read_config(src_dir: Path) -> dict:
    path = src_dir / "config.json"
    if not path.is_file():
        raise QuantizeError(f"{src_dir} has no config.json: it is not a Hugging Face checkpoint directory")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise QuantizeError(f"{path} is not valid JSON: {e}") from None


def _shard_files(src_dir: Path) -> tuple[dict[str, str] | None, list[str]]:
    """(the index's tensor -> file map or None, the safetensors files holding the weights)."""
    index_path = src_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise QuantizeError(f"{index_path} is not a valid safetensors index ({e!r})") from None
        for file in files:
            if not (src_dir / file).is_file():
                raise QuantizeError(f"shard {src_dir / file} named by {INDEX_NAME} is missing")
        return weight_map, files
    files = sorted(p.name for p in src_dir.glob("*.safetensors"))
    if files:
        return None, files
    others = sorted({p.name for pattern in OTHER_WEIGHT_PATTERNS for p in src_dir.glob(pattern)})
    ggufs = [name for name in others if name.endswith(".gguf")]
    if ggufs:
        raise QuantizeError(f"{src_dir} holds no safetensors weights but a GGUF file: pass the file itself, "
                            f"e.g. {src_dir / ggufs[0]}")  # fmt: skip
    if others:
        raise QuantizeError(
            f"{src_dir} holds no safetensors weights, only {', '.join(others)}: only safetensors checkpoints "
            f"are supported (convert it, e.g. load it with transformers and save_pretrained)"
        )
    raise QuantizeError(f"{src_dir} holds no model weights (no *.safetensors and no {INDEX_NAME})")


def read_source_tensors(src_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint by name, from the shards' headers only (no tensor data is read)."""
    weight_map, files = _shard_files(src_dir)
    tensors: dict[str, SourceTensor] = {}
    for file in files:
        try:
            with safe_open(src_dir / file, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    tensors.setdefault(
                        name, SourceTensor(file=file, dtype=piece.get_dtype(), shape=tuple(piece.get_shape()))
                    )
        except SafetensorError as e:
            raise QuantizeError(f"shard {src_dir / file} is truncated or not a safetensors file ({e})") from None
    if weight_map is None:
        return tensors
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].file != file:
            raise QuantizeError(f"{INDEX_NAME} places tensor {name} in {file}, but {src_dir / file} does not hold it")
    return {name: tensors[name] for name in weight_map}


def _output_order(spec: ModelSpec, source: dict[str, SourceTensor]) -> list[str]:
    """Source tensor names in the order they are written: the model's parameters in execution order, then any
    tensor the model does not have as a parameter (a tied checkpoint's lm_head.weight, say), kept unchanged."""
    known = [p.name for p in spec.parameters]
    for name in known:
        if name not in source:
            raise QuantizeError(f"the checkpoint has no tensor {name}, which its config.json's model needs")
    extra = sorted(set(source) - set(known))
    if extra:
        log.info("keeping %d tensors that are not model parameters unchanged: %s", len(extra), ", ".join(extra))
    return known + extra


def _plan_outputs(spec: ModelSpec, source: dict[str, SourceTensor], order: list[str]) -> list[list[PlannedTensor]]:
    """The output tensors, grouped (a Linear's qweight and scales together), in ``order``."""
    expected = {p.name: p for p in spec.parameters}
    groups: list[list[PlannedTensor]] = []
    for name in order:
        tensor = source[name]
        if name in expected and tensor.shape != expected[name].shape:
            raise QuantizeError(f"tensor {name} has shape {tensor.shape}, config.json implies {expected[name].shape}")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise QuantizeError(f"tensor {name} has dtype {tensor.dtype}, which this format does not store")
        if name in expected and expected[name].linear:
            groups.append(linear_group(name.removesuffix(".weight"), *tensor.shape))
        else:
            groups.append([PlannedTensor(name=name, dtype=tensor.dtype, shape=tensor.shape)])
    return groups


def _row_pieces(
    path: Path, name: str, shape: tuple[int, ...], itemsize: int, chunk_bytes: int
) -> Iterator[torch.Tensor]:
    """Yield the tensor in consecutive row pieces of about ``chunk_bytes``, each read through a fresh mapping."""
    if len(shape) == 0:
        with safe_open(path, framework="pt") as f:
            yield f.get_tensor(name)
        return
    rows = max(1, chunk_bytes // max(1, itemsize * math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        with safe_open(path, framework="pt") as f:
            yield f.get_slice(name)[start : start + rows]


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    shard_bytes: int = 2 * 10**9,
    progress: bool = True,
) -> Path:
    """Quantize the checkpoint ``src`` (a directory, a GGUF file or a Hub repo id) into the spillover-int4
    directory ``dst``.

    Raises ``QuantizeError``, with one line for a person, for a bad source and when ``dst`` cannot be written
    (exists without ``overwrite``, no space left); ``dst`` is then left as it was.
    """
    from quantizer.gguf_import import is_gguf_file, quantize_gguf

    if is_gguf_file(src):
        return quantize_gguf(
            src, dst, device=device, overwrite=overwrite, shard_bytes=shard_bytes, progress=progress
        )
    dst = Path(dst).expanduser()
    try:
        check_destination(dst, overwrite=overwrite, needed_bytes=0)
    except ModelWriteError as e:
        raise QuantizeError(str(e)) from None
    try:
        torch_device = resolve_device(device)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    src_dir, source_name = resolve_source(src)
    config = _read_config(src_dir)
    try:
        spec = describe_model(config)
    except UnsupportedModelError as e:
        raise QuantizeError(f"{src_dir}: {e}") from None
    source = read_source_tensors(src_dir)
    order = _output_order(spec, source)
    shards = plan_shards(_plan_outputs(spec, source, order), shard_bytes)
    copied = [name for name in COPIED_FILES if (src_dir / name).is_file()]
    needed = planned_file_bytes(shards) + sum((src_dir / name).stat().st_size for name in copied)

    total_bytes = sum(t.nbytes for t in source.values())
    log.info("quantizing %s (%d tensors, %.2f GB) on %s into %s", source_name, len(source), total_bytes / 1e9,
             torch_device, dst)

    def write_tensors(writer: ShardWriter) -> None:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
            _write_tensors(writer, spec, source, order, src_dir, torch_device, bar)

    def write_files(staging: Path) -> None:
        for name in copied:
            shutil.copyfile(src_dir / name, staging / name)

    try:
        check_destination(dst, overwrite=overwrite, needed_bytes=needed)
        return write_model_directory(
            dst,
            overwrite=overwrite,
            shards=shards,
            architecture=spec.architecture,
            source=source_name,
            units=spec.units,
            write_tensors=write_tensors,
            write_files=write_files,
        )
    except ModelWriteError as e:
        raise QuantizeError(str(e)) from None


def _write_tensors(
    writer: ShardWriter,
    spec: ModelSpec,
    source: dict[str, SourceTensor],
    order: list[str],
    src_dir: Path,
    device: torch.device,
    bar: tqdm,
) -> None:
    linear_weights = {p.name for p in spec.parameters if p.linear}
    chunk_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    for done, name in enumerate(order, start=1):
        tensor = source[name]
        itemsize = SAFETENSORS_DTYPES[tensor.dtype].itemsize
        pieces = _row_pieces(src_dir / tensor.file, name, tensor.shape, itemsize, chunk_bytes)
        if name in linear_weights:
            module = name.removesuffix(".weight")
            scales = []
            for piece in pieces:
                qweight, piece_scales = fmt.quantize(piece.to(device))
                writer.write(module + fmt.QWEIGHT_SUFFIX, qweight)
                scales.append(piece_scales.cpu())  # 1/128 of the weight's bf16 size: fine to hold
                bar.update(piece.numel() * itemsize)
            writer.write(module + fmt.SCALES_SUFFIX, torch.cat(scales))
        else:
            for piece in pieces:
                writer.write(name, piece)
                bar.update(piece.numel() * itemsize)
        bar.set_postfix_str(f"tensors {done}/{len(order)}", refresh=False)
