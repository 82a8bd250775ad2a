"""Every message that crosses the loader/compute boundary, and nothing else.

Each message is a frozen, keyword-only dataclass registered under a short type tag (``TYPE``). Its fields
hold only plain values — ``int``, ``float``, ``bool``, ``str``, ``bytes``, ``None``, tuples of those, and the
small nested records defined here — so ``protocol.codec`` can encode them with msgpack and check every
field's type when decoding. Compute sends ``Hello``, ``SetPolicy``, ``GetStats``, ``Shutdown``; the loader
answers ``Plan``, ``Stats``, ``Ok`` or ``Error``.

This module defines shapes only: no I/O, no torch, no sockets.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

# Bumped on any change to a message's fields or meaning; the loader refuses a Hello of another version.
PROTOCOL_VERSION = 2

# type tag -> message class; filled by ``register``
MESSAGE_TYPES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` a message known to the codec under its ``TYPE`` tag."""
    tag = cls.__dict__.get("TYPE")
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"message class {cls.__name__} needs a non-empty str TYPE tag")
    if tag in MESSAGE_TYPES:
        raise TypeError(f"message type tag {tag!r} is used by both {MESSAGE_TYPES[tag].__name__} and {cls.__name__}")
    MESSAGE_TYPES[tag] = cls
    return cls


class Message:
    """Base of every message class; the registry, not this base, is what the codec trusts."""

    TYPE: ClassVar[str]


# ---- records nested inside messages (no tag: their type follows from the field that holds them) ----


@dataclasses.dataclass(frozen=True, kw_only=True)
class CudaIpcHandle:
    """The fields of ``torch.UntypedStorage._share_cuda_()`` for one whole CUDA allocation, in its order."""

    device: int  # CUDA device index the memory lives on
    handle: bytes  # cudaIpcMemHandle_t of the allocation (64 bytes in the CUDA API)
    storage_bytes: int  # size of the shared storage, bytes
    storage_offset_bytes: int  # offset of the storage inside its cudaMalloc segment, bytes
    ref_counter_handle: bytes  # name of torch's shared-memory reference-counter file
    ref_counter_offset: int  # slot of this share in that counter file
    event_handle: bytes  # cudaIpcEventHandle_t torch records after the producer's last write
    event_sync_required: bool  # whether the importer must wait on ``event_handle`` before use


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedBuffer:
    """How to attach a buffer the loader shares: a file to map (host memory), or a CUDA IPC handle."""

    nbytes: int  # size of the buffer, bytes
    path: str | None  # host memory: absolute path of a file in the loader's private run directory
    cuda: CudaIpcHandle | None  # device memory: the allocation's IPC handle (then ``path`` is None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorPlacement:
    """One tensor of a unit, relative to the start of the unit's bytes."""

    name: str  # full tensor name, e.g. "model.layers.0.mlp.up_proj.qweight"
    offset: int  # bytes from the start of the unit; a multiple of 256
    nbytes: int  # the tensor's own size, bytes
    dtype: str  # safetensors dtype string: "U8" (qweight) or "BF16" (scales)
    shape: tuple[int, ...]  # e.g. (out, in / 2) for qweight, (out, in / 128) for scales


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitPlacement:
    """Where one unit's bytes are: at a fixed pool offset (resident), or in whichever ring slot serves it."""

    name: str  # "layers.0" ... "layers.{L-1}", "lm_head"
    index: int  # position in execution order, from 0
    nbytes: int  # the unit's aligned size, bytes
    pool_offset: int | None  # resident: bytes from the start of the pool; streamed: None
    tensors: tuple[TensorPlacement, ...]  # manifest order


@dataclasses.dataclass(frozen=True, kw_only=True)
class RingSpec:
    """The ring of slots the streamed units go through; access i is unit order[i % S] in slot i % K."""

    slots: int  # K; 0 when nothing streams
    slot_bytes: int  # bytes per slot (the largest streamed unit); 0 when nothing streams
    base_offset: int  # bytes from the start of the pool to slot 0; slot k starts at base + k * slot_bytes
    prefetch_depth: int  # D: the loader fills at most D accesses beyond the last one compute acquired
    order: tuple[str, ...]  # the streamed units in execution order (S = len(order)); one pass = S accesses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetLine:
    """One thing the planner counted against ``--gpu-memory``."""

    what: str  # e.g. "KV cache (4096 tokens)"
    nbytes: int  # bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyStats:
    """Counters accumulated while one policy was in force (over all its plans)."""

    policy: str  # the policy's registered name
    streamed_bytes: int  # bytes copied host -> pool slots by the ring
    fills: int  # ring fills (one unit each)
    copy_seconds: float  # time the copies themselves took (CUDA: measured on the copy stream), seconds
    resident_bytes: int  # bytes copied host -> pool for resident units (at start and at policy switches)
    resident_seconds: float  # time those copies took, seconds
    acquires: int  # streamed accesses compute acquired
    compute_wait_seconds: float  # time compute's acquire waited for the loader to fill a slot, seconds

    @property
    def copy_gbps(self) -> float:
        """Achieved host -> device rate of the ring's copies, GB/s (1e9 bytes); 0 before any copy."""
        return self.streamed_bytes / self.copy_seconds / 1e9 if self.copy_seconds > 0 else 0.0


