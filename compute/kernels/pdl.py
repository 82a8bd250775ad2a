"""Early launch (programmatic dependent launch) for the decode step's chain of kernels, on Hopper and later.

The decode step is a chain of about ten launches a layer, most of them a few microseconds long. Launched plainly,
each waits for the one before to finish, then pays its launch and its first loads in full. Launched early (CUDA's
programmatic dependent launch, Triton's ``launch_pdl``), a kernel may start once every program of the kernel before
it has signalled (``griddepcontrol.launch_dependents``), which each of ours does first thing. It then does what reads
nothing the kernels before it write (its programs' set-up, a GEMV's first weights) and waits
(``griddepcontrol.wait``) until the kernel before it has finished and its writes are visible.

What keeps such a chain correct:

* every program of a kernel launched early waits, whatever else it skips. A kernel then ends only after the one
  before it has ended, so one wait covers every kernel further back;
* nothing is read that a kernel before writes, and nothing is written at all, before the wait: a buffer the
  allocator hands a kernel may still be read by one before it.

``early_launch(device)`` says whether a device's kernels launch this way; a process turns it off once, at its start
(``compute.config.KernelOptions``).
A Triton kernel takes an ``EARLY`` constexpr, calls ``signal_dependents(EARLY)`` first and ``wait_for_producers(
EARLY)`` before its first such read or write, and is launched with ``**pdl(EARLY)``. The one-row GEMV, written in
Gluon, does the same with its own inline assembly (``gemv_mma``). A kernel launched early after one that does not
signal (a torch kernel) simply starts when it ends.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["early_launch", "pdl", "set_early_launch", "signal_dependents", "wait_for_producers"]

_EARLY_LAUNCH = True  # this process's choice (set_early_launch)


def set_early_launch(on: bool) -> None:
    """Whether this process's decode kernels may launch early at all (on by default)."""
    global _EARLY_LAUNCH
    _EARLY_LAUNCH = on


def early_launch(device: torch.device) -> bool:
    """Whether the decode step's kernels on ``device`` launch early (module docstring): CUDA devices of compute
    capability 9 and later, unless this process switched it off (``set_early_launch``)."""
    return _EARLY_LAUNCH and device.type == "cuda" and _hopper_or_later(device.index)


@functools.cache
def _hopper_or_later(index: int | None) -> bool:  # asked at every launch of the decode step's kernels
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(early: bool) -> dict:
    """The launch options of a kernel launched early, or none."""
    return {"launch_pdl": True} if early else {}


@triton.jit
def signal_dependents(EARLY: tl.constexpr):
    """With EARLY: the kernel launched next may start now."""
    if EARLY:
        gdc_launch_dependents()


@triton.jit
def wait_for_producers(EARLY: tl.constexpr):
    """With EARLY: wait until the kernel before this one has finished and its writes are visible."""
    if EARLY:
        gdc_wait()
