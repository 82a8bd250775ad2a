"""The pinned arena: every unit's bytes in ONE host allocation, read straight from the safetensors shards.

Layout: the units given to ``load``, back to back in that order, each laid out as its ``UnitLayout`` (so a
unit is one contiguous range and moving it to the device is one copy). The arena is a single anonymous
mmap (huge pages advised, so filling 16 GB does not take millions of page faults) and, with ``pin=True``, is
page-locked once with ``cudaHostRegister``: PyTorch's pinned allocator would round each allocation up to a
power of two, and pageable memory copies to the device at an eighth of the pinned rate (6.9 against 55 GB/s on the H200).

Filling reads each shard once, front to back: the safetensors header (8-byte little-endian length, then
JSON with every tensor's dtype, shape and data offsets), then each unit tensor's bytes ``readinto`` its
place in the arena, with no intermediate tensor. The bytes of other tensors (embedding, norms, biases,
which the compute process reads itself) are hashed in passing or skipped. Each tensor's dtype, shape and
byte count are checked against the layout, each shard's size against the manifest, and, unless
``verify_checksums=False``, each shard's sha256, computed while reading (no second pass). Shards are read
in parallel threads (file reads and hashing release the GIL). Every error names the file.

A CPU loader's arena holds the Linears in the CPU INT4 kernel's form (``protocol.cpu_kernel_form``):
``repacked_for_cpu_kernel`` builds it from the file-form arena once, at load time, unit by unit (for a moment both
are in memory), so that every later copy into the pool or a ring slot is a plain copy.

The arena never touches device memory beyond registering its own pages; the device pool copies from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from loader.layout import TensorSlot, UnitLayout, is_kernel_form
from protocol.cpu_kernel_form import pack_for_cpu_kernel
from quantizer.checkpoint import QuantizedCheckpoint, tensor_view
from quantizer.format import QWEIGHT_SUFFIX, SCALES_SUFFIX, FormatError

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 16 << 20  # one read + hash step; small enough to hash while still in cache
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
MAX_READ_THREADS = 8

Wanted = dict[str, tuple[str, TensorSlot]]  # tensor name -> (unit name, its slot): what to take from one shard


class PinnedArena:
    """Host memory holding every unit back to back; pinned for fast device copies when built with ``pin=True``."""

    def __init__(self, units: Sequence[UnitLayout], *, pin: bool):
        """An arena of the right size for ``units``, contents undefined; ``load`` is the usual way to get one."""
        self.units: dict[str, UnitLayout] = {u.name: u for u in units}
        if len(self.units) != len(units):
            raise ValueError(f"unit names repeat in {[u.name for u in units]}")
        self.offsets: dict[str, int] = {}  # unit name -> byte offset of the unit in the arena
        offset = 0
        for unit in units:
            self.offsets[unit.name] = offset
            offset += unit.nbytes
        self.nbytes = offset
        # an anonymous mapping of 0 bytes is an error; one page keeps an empty arena valid
        self._mmap = mmap.mmap(-1, max(self.nbytes, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._mmap.madvise(mmap.MADV_HUGEPAGE)
        self._buffer = memoryview(self._mmap)[: self.nbytes]
        self.data = torch.frombuffer(self._mmap, dtype=torch.uint8)[: self.nbytes]  # (nbytes,) uint8
        self.pinned = False
        if pin:
            self.pin()

    @classmethod
    def load(
        cls,
        checkpoint: QuantizedCheckpoint | str | Path,
        units: Sequence[UnitLayout],
        *,
        pin: bool,
        verify_checksums: bool,
        threads: int | None = None,
    ) -> "PinnedArena":
        """Read ``units`` of ``checkpoint`` into a new arena; raise ``FormatError`` naming the file on any mismatch.

        ``threads`` bounds how many shards are read at once (default: one per core, at most ``MAX_READ_THREADS``).
        """
        if not isinstance(checkpoint, QuantizedCheckpoint):
            checkpoint = QuantizedCheckpoint(checkpoint)
        wanted = _tensors_by_shard(checkpoint, units)
        for shard in checkpoint.manifest.shards:  # cheap checks before allocating gigabytes
            path = checkpoint.path / shard.file
            if not path.is_file():
                raise FormatError(f"shard {path} is missing")
            size = path.stat().st_size
            if size != shard.nbytes:
                raise FormatError(
                    f"shard {path} has {size} bytes, the manifest says {shard.nbytes}: truncated or replaced"
                )

        arena = cls(units, pin=False)
        start = time.perf_counter()
        shards = checkpoint.manifest.shards
        workers = max(1, min(threads or os.cpu_count() or 1, MAX_READ_THREADS, len(shards)))
        try:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="arena-read")
            try:
                futures = [
                    pool.submit(
                        arena._fill_from_shard,
                        checkpoint.path / shard.file,
                        wanted.get(shard.file, {}),
                        shard.sha256 if verify_checksums else None,
                    )
                    for shard in shards
                ]
                read = sum(f.result() for f in futures)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # after a failure, shards not yet started are not read
            seconds = time.perf_counter() - start
            log.info(
                "read %.2f GB from %d shards into a %.2f GB arena in %.2f s (%.2f GB/s, %d threads, checksums %s)",
                read / 1e9, len(shards), arena.nbytes / 1e9, seconds, read / 1e9 / max(seconds, 1e-9), workers,
                "verified" if verify_checksums else "not verified",
            )  # fmt: skip
            if pin:
                arena.pin()  # after filling: locking pages already present is cheaper than faulting them in locked
        except BaseException:
            arena.close()
            raise
        return arena

    def unit(self, name: str) -> torch.Tensor:
        """uint8 view of one unit's bytes, laid out as its ``UnitLayout``."""
        try:
            offset = self.offsets[name]
        except KeyError:
            raise KeyError(f"unit {name!r} is not in the arena; it holds {list(self.offsets)}") from None
        return self.data[offset : offset + self.units[name].nbytes]

    def repacked_for_cpu_kernel(self, kernel_units: Sequence[UnitLayout]) -> "PinnedArena":
        """A new (unpinned) arena laid out as ``kernel_units`` (``layout_units(..., cpu_kernel_form=True)`` of the same
        manifest), every Linear with a kernel form packed into it, the others copied as they are; closes this one."""
        start = time.perf_counter()
        repacked = PinnedArena(kernel_units, pin=False)
        try:
            for unit in kernel_units:
                for slot in unit.tensors:
                    if is_kernel_form(slot):
                        linear = slot.name.removesuffix(SCALES_SUFFIX)
                        source = self.units[unit.name]
                        packed, scales_and_zeros = pack_for_cpu_kernel(
                            self._tensor(source, linear + QWEIGHT_SUFFIX), self._tensor(source, slot.name)
                        )
                        repacked._tensor(unit, linear + QWEIGHT_SUFFIX).copy_(packed)
                        repacked._tensor(unit, slot.name).copy_(scales_and_zeros)
                    elif not _packed_with_its_scales(slot, unit):
                        repacked._tensor(unit, slot.name).copy_(self._tensor(self.units[unit.name], slot.name))
        except BaseException:
            repacked.close()
            raise
        self.close()
        log.info("repacked %.2f GB for the CPU INT4 kernel in %.2f s", repacked.nbytes / 1e9, time.perf_counter() - start)
        return repacked

    def _tensor(self, unit: UnitLayout, name: str) -> torch.Tensor:
        slot = unit.slot(name)
        return tensor_view(self.unit(unit.name), slot.offset, slot.nbytes, slot.dtype, slot.shape)
    def close(self) -> None:
        """Unpin and drop the memory (it is freed once no view of it remains); safe to call twice."""
        if self.pinned:
            code = int(torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr()))
            if code != 0:
                log.warning("cudaHostUnregister of the arena failed with CUDA error %d", code)
            self.pinned = False
        self._buffer.release()
        self.data = torch.empty(0, dtype=torch.uint8)
        self._mmap = None  # unmapped by the garbage collector once the last view is gone

    def __enter__(self) -> "PinnedArena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pin(self) -> None:
        """Page-lock the arena with one ``cudaHostRegister`` call (a no-op when already pinned)."""
        if self.pinned:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("cannot pin the weight arena: CUDA is not available (the CPU device does not pin)")
        if self.nbytes == 0:
            return
        start = time.perf_counter()
        code = int(torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), self.nbytes, 0))
        if code != 0:
            raise RuntimeError(
                f"could not pin the {self.nbytes / 1e9:.2f} GB weight arena (cudaHostRegister failed with CUDA error "
                f"{code}); check the locked-memory limit (ulimit -l) and free host memory"
            )
        self.pinned = True
        seconds = time.perf_counter() - start
        gb = self.nbytes / 1e9
        log.info("pinned %.2f GB in %.2f s (%.2f GB/s)", gb, seconds, gb / max(seconds, 1e-9))

    def _fill_from_shard(self, path: Path, wanted: Wanted, sha256: str | None) -> int:
        """Read one shard front to back, placing the ``wanted`` tensors (name -> (unit, slot)); returns bytes read
        (the whole file when hashing it, else the header and the wanted tensors)."""
        digest = hashlib.sha256() if sha256 is not None else None
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as f:
            prefix = _read_exact(f, 8, path, "the header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise FormatError(f"{path} is not a safetensors file: its header claims {header_len} bytes")
            header_bytes = _read_exact(f, header_len, path, "the header")
            if digest is not None:
                digest.update(prefix)
                digest.update(header_bytes)
            entries = _parse_header(header_bytes, path)
            data_start = 8 + header_len
            self._check_entries(entries, wanted, path, size - data_start)

            # bytes of other tensors pass through this buffer to be hashed; without hashing they are seeked over
            scratch = memoryview(bytearray(min(READ_CHUNK_BYTES, size))) if digest is not None else None
            position = 0  # bytes into the data section
            for begin, end, name in sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in entries.items()):
                if begin < position:
                    raise FormatError(f"{path}: tensor {name!r} (data_offsets {begin}..{end}) overlaps the one before it")
                _skip(f, begin - position, scratch, digest, path)
                if name in wanted:
                    unit, slot = wanted[name]
                    target_start = self.offsets[unit] + slot.offset
                    _read_into(f, self._buffer[target_start : target_start + slot.nbytes], digest, path)
                else:
                    _skip(f, end - begin, scratch, digest, path)
                position = end
            _skip(f, size - data_start - position, scratch, digest, path)
        if digest is not None and digest.hexdigest() != sha256:
            raise FormatError(f"shard {path} does not match its sha256 in the manifest: it is corrupt or was replaced")
        return size if digest is not None else data_start + sum(slot.nbytes for _, slot in wanted.values())

    @staticmethod
    def _check_entries(entries: dict, wanted: Wanted, path: Path, data_bytes: int) -> None:
        for name, (_, slot) in wanted.items():
            entry = entries.get(name)
            if entry is None:
                raise FormatError(f"{path} does not hold tensor {name!r}, which the manifest places there")
            begin, end = entry["data_offsets"]
            if entry["dtype"] != slot.dtype or tuple(entry["shape"]) != slot.shape or end - begin != slot.nbytes:
                raise FormatError(
                    f"{path}: tensor {name!r} is {entry['dtype']} {tuple(entry['shape'])} ({end - begin} bytes); "
                    f"the manifest says {slot.dtype} {slot.shape} ({slot.nbytes} bytes)"
                )
        for name, entry in entries.items():
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= data_bytes:
                raise FormatError(
                    f"{path}: tensor {name!r} has data_offsets {begin}..{end} outside the file's {data_bytes} data bytes"
                )