# ---- the messages ----


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """compute -> loader, first: who is asking, and which protocol it speaks."""

    TYPE: ClassVar[str] = "hello"
    protocol_version: int  # PROTOCOL_VERSION of the sender
    pid: int  # the compute process's pid; the loader exits when it dies


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan(Message):
    """loader -> compute, answering Hello or SetPolicy: where every weight is and how to reach it."""

    TYPE: ClassVar[str] = "plan"
    protocol_version: int  # PROTOCOL_VERSION of the loader
    generation: int  # increases with every plan; the counters file carries the current one
    policy: str  # the policy's registered name
    loader_pid: int  # compute watches it: LoaderGone when it dies
    device: str  # "cuda" or "cpu": where the pool lives
    pool: SharedBuffer  # the whole pool: resident units, then the ring
    counters: SharedBuffer  # the ring's int64 counters (host memory, ``protocol.ring``); always a file
    filled_events: tuple[bytes, ...]  # CUDA: K interprocess event handles, "slot k filled"; CPU: empty
    released_events: tuple[bytes, ...]  # CUDA: K interprocess event handles, "slot k released"; CPU: empty
    units: tuple[UnitPlacement, ...]  # every unit, execution order
    ring: RingSpec  # the streamed units' ring
    max_context: int  # tokens; the KV cache was counted for this many: compute must not exceed it
    prefill_chunk: int  # tokens per prefill forward pass the activations were counted for
    max_batch: int  # sequences per forward pass the planner counted (1: one conversation)
    kv_tokens: int  # positions of compute's paged KV pool (whole pages); 0: a static cache of max_context
    budget_bytes: int  # --gpu-memory, bytes: the device memory of both processes together
    lines: tuple[BudgetLine, ...]  # everything the planner counted, the pool's lines last


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class SetPolicy(Message):
    """compute -> loader, at a forward-pass boundary with every unit released: re-place under another policy."""

    TYPE: ClassVar[str] = "set_policy"
    policy: str  # a registered policy name
    ring_slots: int | None  # K, or None for the policy's default
    prefetch_depth: int | None  # D, or None for the policy's default


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class GetStats(Message):
    """compute -> loader: ask for the loader's counters."""

    TYPE: ClassVar[str] = "get_stats"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Stats(Message):
    """loader -> compute: copy and wait counters since the loader started, per policy."""

    TYPE: ClassVar[str] = "stats"
    policy: str  # the policy in force now
    generation: int  # the current plan's generation
    uptime_seconds: float  # since the loader became ready, seconds
    policies: tuple[PolicyStats, ...]  # one per policy that has been in force, in the order first used


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Shutdown(Message):
    """compute -> loader: answer Ok, then free the pool and exit."""

    TYPE: ClassVar[str] = "shutdown"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Ok(Message):
    """loader -> compute: the request was done; nothing else to say."""

    TYPE: ClassVar[str] = "ok"


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Error(Message):
    """loader -> compute: the request was refused or could not be read; the loader keeps serving."""

    TYPE: ClassVar[str] = "error"
    code: str  # one of ERROR_CODES
    message: str  # for people: what was wrong, with the numbers, and what to do


# Error.code values: what kind of failure, so a program can react without parsing the message.
ERROR_CODES = (
    "bad_message",  # could not decode: garbage, unknown type, wrong or missing fields, too large
    "unexpected",  # a message the loader does not accept (e.g. a Plan sent to it)
    "version",  # Hello with another PROTOCOL_VERSION
    "not_attached",  # SetPolicy before Hello, or from a peer that is not the attached compute process
    "busy",  # another compute process is attached, or units are still acquired
    "policy",  # unknown policy or invalid ring settings
    "budget",  # the policy does not fit --gpu-memory (the message has the planner's numbers)
    "internal",  # the loader failed handling a valid request; see its log
)
