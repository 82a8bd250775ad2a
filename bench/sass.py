"""The one-row INT4 GEMV's inner loop in SASS, counted without a GPU: instructions per weight byte, by opcode.

ncu on the H200 (docs/kernels.md) showed the one-row GEMV issue-bound: its speed follows the instructions its loop
issues per weight byte and the registers that limit how many warps an SM holds. Neither needs a GPU: Triton
compiles for ``sm_90`` anywhere, and ships ``cuobjdump``.

    python -m bench.sass                                   # the decode step's configs in force
    python -m bench.sass --n 55296 --k 5120 --tiles 2 --groups 1
    python -m bench.sass --attention                       # shared memory of the attention kernels, both caches

The compiled kernel is the one ``int4_gemv`` launches for that shape (bf16, split-K partials, launched early as on
Hopper). The loop is the span between the kernel's backward branch and its target.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import click
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from bench.kernels import DECODE_SHAPES_32B
from compute.kernels import gemv_mma
from compute.kernels.gemv_configs import MmaConfig, gemv_config

_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACKWARD_BRANCH = re.compile(r"BRA\s+(?:`\([^)]*\)\s*)?0x([0-9a-f]+)")
_POINTERS = {"x_ptr": "*bf16", "sums_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*bf16", "b_ptr": "*bf16",
             "out_ptr": "*fp32"}  # fmt: skip
_FLOATS = {"offset": "fp32"}


def compile_kernel(kernel, types: dict[str, str], constexprs: dict, *, source=ASTSource, capability: int = 90,
                   **options):  # fmt: skip
    """``kernel`` compiled for ``sm_{capability}`` without a GPU: ``types`` maps runtime arguments to Triton types
    (pointers, ``"*bf16"`` and the like, 16-byte aligned; any other argument i32), ``constexprs`` the rest;
    ``source`` is ``ASTSource`` for ``triton.jit`` kernels, ``GluonASTSource`` for Gluon ones; ``options`` such as
    ``num_warps`` go to ``triton.compile``."""
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    compiled_source = source(
        fn=kernel, signature=signature,
        constexprs={(names.index(key),): value for key, value in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types.get(name, "").startswith("*")},
    )  # fmt: skip
    return triton.compile(compiled_source, target=GPUTarget("cuda", capability, 32), options=options)


def compile_gemv(cfg: MmaConfig, k: int, *, capability: int = 90, dtype: str = "bf16", rows: int = 1):
    """The tensor-core GEMV kernel compiled for ``cfg``, ``k`` input features and ``rows`` rows of x (one: the row
    broadcast over the mma's columns; 2 … 16: one row a column), as ``int4_gemv(partials=True)`` launches it on
    Hopper for rows of ``dtype`` ("bf16" or "fp16")."""
    cols = 0 if rows == 1 else (8 if rows <= 8 else 16)
    x_layout = gemv_mma._x_layout(cfg.warps) if cols == 0 else gemv_mma._x_rows_layout(cols, cfg.warps)
    constexprs = dict(
        KW=k // 8, TILES=cfg.tiles, WARPS=cfg.warps, GROUPS=cfg.groups, SPLIT=True, HAS_BIAS=False, EARLY=True,
        COLS=cols, ACC_COLS=cols or 8, words_layout=gemv_mma._words_layout(cfg.tiles, cfg.warps), x_layout=x_layout,
    )  # fmt: skip
    types = {**_POINTERS, **_FLOATS, "x_ptr": f"*{dtype}"}
    return compile_kernel(gemv_mma._gemv_mma_kernel, types, constexprs, source=GluonASTSource, capability=capability,
                          num_warps=cfg.warps)  # fmt: skip


def _cuobjdump(compiled, option: str) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        done = subprocess.run([str(cuobjdump), option, str(cubin)], capture_output=True, text=True, check=True)
    return done.stdout


def disassemble(compiled) -> str:
    """The SASS of a kernel ``triton.compile`` returned, by the ``cuobjdump`` Triton ships."""
    return _cuobjdump(compiled, "-sass")


def registers(compiled) -> int:
    """Registers a thread of a kernel ``triton.compile`` returned (what ptxas allocated)."""
    return int(re.search(r"REG:(\d+)", _cuobjdump(compiled, "-res-usage")).group(1))


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


def describe_loop(cfg: MmaConfig, k: int, rows: int = 1) -> dict:
    """Instructions per weight byte of one thread's share of a loop step, the opcode counts, and the registers, for
    ``rows`` rows of x."""
    compiled = compile_gemv(cfg, k, rows=rows)
    opcodes = loop_opcodes(disassemble(compiled))
    bytes_per_thread = 16 * cfg.tiles * cfg.groups * 64 / 32  # 64 bytes of 16 rows a tile and group, over 32 lanes
    return dict(
        instructions=len(opcodes),
        bytes_per_thread=bytes_per_thread,
        per_byte=len(opcodes) / bytes_per_thread,
        registers=registers(compiled),
        opcodes=collections.Counter(opcodes).most_common(),
    )


def attention_footprints() -> list[tuple[str, int, int]]:
    """(kernel, shared memory bytes a program, registers a thread) of one decode row's attention kernels on the 32B
    model's shapes (40 query heads, 8 KV heads of 128), as the decode step (a static cache of 4096 positions: 64
    splits) and the batched engine (pages of 16, 33 splits) launch them on Hopper."""
    from compute.kernels import attention, paged_attention

    heads = {"D": 128, "EARLY": True}
    paged_split = {"KVH": 8, "G": 5, "P": 16, "W": 256, "SPLITS": 33, "BLOCK_G": 16, "BLOCK_N": 64,
                   "DOT_IN_FP32": False, **heads}  # fmt: skip
    q_kv = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "table_ptr": "*i32", "lengths_ptr": "*i32",
            "part_ptr": "*fp32", "lse_ptr": "*fp32"}  # fmt: skip
    static = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "position_ptr": "*i64",
              "tree_ptr": "*i32", "part_ptr": "*fp32", "lse_ptr": "*fp32"}  # fmt: skip
    combine = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "sums_ptr": "*fp32"}
    cases = [
        ("static split (decode step)", attention._split_attention_kernel, static,
         {"G": 5, "SPLITS": 64, "STEPS": 1, "BLOCK_M": 16, "BLOCK_N": 64, "TREE": False, "DOT_IN_FP32": False,
          **heads}, 4, 2),
        ("paged split, 1 stage (batched)", paged_attention._paged_split_kernel, q_kv, paged_split, 4, 1),
        ("paged split, 2 stages", paged_attention._paged_split_kernel, q_kv, paged_split, 4, 2),
        ("static combine", attention._combine_kernel, {**combine, "position_ptr": "*i64"},
         {"SPLITS": 64, "BLOCK_N": 64, "BLOCK_S": 64, "HEADS": 1, "OPERAND": True, **heads}, 4, 3),
        ("paged combine", paged_attention._paged_combine_kernel, {**combine, "lengths_ptr": "*i32"},
         {"H": 40, "SPLITS": 33, "BLOCK_N": 64, "BLOCK_S": 64, "HEADS": 1, "OPERAND": True, **heads}, 4, 3),
    ]  # fmt: skip
    rows = []
    for name, kernel, pointers, constexprs, warps, stages in cases:
        compiled = compile_kernel(kernel, {**pointers, "qk_scale": "fp32"}, constexprs, num_warps=warps,
                                  num_stages=stages)  # fmt: skip
        rows.append((name, compiled.metadata.shared, registers(compiled)))
    return rows


@click.command()
@click.option("--n", type=int, default=None, help="Output features; with --k, one shape (default: the decode step's).")
@click.option("--k", type=int, default=None, help="Input features.")
@click.option("--tiles", type=int, default=None, help="Override the config's 16-row tiles a warp.")
@click.option("--warps", type=int, default=None, help="Override the config's warps a program.")
@click.option("--groups", type=int, default=None, help="Override the config's 128-element groups a step.")
@click.option("--opcodes/--no-opcodes", default=False, help="Also list the loop's opcodes by count.")
@click.option("--attention", is_flag=True,
              help="Instead, the shared memory and registers of one decode row's attention kernels, both caches.")
def main(n: int | None, k: int | None, tiles: int | None, warps: int | None, groups: int | None,
         opcodes: bool, attention: bool) -> None:  # fmt: skip
    """Count the one-row GEMV loop's SASS instructions per weight byte for sm_90 (no GPU needed)."""
    if attention:
        for name, shared, regs in attention_footprints():
            click.echo(f"{name}: {shared} bytes of shared memory a program, {regs} registers")
        return
    shapes = [(f"{n}x{k}", n, k)] if n and k else [(name, n, k) for name, n, k, _, _ in DECODE_SHAPES_32B]
    for name, rows, cols in shapes:
        overrides = dict(tiles=tiles, warps=warps, groups=groups)
        cfg = dataclasses.replace(gemv_config("mma", rows, cols), **{f: v for f, v in overrides.items() if v})
        loop = describe_loop(cfg, cols)
        click.echo(
            f"{name}: {loop['instructions']} instructions per step, {loop['bytes_per_thread']:.0f} weight bytes per "
            f"thread -> {loop['per_byte']:.2f} per byte, {loop['registers']} registers  ({cfg})"
        )
        if opcodes:
            click.echo("    " + ", ".join(f"{op} {count}" for op, count in loop["opcodes"]))


if __name__ == "__main__":
    main()
