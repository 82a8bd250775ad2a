"""A stand-in compute process for the loader tests: acquires every unit in model order and checks its bytes.

    python tests/consumer_proc.py ADDRESS MODEL_DIR --passes 3 [--switch POLICY[:K]]... [--forever] [--bench N]

For each pass it acquires every unit of the plan in execution order, compares every tensor's bytes with the
checkpoint (read independently with ``QuantizedCheckpoint``), compares a streamed unit again just before
releasing it (the loader must not overwrite a slot in use), and releases it. ``--switch`` changes the
policy after the passes before it (one ``--switch`` per phase; each phase runs ``--passes`` passes).
``--forever`` keeps making passes until the loader is gone; ``--bench N`` times N passes of acquire+release
without the byte checks at the end of each phase (CUDA: also a plain pinned copy, for comparison). The last line on stdout is a JSON summary. Exit status: 0 all bytes right,
1 a byte mismatch, 3 ``LoaderGone`` (the message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from protocol.client import LoaderClient, LoaderGone
from protocol.cpu_kernel_form import has_kernel_form, pack_for_cpu_kernel
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import QWEIGHT_SUFFIX, SCALES_SUFFIX


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


class Checker:
    def __init__(self, client: LoaderClient, model: str):
        self.client = client
        self.checkpoint = QuantizedCheckpoint(model)
        self.expected: dict[str, torch.Tensor] = {}
        self.checked_tensors = 0
        self.acquires = {"resident": 0, "streamed": 0}

    def expect(self, name: str, device: torch.device) -> torch.Tensor:
        """The bytes the pool must hold for tensor ``name``: the checkpoint's, in the CPU kernel form on CPU."""
        if name not in self.expected:
            tensor = self.checkpoint.tensor(name)
            if device.type == "cpu":
                linear = name.removesuffix(QWEIGHT_SUFFIX).removesuffix(SCALES_SUFFIX)
                qweight = self.checkpoint.tensor(linear + QWEIGHT_SUFFIX)
                if has_kernel_form(qweight.shape[0], qweight.shape[1] * 2):
                    packed = pack_for_cpu_kernel(qweight, self.checkpoint.tensor(linear + SCALES_SUFFIX))
                    tensor = packed[0] if name.endswith(QWEIGHT_SUFFIX) else packed[1]
            self.expected[name] = _bytes(tensor).to(device)
        return self.expected[name]

    def check(self, unit: str, views: dict[str, torch.Tensor], when: str) -> None:
        placement = next(u for u in self.client.plan.units if u.name == unit)
        if sorted(views) != sorted(t.name for t in placement.tensors):
            raise AssertionError(f"{unit}: views for {sorted(views)}, the plan lists {[t.name for t in placement.tensors]}")
        for name, view in views.items():
            if not torch.equal(_bytes(view), self.expect(name, view.device)):
                raise AssertionError(f"{unit} {name}: bytes differ from the checkpoint {when} (policy {self.client.plan.policy})")
            self.checked_tensors += 1

    def one_pass(self, check: bool) -> None:
        for unit in self.client.plan.units:
            views = self.client.acquire(unit.name)
            streamed = unit.pool_offset is None
            self.acquires["streamed" if streamed else "resident"] += 1
            if check:
                self.check(unit.name, views, "after acquire")
                if streamed:
                    self.check(unit.name, views, "before release")
            self.client.release(unit.name)


def _synchronize(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()


def _pinned_copy_gbps(nbytes: int, repeats: int = 20) -> float:
    """A plain pinned host -> device copy of ``nbytes``, the rate to hold the ring against, GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def bench(checker: Checker, passes: int) -> dict:
    """Time ``passes`` unchecked passes under the plan in force: cost per unit and streaming rate."""
    plan = checker.client.plan
    on_cuda = plan.device == "cuda"
    checker.one_pass(check=False)  # warm-up: views built, events opened
    _synchronize(on_cuda)
    start = time.perf_counter()
    for _ in range(passes):
        checker.one_pass(check=False)
    _synchronize(on_cuda)
    seconds = time.perf_counter() - start
    streamed_per_pass = sum(u.nbytes for u in plan.units if u.pool_offset is None)
    return {
        "policy": plan.policy,
        "per_acquire_us": seconds / (passes * len(plan.units)) * 1e6,
        "streamed_gbps": streamed_per_pass * passes / seconds / 1e9,
        "pinned_gbps": _pinned_copy_gbps(plan.ring.slot_bytes or 1 << 28) if on_cuda else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("model")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--switch", action="append", default=[], help="POLICY or POLICY:K, one per extra phase")
    parser.add_argument("--forever", action="store_true")
    parser.add_argument("--bench", type=int, default=0, help="time this many unchecked passes")
    parser.add_argument("--shutdown", action="store_true", help="ask the loader to exit at the end")
    args = parser.parse_args()
    torch.set_num_threads(1)

    try:
        client = LoaderClient.connect(args.address, timeout_s=20)
        checker = Checker(client, args.model)
        policies = [client.plan.policy]
        benches = []
        for switch in [None, *args.switch]:
            if switch is not None:
                name, _, slots = switch.partition(":")
                client.set_policy(name, ring_slots=int(slots) if slots else None)
                policies.append(client.plan.policy)
            for _ in range(args.passes):
                checker.one_pass(check=True)
            if args.bench:
                benches.append(bench(checker, args.bench))
        print("ready", flush=True)  # the kill tests wait for this line
        while args.forever:
            checker.one_pass(check=True)
        stats = client.stats()
        client.close(shutdown_loader=args.shutdown)
    except LoaderGone as e:
        print(f"consumer: {e}", file=sys.stderr)
        return 3
    except AssertionError as e:
        print(f"consumer: {e}", file=sys.stderr)
        return 1
    summary = {
        "policies": policies,
        "checked_tensors": checker.checked_tensors,
        "acquires": checker.acquires,
        "benches": benches,
        "stats": [
            {"policy": p.policy, "streamed_bytes": p.streamed_bytes, "fills": p.fills, "acquires": p.acquires, "copy_gbps": p.copy_gbps}
            for p in stats.policies
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