def _packed_with_its_scales(slot: TensorSlot, unit: UnitLayout) -> bool:
    """A ``qweight`` whose Linear's scales are in the kernel form: packed together with them."""
    if not slot.name.endswith(QWEIGHT_SUFFIX):
        return False
    return is_kernel_form(unit.slot(slot.name.removesuffix(QWEIGHT_SUFFIX) + SCALES_SUFFIX))


def _tensors_by_shard(checkpoint: QuantizedCheckpoint, units: Sequence[UnitLayout]) -> dict[str, Wanted]:
    """shard file -> {tensor name -> (unit name, slot)} for every tensor of ``units``."""
    shard_files = {s.file for s in checkpoint.manifest.shards}
    by_shard: dict[str, Wanted] = {}
    for unit in units:
        for slot in unit.tensors:
            file = checkpoint.entry(slot.name).file
            if file not in shard_files:
                raise FormatError(f"{checkpoint.path}: tensor {slot.name!r} is in {file}, which is not a listed shard")
            by_shard.setdefault(file, {})[slot.name] = (unit.name, slot)
    return by_shard


def _parse_header(header_bytes: bytes, path: Path) -> dict:
    try:
        header = json.loads(header_bytes)
        entries = {name: e for name, e in header.items() if name != "__metadata__"}
        for e in entries.values():
            begin, end = e["data_offsets"]
            if not all(isinstance(v, t) for v, t in ((begin, int), (end, int), (e["dtype"], str), (e["shape"], list))):
                raise ValueError(f"malformed tensor entry {e!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{path} has a malformed safetensors header: {e}") from None
    return entries


def _read_exact(f, nbytes: int, path: Path, what: str) -> bytes:
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise FormatError(f"{path} ends before {what} ({len(data)} of {nbytes} bytes): the file is truncated")
    return data


def _read_into(f, target: memoryview, digest, path: Path) -> None:
    """Fill ``target`` from ``f`` in chunks, hashing each chunk while it is still in cache."""
    done = 0
    while done < len(target):
        piece = target[done : done + READ_CHUNK_BYTES]
        got = f.readinto(piece)
        if not got:
            raise FormatError(f"{path} ends {len(target) - done} bytes early: the file is truncated")
        if digest is not None:
            digest.update(piece[:got])
        done += got


def _skip(f, nbytes: int, scratch: memoryview | None, digest, path: Path) -> None:
    """Move past ``nbytes``: read and hash them when verifying, else just seek."""
    if digest is None:
        f.seek(nbytes, os.SEEK_CUR)
        return
    while nbytes > 0:
        got = f.readinto(scratch[: min(nbytes, len(scratch))])
        if not got:
            raise FormatError(f"{path} ends {nbytes} bytes early: the file is truncated")
        digest.update(scratch[:got])
        nbytes -= got
