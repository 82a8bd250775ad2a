"""``quantize_gguf``: a Qwen2 GGUF file (llama.cpp's format, any tensor type ``gguf`` can dequantize) -> a
spillover-int4 directory, tensor by tensor.

The file is read with the ecosystem's readers, never parsed by hand: ``gguf.GGUFReader`` for the tensor table
(name, type, shape, offset), ``gguf.quants.dequantize`` for the values, and transformers' GGUF support for the
config (``AutoConfig.from_pretrained(dir, gguf_file=...)``), the tokenizer with its chat template
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, its special tokens restored by
``quantizer.gguf_tokenizer``) and the GGUF -> Hugging Face tensor names (``get_gguf_hf_weights_map``).
Each tensor is dequantized in pieces of a few rows read with ``os.pread`` (no mapping of the file stays
resident), rounded to bf16, and then stored exactly as ``quantize_checkpoint`` stores a bf16 checkpoint:
Linears quantized to the format, everything else bf16. Importing a GGUF therefore gives the same bytes as
quantizing transformers' own bf16 conversion of that file. llama.cpp's converter permutes Q/K rows
for llama but not for qwen2, so qwen2 tensors are taken as they are (as transformers does for qwen2).

Everything is checked before anything is written: that the file holds every byte its header describes, the
architecture (qwen2 only), every tensor's type, the tensor names and shapes against the config. Every refusal is a
``QuantizeError`` of one line; the output is staged beside ``dst`` and renamed at the end (``quantizer.writer``).
``gguf`` is an optional dependency (``pip install 'spillover[gguf]'``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantizer import format as fmt
from quantizer.devices import resolve_device
from quantizer.gguf_tokenizer import load_gguf_tokenizer, read_tokenizer_fields
from quantizer.model_spec import ModelSpec, UnsupportedModelError, describe_model
from quantizer.quantize import CHUNK_BYTES, CUDA_CHUNK_BYTES, QuantizeError
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

GGUF_MAGIC = b"GGUF"
# GGUF's general.architecture -> the transformers class it is (one of model_spec.SUPPORTED_ARCHITECTURES).
GGUF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM"}
GGUF_MISSING = "reading GGUF files needs the gguf package: pip install 'spillover[gguf]' (or pip install gguf)"
# The config, tokenizer and generation files written beside the weights take well under this.
SIDE_FILES_BYTES = 50 * 10**6


def is_gguf_file(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFTensor:
    """One tensor of the file, as its header describes it, under its Hugging Face name."""

    name: str  # the Hugging Face parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    gguf_name: str  # the name in the file, e.g. "blk.0.attn_q.weight"
    qtype: int  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int  # bytes of data in the file
    shape: tuple[int, ...]  # Hugging Face order: (rows, columns) or (n,); GGUF lists it reversed

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if len(self.shape) == 2 else self.nbytes


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise QuantizeError(GGUF_MISSING) from None
    return gguf


def _open_reader(gguf, path: Path):
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, ...: all mean "not readable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        size = path.stat().st_size
        raise QuantizeError(
            f"{path} ({size} bytes) is not a readable GGUF file: truncated or damaged ({type(e).__name__}: {reason})"
        ) from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def open_checked(path: Path):
    """(the architecture, a ``gguf.GGUFReader`` of ``path``), refusing a file the reader cannot open (a truncated
    one: the reader maps every tensor the header lists), another architecture and an unsupported tensor type (one
    ``QuantizeError`` line each). Reads the header only."""
    gguf = _import_gguf()
    reader = _open_reader(gguf, path)
    architecture = _field(reader, "general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise QuantizeError(
            f"{path} is a GGUF of architecture {architecture!r}; only {', '.join(GGUF_ARCHITECTURES)} is supported"
        )
    for tensor in reader.tensors:
        if not _dequantizable(gguf, tensor.tensor_type):
            readable = [t.name for t in gguf.GGMLQuantizationType if _dequantizable(gguf, t)]
            raise QuantizeError(
                f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be dequantized "
                f"(supported: {', '.join(sorted(readable))})"
            )
    return architecture, reader


def _dequantizable(gguf, qtype) -> bool:
    """Whether ``gguf.quants.dequantize`` handles ``qtype``: tried on one block of zeros."""
    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _read_config(path: Path, architecture: str) -> dict:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for metadata it cannot use
        raise QuantizeError(f"{path}: transformers cannot read its config ({type(e).__name__}: {e})") from None
    config_dict = config.to_dict()
    config_dict["architectures"] = [GGUF_ARCHITECTURES[architecture]]
    config_dict["dtype"] = "bfloat16"
    config_dict.pop("_model_name_or_path", None)
    return config_dict


def _map_names(path: Path, architecture: str, config: dict, tensors: list, spec: ModelSpec) -> list[GGUFTensor]:
    """The file's tensors under their Hugging Face names, in the model's parameter order, shapes checked."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**config))
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    gguf_to_hf = get_gguf_hf_weights_map(model, processor)
    by_name: dict[str, GGUFTensor] = {}
    for tensor in tensors:
        hf_name = gguf_to_hf.get(tensor.name)
        if hf_name is None:
            log.info("skipping GGUF tensor %s: the model has no such parameter", tensor.name)
            continue
        by_name[hf_name] = GGUFTensor(
            name=hf_name, gguf_name=tensor.name, qtype=int(tensor.tensor_type), offset=int(tensor.data_offset),
            nbytes=int(tensor.n_bytes), shape=tuple(int(n) for n in reversed(tensor.shape)),
        )  # fmt: skip
    ordered = []
    for param in spec.parameters:
        found = by_name.get(param.name)
        if found is None:
            raise QuantizeError(f"{path} has no tensor for {param.name}, which its config's model needs")
        if found.shape != param.shape:
            raise QuantizeError(
                f"{path}: tensor {found.gguf_name} has shape {found.shape}, the config implies {param.shape}"
            )
        ordered.append(found)
    return ordered


