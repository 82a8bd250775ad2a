"""Writing a spillover-int4 directory: safetensors shards streamed tensor by tensor, then the manifest, atomically.

Memory stays bounded by the piece being written: every shard's layout is planned before any data exists (the
output names, dtypes and shapes follow from the model's config), so each shard's safetensors header is written
first and the tensors' bytes are appended as they are produced, hashed on the way. Nothing here holds a shard.

``staged_directory`` gives the atomicity: everything is written into a hidden directory beside the destination,
which is renamed into place only when complete, so an interrupted run never leaves a directory that looks valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from quantizer.checkpoint import SAFETENSORS_DTYPES
from quantizer.format import (
    BLOCK_SIZE,
    MANIFEST_NAME,
    QWEIGHT_SUFFIX,
    SCALES_SUFFIX,
    Manifest,
    ShardEntry,
    TensorEntry,
    UnitEntry,
)

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# The safetensors header is padded with spaces so that the data starts 8-byte aligned, as safetensors does.
HEADER_ALIGN = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannedShard:
    file: str  # file name inside the model directory
    tensors: tuple[PlannedTensor, ...]  # in the order they are written

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def linear_group(module: str, out_features: int, in_features: int) -> list[PlannedTensor]:
    """The two stored tensors of one quantized Linear, qweight first."""
    return [
        PlannedTensor(name=module + QWEIGHT_SUFFIX, dtype="U8", shape=(out_features, in_features // 2)),
        PlannedTensor(name=module + SCALES_SUFFIX, dtype="BF16", shape=(out_features, in_features // BLOCK_SIZE)),
    ]


def plan_shards(groups: Sequence[Sequence[PlannedTensor]], shard_bytes: int) -> tuple[PlannedShard, ...]:
    """Lay groups of tensors out in shards of at most ``shard_bytes`` of data, in order.

    A group (a Linear's qweight and scales) never straddles two shards; a single group larger than
    ``shard_bytes`` gets a shard of its own.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    shards: list[list[PlannedTensor]] = [[]]
    filled = 0
    for group in groups:
        size = sum(t.nbytes for t in group)
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].extend(group)
        filled += size
    count = len(shards)
    return tuple(
        PlannedShard(file=f"model-{i + 1:05d}-of-{count:05d}.safetensors", tensors=tuple(tensors))
        for i, tensors in enumerate(shards)
    )


def _header_bytes(shard: PlannedShard) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text


