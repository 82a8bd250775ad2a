"""``spillover loader``: plan the budget, load the weights, share the pool, serve compute until told to stop.

Order matters: the address and the budget are checked first, so a refusal (one clear line on stderr, exit
status 2) comes before any memory is allocated; then the placement table is printed, the checkpoint is read
into the pinned arena, the pool is allocated and placed, the socket is bound, and the ready file is written.
A shard failing its checks while being read, host memory that cannot be pinned, or an address already in
use is reported the same way (one line, status 2).
Exit status 0 after an orderly stop (Shutdown, a signal, the parent or compute gone), 1 after a crash
(logged with its traceback). The pool and the run directory are freed on every path out.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import sys

import click
import torch
import zmq

from loader.arena import PinnedArena
from loader.layout import layout_units, pool_layouts
from loader.planner import choose_prefill_chunk, draft_lines, plan_placement
from loader.policies import get_policy
from loader.pool import DevicePool
from loader.process import LoaderProcess, format_stats, pool_capacity
from protocol.launch import LoaderCommand, loader_command_options
from protocol.sockets import AddressError, check_address, make_run_dir
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import FormatError

log = logging.getLogger(__name__)

def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _default_device() -> str:
    return "cuda" if _cuda_available() else "cpu"


@click.command("loader")
@loader_command_options
def main(**options) -> None:
    """Hold a model's INT4 weights and stream them into a device pool shared with the compute process."""
    command = LoaderCommand(**options)
    logging.basicConfig(  # no-op under `spillover`, whose group configured logging already
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(command.verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    sys.exit(run(dataclasses.replace(command, device=command.device or _default_device())))


def _refuse(message: str) -> int:
    click.echo(f"spillover loader: {message}", err=True)
    return 2


def run(config: LoaderCommand) -> int:
    """The loader's whole life (``config.device`` chosen); returns the exit status."""
    try:
        check_address(config.socket)
        checkpoint = QuantizedCheckpoint(config.model)
        file_units = layout_units(checkpoint.manifest)
        # a CPU pool holds the weights in the CPU kernel's form (loader.layout): the planner counts that form's bytes
        units = pool_layouts(checkpoint.manifest, config.device)
        reserved = []
        if config.draft_model is not None:
            draft = QuantizedCheckpoint(config.draft_model)
            reserved = draft_lines(
                device=config.device,
                units=pool_layouts(draft.manifest, config.device),  # on CPU, the kernel form compute packs it in
                config=draft.config,
                max_context=config.max_context,
            )
        plan_for = functools.partial(
            plan_placement,
            reserved=reserved,
            budget_bytes=config.gpu_memory,
            device=config.device,
            units=units,
            config=checkpoint.config,
            max_context=config.max_context,
            max_batch=config.max_batch,
            kv_tokens=config.kv_tokens,
        )
        policy_options = {
            "policy": get_policy(config.policy),
            "ring_slots": config.ring_slots,
            "prefetch_depth": config.prefetch_depth,
        }
        # one chunk for every policy, so a policy switch never changes what compute's activations were counted for
        plan_for = functools.partial(plan_for, prefill_chunk=choose_prefill_chunk(plan_for, **policy_options))
        placement = plan_for(**policy_options)
    except (AddressError, FormatError, ValueError) as e:  # BudgetError is a ValueError
        return _refuse(str(e))
    if config.device == "cuda" and not _cuda_available():
        return _refuse("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if config.device == "cuda" and "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower():
        # the pool is shared as one cudaMalloc segment through CUDA IPC; expandable segments are not that
        return _refuse(
            "PYTORCH_CUDA_ALLOC_CONF enables expandable_segments, which the loader's CUDA IPC pool cannot use; "
            "unset it for the loader (the compute process may keep it)"
        )
    click.echo(placement.table())
    capacity = pool_capacity(placement, plan_for)

    try:
        arena = PinnedArena.load(
            checkpoint, file_units, pin=config.device == "cuda", verify_checksums=config.verify_checksums
        )
        if config.device == "cpu":
            arena = arena.repacked_for_cpu_kernel(units)
    except (FormatError, OSError, RuntimeError) as e:  # a bad shard, an unreadable file, pinning refused
        return _refuse(str(e))
    if config.device == "cpu":
        # the loader only copies; torch's intra-op threads make a small copy 50x slower and steal compute's cores
        torch.set_num_threads(1)
    run_dir = make_run_dir(needed_bytes=capacity if config.device == "cpu" else 0)
    pool = None
    try:
        pool = DevicePool(arena=arena, units=units, device=config.device, capacity_bytes=capacity, run_dir=run_dir)
        process = LoaderProcess(config, pool, placement, plan_for)
        process.serve()
        if config.stats_on_exit:
            click.echo(format_stats(process.stats()))
        return 0
    except zmq.ZMQError as e:
        return _refuse(f"cannot listen on {config.socket}: {e}")
    except Exception:
        log.exception("the loader crashed")
        return 1
    finally:
        if pool is not None:
            pool.close()
        arena.close()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    # ``python -m loader.main`` is how ``compute.launch`` starts the loader (with the launcher's interpreter,
    # importing nothing of ``compute``); its messages still name the command people know.
    main(prog_name="spillover loader")
