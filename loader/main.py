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

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import click
import torch
import zmq

from loader.arena import PinnedArena
from loader.layout import layout_units, pool_layouts
from loader.planner import SIZE, choose_prefill_chunk, plan_placement
from loader.policies import DEFAULT_POLICY, POLICIES, get_policy
from loader.pool import DevicePool
from loader.process import LoaderConfig, LoaderProcess, format_stats, pool_capacity
from protocol.sockets import AddressError, check_address, make_run_dir
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import FormatError

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _default_device() -> str:
    return "cuda" if _cuda_available() else "cpu"


@click.command("loader")
@click.option("--model", "model", required=True, type=click.Path(file_okay=False, path_type=Path), help="spillover-int4 model directory.")
@click.option("--gpu-memory", "budget", required=True, type=SIZE, help="Device memory of BOTH processes, e.g. 24GiB.")
@click.option("--policy", default=DEFAULT_POLICY, show_default=True, type=click.Choice(sorted(POLICIES)), help="Residency policy.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="Where the pool lives (default: cuda when available).")
@click.option("--socket", "address", required=True, help="ipc:///DIR/NAME (DIR mode 0700) or tcp://127.0.0.1:PORT.")
@click.option("--max-context", default=DEFAULT_MAX_CONTEXT, show_default=True, type=click.IntRange(min=1), help="Tokens the KV cache is counted for.")
@click.option("--ring-slots", type=click.IntRange(min=1), default=None, help="Ring slots K (default: the policy's).")
@click.option("--prefetch-depth", type=click.IntRange(min=1), default=None, help="Fill at most D units ahead (default: the policy's).")
@click.option("--no-verify-checksums", is_flag=True, help="Skip the sha256 of every shard (sizes are still checked).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Written (JSON: address, pid) when ready.")
@click.option("--stats-on-exit", is_flag=True, help="Print copy and wait statistics when the loader exits.")
def main(model, budget, policy, device, address, max_context, ring_slots, prefetch_depth, no_verify_checksums, ready_file, stats_on_exit):
    """Hold a model's INT4 weights and stream them into a device pool shared with the compute process."""
    config = LoaderConfig(
        model=model,
        budget_bytes=budget,
        policy=policy,
        device=device or _default_device(),
        socket=address,
        max_context=max_context,
        ring_slots=ring_slots,
        prefetch_depth=prefetch_depth,
        verify_checksums=not no_verify_checksums,
        ready_file=ready_file,
        stats_on_exit=stats_on_exit,
    )
    sys.exit(run(config))


def _refuse(message: str) -> int:
    click.echo(f"spillover loader: {message}", err=True)
    return 2


def run(config: LoaderConfig) -> int:
    """The loader's whole life; returns the exit status."""
    try:
        check_address(config.socket)
        checkpoint = QuantizedCheckpoint(config.model)
        file_units = layout_units(checkpoint.manifest)
        # a CPU pool holds the weights in the CPU kernel's form (loader.layout): the planner counts that form's bytes
        units = pool_layouts(checkpoint.manifest, config.device)
        plan_for = functools.partial(
            plan_placement,
            budget_bytes=config.budget_bytes,
            device=config.device,
            units=units,
            config=checkpoint.config,
            max_context=config.max_context,
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