class ShardWriter:
    """Writes planned shards into ``directory``, tensor by tensor in plan order.

    A tensor may be written whole or in consecutive pieces along its first dimension (rows), so that no caller
    needs to hold a large tensor at once; the next tensor starts when the current one's rows are complete.
    """

    def __init__(self, directory: Path, shards: Sequence[PlannedShard]):
        self.directory = directory
        self._queue = [(shard, t) for shard in shards for t in shard.tensors]
        self._position = 0
        self._rows_written = 0
        self._file = None
        self._digest = None
        self._done: list[ShardEntry] = []

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append ``piece``: the whole tensor ``name``, or its next rows."""
        if self._position >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} written after every planned tensor")
        shard, planned = self._queue[self._position]
        dtype = TORCH_TO_SAFETENSORS.get(piece.dtype)
        whole = tuple(piece.shape) == planned.shape and self._rows_written == 0
        rows_fit = (
            piece.dim() == len(planned.shape) >= 1
            and tuple(piece.shape[1:]) == planned.shape[1:]
            and self._rows_written + piece.shape[0] <= planned.shape[0]
        )
        if name != planned.name or dtype != planned.dtype or not (whole or rows_fit):
            raise RuntimeError(
                f"writer expected {planned.name} {planned.dtype} {planned.shape} (rows {self._rows_written} done), "
                f"got {name} {dtype} {tuple(piece.shape)}"
            )
        if self._file is None:
            self._open(shard)
        data = memoryview(piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        self._file.write(data)
        self._digest.update(data)
        self._rows_written += piece.shape[0] if planned.shape else 1
        if self._rows_written < (planned.shape[0] if planned.shape else 1):
            return
        self._position += 1
        self._rows_written = 0
        if self._position == len(self._queue) or self._queue[self._position][0] is not shard:
            self._close(shard)

    def _open(self, shard: PlannedShard) -> None:
        self._file = open(self.directory / shard.file, "wb")
        self._digest = hashlib.sha256()
        header = _header_bytes(shard)
        self._file.write(header)
        self._digest.update(header)

    def _close(self, shard: PlannedShard) -> None:
        self._file.close()
        self._file = None
        path = self.directory / shard.file
        self._done.append(ShardEntry(file=shard.file, nbytes=os.path.getsize(path), sha256=self._digest.hexdigest()))

    def finish(self) -> tuple[tuple[ShardEntry, ...], tuple[TensorEntry, ...]]:
        """The shard and tensor entries of the manifest; raises if a planned tensor was never written."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1].name
            raise RuntimeError(f"{len(self._queue) - self._position} planned tensors were not written, first {missing}")
        tensors = tuple(
            TensorEntry(name=t.name, dtype=t.dtype, shape=t.shape, file=shard.file) for shard, t in self._queue
        )
        return tuple(self._done), tensors

    def close(self) -> None:
        """Close an open file after a failure (the staged directory is then removed)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def planned_file_bytes(shards: Sequence[PlannedShard]) -> int:
    """Bytes the planned shards will take on disk, headers included."""
    return sum(len(_header_bytes(s)) + s.data_bytes for s in shards)


class ModelWriteError(Exception):
    """The destination cannot be written (exists, no space, no permission); the message says what to do."""


def check_destination(dst: Path, *, overwrite: bool, needed_bytes: int) -> None:
    """Refuse an existing ``dst`` without ``overwrite``, and a file system with less than ``needed_bytes`` free."""
    if dst.exists() and not overwrite:
        raise ModelWriteError(f"{dst} already exists: choose another destination or pass --overwrite")
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise ModelWriteError(
            f"not enough space for {dst}: the model needs {needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )


def write_model_directory(
    dst: Path,
    *,
    overwrite: bool,
    shards: Sequence[PlannedShard],
    architecture: str,
    source: str,
    units: tuple[UnitEntry, ...],
    write_tensors: Callable[[ShardWriter], None],
    write_files: Callable[[Path], None],
) -> Path:
    """Write a complete model directory at ``dst``, atomically.

    ``write_tensors`` gets a ``ShardWriter`` for ``shards`` and must write every planned tensor; ``write_files``
    gets the staging directory and adds config, generation config and tokenizer files. The manifest comes last.
    Operating-system failures become ``ModelWriteError`` (no space left, permission denied), naming ``dst``.
    """
    try:
        with staged_directory(dst, overwrite=overwrite) as staging:
            writer = ShardWriter(staging, shards)
            try:
                write_tensors(writer)
            finally:
                writer.close()
            shard_entries, tensor_entries = writer.finish()
            write_files(staging)
            manifest = Manifest(
                architecture=architecture, source=source, units=units, tensors=tensor_entries, shards=shard_entries
            )
            (staging / MANIFEST_NAME).write_text(manifest.to_json())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelWriteError(
                f"no space left on the device while writing {dst}: free some space and retry"
            ) from None
        raise ModelWriteError(f"writing {dst} failed: {e.strerror or e} ({e.filename or dst})") from None
    return dst


@contextlib.contextmanager
def staged_directory(dst: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``dst``; on success it replaces ``dst``, on failure it is removed."""
    if dst.exists() and not overwrite:
        raise ModelWriteError(f"{dst} already exists: choose another destination or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary one
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dst.exists():
        # Move the old directory aside first, so that a crash between the two renames loses nothing.
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(staging, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dst)
