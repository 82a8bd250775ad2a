"""The one-row INT4 GEMV's inner loop in SASS, counted without a GPU: instructions per weight byte, by opcode.

ncu on the H200 (docs/kernels.md) showed the one-row GEMV issue-bound: its speed follows the instructions its loop
issues per weight byte. That count needs no GPU: Triton compiles for ``sm_90`` anywhere, and ships ``cuobjdump``.

    python -m bench.sass                                   # the decode step's configs in force
    python -m bench.sass --n 55296 --k 5120 --block-n 32 --groups 1

The compiled kernel is the one ``int4_gemv`` launches for that shape (split-K partials, K a multiple of the tile,
16-byte aligned operands). The loop is the span between the kernel's backward branch and its target.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path

import click
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.kernels import DECODE_SHAPES_32B
from compute.kernels.gemv import _gemv_fma_kernel
from compute.kernels.gemv_configs import GemvConfig, gemv_config

_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACKWARD_BRANCH = re.compile(r"BRA\s+(?:`\([^)]*\)\s*)?0x([0-9a-f]+)")
_POINTERS = {"operand_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32"}


def compile_sass(cfg: GemvConfig, k: int, *, capability: int = 90) -> str:
    """SASS of the one-row GEMV kernel for ``cfg`` and ``k`` input features, as ``int4_gemv(partials=True)``
    specialises it."""
    names = _gemv_fma_kernel.arg_names
    constexprs = dict(
        KW=k // 8, HAS_BIAS=False, SPLIT=True, EVEN_K=True, BLOCK_N=cfg.block_n, GROUPS=cfg.groups,
        PREFETCH=cfg.prefetch, EARLY=True,  # launched early, as on Hopper (gemv.early_launch)
    )
    signature = {
        name: "constexpr" if name in constexprs else _POINTERS.get(name, "i32") for name in names
    }
    aligned = set(_POINTERS)  # what Triton specialises on at launch (16-divisible)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name in aligned}
    source = ASTSource(
        fn=_gemv_fma_kernel, signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs,
    )  # fmt: skip
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)  # as int4_gemv launches
    if cfg.maxnreg is not None:
        options["maxnreg"] = cfg.maxnreg
    return disassemble(triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options))


def disassemble(compiled) -> str:
    """The SASS of a kernel ``triton.compile`` returned, by the ``cuobjdump`` Triton ships."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        done = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True)
    return done.stdout


def loop_opcodes(sass: str) -> list[str]:
    """The opcodes (predicates dropped) of the innermost loop: from a backward branch's target to the branch."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    loops = []
    for address, text in instructions:
        branch = _BACKWARD_BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    if not loops:
        raise click.ClickException("no loop found in the kernel's SASS")
    start, end = min(loops, key=lambda span: span[1] - span[0])
    body = [text for address, text in instructions if start <= address <= end]
    return [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for text in body]


def describe_loop(cfg: GemvConfig, k: int) -> dict:
    """Instructions per weight byte of one thread's share of a loop step, and the opcode counts."""
    opcodes = loop_opcodes(compile_sass(cfg, k))
    bytes_per_thread = cfg.block_n * cfg.groups * 64 / (cfg.num_warps * 32)
    return dict(
        instructions=len(opcodes),
        bytes_per_thread=bytes_per_thread,
        per_byte=len(opcodes) / bytes_per_thread,
        opcodes=collections.Counter(opcodes).most_common(),
    )


@click.command()
@click.option("--n", type=int, default=None, help="Output features; with --k, one shape (default: the decode step's).")
@click.option("--k", type=int, default=None, help="Input features.")
@click.option("--block-n", type=int, default=None, help="Override the config's rows per program.")
@click.option("--groups", type=int, default=None, help="Override the config's 128-element groups per step.")
@click.option("--prefetch/--no-prefetch", default=None, help="Override the config's prefetch.")
@click.option("--opcodes/--no-opcodes", default=False, help="Also list the loop's opcodes by count.")
def main(n: int | None, k: int | None, block_n: int | None, groups: int | None, prefetch: bool | None,
         opcodes: bool) -> None:  # fmt: skip
    """Count the one-row GEMV loop's SASS instructions per weight byte for sm_90 (no GPU needed)."""
    shapes = [(f"{n}x{k}", n, k)] if n and k else [(name, n, k) for name, n, k, _, _ in DECODE_SHAPES_32B]
    for name, rows, cols in shapes:
        cfg = gemv_config("fma", rows, cols)
        overrides = dict(block_n=block_n, groups=groups, prefetch=prefetch)
        cfg = GemvConfig(**{**cfg.__dict__, **{key: v for key, v in overrides.items() if v is not None}})
        loop = describe_loop(cfg, cols)
        click.echo(
            f"{name}: {loop['instructions']} instructions per step, {loop['bytes_per_thread']:.0f} weight bytes per "
            f"thread -> {loop['per_byte']:.2f} per byte  ({cfg.block_n} rows, {cfg.groups} groups, "
            f"{cfg.num_warps} warp(s), prefetch {cfg.prefetch})"
        )
        if opcodes:
            click.echo("    " + ", ".join(f"{op} {count}" for op, count in loop["opcodes"]))


if __name__ == "__main__":
    main()
