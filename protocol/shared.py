"""Sharing a buffer and events between the loader and compute, with plain values only (no pickle).

* Host memory: a file in the loader's private run directory (``protocol.sockets.make_run_dir``: /dev/shm
  when it has room), mapped shared by both processes. This is the pool on CPU.
* Device memory: the CUDA IPC fields of ONE allocation's storage (``_share_cuda_``), rebuilt in the other
  process with ``_new_shared_cuda``. An IPC handle names a whole cudaMalloc segment, so the loader shares
  one big buffer and everything inside it is addressed by offset. The exporter must
  keep its tensor alive while the importer uses it; torch's IPC reference counter keeps freed memory
  reserved until every importer has dropped its storage.
* Interprocess CUDA events (timing disabled, as CUDA requires), created by the loader and opened by
  compute: an IPC event handle cannot be opened in the process that exported it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from protocol.messages import CudaIpcHandle, SharedBuffer


def create_host_buffer(path: Path, nbytes: int) -> tuple[torch.Tensor, SharedBuffer]:
    """A new zero-filled file of ``nbytes`` at ``path`` (which must not exist), mapped shared as uint8."""
    if nbytes <= 0:
        raise ValueError(f"a shared buffer needs a positive size, got {nbytes} bytes")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    tensor = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
    return tensor, SharedBuffer(nbytes=nbytes, path=str(path), cuda=None)


def export_cuda_buffer(tensor: torch.Tensor) -> SharedBuffer:
    """The IPC description of a whole CUDA uint8 tensor that owns its storage from byte 0."""
    if tensor.device.type != "cuda" or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"export_cuda_buffer needs a 1-D uint8 CUDA tensor, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    storage = tensor.untyped_storage()
    if tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel():
        raise ValueError("export_cuda_buffer needs a tensor that is its whole storage (share the pool, not a view)")
    device, handle, storage_bytes, offset, ref_handle, ref_offset, event_handle, event_sync = storage._share_cuda_()
    cuda = CudaIpcHandle(
        device=int(device),
        handle=bytes(handle),
        storage_bytes=int(storage_bytes),
        storage_offset_bytes=int(offset),
        ref_counter_handle=bytes(ref_handle),
        ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle),
        event_sync_required=bool(event_sync),
    )
    return SharedBuffer(nbytes=tensor.numel(), path=None, cuda=cuda)


def attach_buffer(buffer: SharedBuffer) -> torch.Tensor:
    """The loader's shared buffer as a 1-D uint8 tensor in this process (host file or CUDA IPC)."""
    if buffer.path is not None:
        if not os.path.isfile(buffer.path):
            raise FileNotFoundError(f"shared buffer {buffer.path} does not exist (has the loader exited?)")
        size = os.path.getsize(buffer.path)
        if size != buffer.nbytes:
            raise ValueError(f"shared buffer {buffer.path} has {size} bytes, the plan says {buffer.nbytes}")
        return torch.from_file(buffer.path, shared=True, size=buffer.nbytes, dtype=torch.uint8)
    if buffer.cuda is None:
        raise ValueError("a SharedBuffer needs a path or a CUDA IPC handle, this one has neither")
    h = buffer.cuda
    torch.cuda._lazy_init()  # _new_shared_cuda needs an initialized CUDA context
    storage = torch.UntypedStorage._new_shared_cuda(
        h.device,
        h.handle,
        h.storage_bytes,
        h.storage_offset_bytes,
        h.ref_counter_handle,
        h.ref_counter_offset,
        h.event_handle,
        h.event_sync_required,
    )
    tensor = torch.empty(0, dtype=torch.uint8, device=f"cuda:{h.device}")
    return tensor.set_(storage, 0, (buffer.nbytes,), (1,))


def create_ipc_events(count: int, device: torch.device) -> tuple[list[torch.cuda.Event], tuple[bytes, ...]]:
    """``count`` interprocess events on ``device`` (timing off) and their handles for the other process."""
    with torch.cuda.device(device):
        events = [torch.cuda.Event(enable_timing=False, interprocess=True) for _ in range(count)]
        handles = tuple(bytes(event.ipc_handle()) for event in events)
    return events, handles


def open_ipc_events(handles: tuple[bytes, ...], device: torch.device) -> list[torch.cuda.Event]:
    """The other process's interprocess events, usable for ``record`` and ``wait`` here."""
    return [torch.cuda.Event.from_ipc_handle(device, handle) for handle in handles]