def _pread(fd: int, nbytes: int, offset: int, tensor: GGUFTensor) -> np.ndarray:
    """``nbytes`` of the file from ``offset``, as a writable uint8 array (torch refuses read-only ones)."""
    buffer = bytearray(nbytes)
    if os.preadv(fd, [buffer], offset) != nbytes:
        raise QuantizeError(f"tensor {tensor.gguf_name} ends early: the file was shortened while being read")
    return np.frombuffer(buffer, dtype=np.uint8)


def _rows(fd: int, gguf, tensor: GGUFTensor, chunk_bytes: int):
    """Yield the tensor dequantized, as float32 pieces of consecutive rows (``chunk_bytes`` of bf16 at most)."""
    qtype = gguf.GGMLQuantizationType(tensor.qtype)
    if len(tensor.shape) == 1:
        raw = _pread(fd, tensor.nbytes, tensor.offset, tensor).reshape(1, -1)
        yield torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype))).reshape(tensor.shape)
        return
    rows, columns = tensor.shape
    step = max(1, chunk_bytes // (2 * columns))
    for start in range(0, rows, step):
        count = min(step, rows - start)
        raw = _pread(fd, count * tensor.row_bytes, tensor.offset + start * tensor.row_bytes, tensor)
        raw = raw.reshape(count, tensor.row_bytes)
        yield torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype))).reshape(count, columns)


def _generation_config(reader_fields: dict[str, object]):
    from transformers import GenerationConfig

    eos = [reader_fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if reader_fields.get(k) is not None]  # fmt: skip
    return GenerationConfig(
        bos_token_id=reader_fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=sorted(set(eos)) or None,
        pad_token_id=reader_fields.get("tokenizer.ggml.padding_token_id"),
    )


def quantize_gguf(
    src: str | Path,
    dst: str | Path,
    *,
    device: str = "auto",
    overwrite: bool = False,
    shard_bytes: int = 2 * 10**9,
    progress: bool = True,
) -> Path:
    """Import the Qwen2 GGUF file ``src`` into the spillover-int4 directory ``dst`` (weights, config, tokenizer
    with the file's chat template, generation config with its EOS). Raises ``QuantizeError`` (one line) for a
    file it cannot import and when ``dst`` cannot be written; ``dst`` is then left as it was."""
    path = Path(src).expanduser().resolve()
    dst = Path(dst).expanduser()
    try:
        check_destination(dst, overwrite=overwrite, needed_bytes=0)
        torch_device = resolve_device(device)
    except (ModelWriteError, ValueError) as e:
        raise QuantizeError(str(e)) from None
    gguf = _import_gguf()
    architecture, reader = open_checked(path)
    fields = read_tokenizer_fields(reader)
    reader_tensors = list(reader.tensors)
    del reader  # its mapping of the file; the tensors' data is read with pread below
    config = _read_config(path, architecture)
    try:
        spec = describe_model(config)
    except UnsupportedModelError as e:
        raise QuantizeError(f"{path}: {e}") from None
    tensors = _map_names(path, architecture, config, reader_tensors, spec)
    del reader_tensors
    try:
        tokenizer = load_gguf_tokenizer(path, fields)
    except Exception as e:  # as for the config: any failure means the file's tokenizer is unusable
        raise QuantizeError(f"{path}: transformers cannot read its tokenizer ({type(e).__name__}: {e})") from None

    groups = [
        linear_group(p.name.removesuffix(".weight"), *p.shape)
        if p.linear
        else [PlannedTensor(name=p.name, dtype="BF16", shape=p.shape)]
        for p in spec.parameters
    ]
    shards = plan_shards(groups, shard_bytes)
    log.info("importing %s (%d tensors) on %s into %s", path, len(tensors), torch_device, dst)
    chunk_bytes = CUDA_CHUNK_BYTES if torch_device.type == "cuda" else CHUNK_BYTES
    linear = {p.name for p in spec.parameters if p.linear}
    total = sum(math.prod(t.shape) for t in tensors)

    def write_tensors(writer: ShardWriter) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            with tqdm(total=total, unit="w", unit_scale=True, desc="import", disable=not progress) as bar:
                for tensor in tensors:
                    _write_tensor(writer, fd, gguf, tensor, tensor.name in linear, torch_device, chunk_bytes, bar)
        finally:
            os.close(fd)

    def write_files(staging: Path) -> None:
        from transformers import Qwen2Config

        Qwen2Config(**config).save_pretrained(staging)
        _generation_config(fields).save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    try:
        check_destination(dst, overwrite=overwrite, needed_bytes=planned_file_bytes(shards) + SIDE_FILES_BYTES)
        return write_model_directory(
            dst, overwrite=overwrite, shards=shards, architecture=spec.architecture, source=str(path),
            units=spec.units, write_tensors=write_tensors, write_files=write_files,
        )  # fmt: skip
    except ModelWriteError as e:
        raise QuantizeError(str(e)) from None


def _write_tensor(writer, fd, gguf, tensor: GGUFTensor, linear: bool, device, chunk_bytes: int, bar) -> None:
    """Dequantize, round to bf16 and write one tensor piece by piece (a Linear quantized to the format)."""
    module = tensor.name.removesuffix(".weight")
    scales = []
    for piece in _rows(fd, gguf, tensor, chunk_bytes):
        weights = piece.to(torch.bfloat16)
        if linear:
            qweight, piece_scales = fmt.quantize(weights.to(device))
            writer.write(module + fmt.QWEIGHT_SUFFIX, qweight)
            scales.append(piece_scales.cpu())
        else:
            writer.write(tensor.name, weights)
        bar.update(piece.numel())
    if linear:
        writer.write(module + fmt.SCALES_SUFFIX, torch.cat(scales))
