"""compute.kernels.pdl's rules, checked in the PTX of every kernel of the decode step (and of the batched engine's
decode pass) as the H200 runs it.

Each kernel is compiled here, without a GPU, for sm_90 with ``EARLY`` (launched early, as on Hopper). In its PTX it
must signal its dependents (``griddepcontrol.launch_dependents``) and then wait for its producer
(``griddepcontrol.wait``) before it stores anything to global memory: a buffer the allocator hands a kernel launched
early may still be read by the kernel before it. The kernels other than the GEMV must not load from global memory
before the wait either (everything they read, some kernel before them may write); the GEMV loads only its weights
there, which no kernel of the step writes.
"""

from __future__ import annotations

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compute.kernels import activation, attention, gemv, norm, paged_attention

BF16, FP32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"

# (kernel, its pointer arguments' types, float arguments, constexprs as the decode step of the 32B model sets them)
KERNELS = [
    (norm._rms_norm_kernel, dict(x_ptr=BF16, weight_ptr=BF16, out_ptr=BF16, sums_ptr=FP32), ("eps",),
     dict(BLOCK_H=8192, OPERAND=True), 8),
    (norm._add_partials_kernel,
     dict(residual_ptr=BF16, part_ptr=FP32, bias_ptr=BF16, weight_ptr=BF16, hidden_ptr=BF16, normed_ptr=BF16,
          sums_ptr=FP32, count_ptr=I32, squares_ptr=FP32), ("eps",),
     dict(SPLIT=12, HAS_BIAS=True, NORM=True, BLOCK=256, BLOCK_H=8192, BLOCK_P=32, OPERAND=True, FENCE=True), 8),
    (activation._silu_mul_kernel, dict(gate_ptr=BF16, up_ptr=BF16, out_ptr=BF16, sums_ptr=FP32), (),
     dict(BLOCK=1024, OPERAND=True), 4),
    (attention._rotary_cache_write_kernel,
     dict(part_ptr=FP32, bias_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, q_ptr=BF16, k_cache_ptr=BF16, v_cache_ptr=BF16,
          position_ptr=I64, length_ptr=I64), (),
     dict(H=40, KVH=8, D=128, SPLITS=8, HAS_BIAS=True, HAS_LENGTH=True), 1),
    (attention._split_attention_kernel,
     dict(q_ptr=BF16, k_cache_ptr=BF16, v_cache_ptr=BF16, position_ptr=I64, tree_ptr=I32, part_ptr=FP32,
          lse_ptr=FP32),
     ("qk_scale",), dict(G=5, D=128, SPLITS=16, STEPS=4, BLOCK_M=16, BLOCK_N=64, TREE=False, DOT_IN_FP32=False), 4),
    (attention._combine_kernel, dict(part_ptr=FP32, lse_ptr=FP32, position_ptr=I64, out_ptr=BF16, sums_ptr=FP32), (),
     dict(D=128, SPLITS=16, BLOCK_N=64, BLOCK_S=16, HEADS=1, OPERAND=True), 4),
    (gemv._operand_kernel, dict(x_ptr=BF16, values_ptr=BF16, sums_ptr=FP32), (), dict(GROUPS=8), 4),
    # the batched engine's: the pool write, and the paged attention (one row: split over the pages, then combined)
    (paged_attention._rotary_pool_write_kernel,
     dict(part_ptr=FP32, bias_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, slots_ptr=I64, q_ptr=BF16, k_ptr=BF16,
          v_ptr=BF16), (), dict(H=40, KVH=8, D=128, SPLITS=8, HAS_BIAS=True), 1),
    (paged_attention._paged_decode_kernel,
     dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, table_ptr=I32, lengths_ptr=I32, out_ptr=BF16, sums_ptr=FP32),
     ("qk_scale",), dict(KVH=8, G=5, D=128, P=16, W=256, BLOCK_G=16, DOT_IN_FP32=False, OPERAND=True), 4),
    (paged_attention._paged_split_kernel,
     dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, table_ptr=I32, lengths_ptr=I32, part_ptr=FP32, lse_ptr=FP32),
     ("qk_scale",), dict(KVH=8, G=5, D=128, P=16, W=256, SPLITS=33, BLOCK_G=16, BLOCK_N=64, DOT_IN_FP32=False), 4),
    (paged_attention._paged_combine_kernel,
     dict(part_ptr=FP32, lse_ptr=FP32, lengths_ptr=I32, out_ptr=BF16, sums_ptr=FP32), (),
     dict(H=40, D=128, SPLITS=33, BLOCK_N=64, BLOCK_S=64, HEADS=1, OPERAND=True), 4),
]  # fmt: skip


def compile_early(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, num_warps: int):
    """``kernel`` compiled for sm_90 with EARLY, its pointers 16-byte aligned and its integers multiples of 16."""
    constexprs = {**constexprs, "EARLY": True}
    names = kernel.arg_names
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
        for name in names
    }
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={
            (i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if signature[name] not in ("constexpr", "fp32")
        },
    )  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def first_line(ptx: list[str], pattern: str) -> int:
    """Index of the first PTX line matching ``pattern`` (a regex), or len(ptx)."""
    return next((i for i, line in enumerate(ptx) if re.search(pattern, line)), len(ptx))


STORE = r"^\s*(@%p\d+\s+)?(st\.global|atom\.|red\.)"
LOAD = r"^\s*(@%p\d+\s+)?ld\.global"


def check_order(ptx: list[str], loads_allowed: bool) -> None:
    signal = first_line(ptx, r"griddepcontrol\.launch_dependents")
    wait = first_line(ptx, r"griddepcontrol\.wait")
    assert signal < wait < len(ptx), "no launch_dependents, then wait"
    assert first_line(ptx, STORE) > wait, "a global store before the wait"
    if not loads_allowed:
        assert first_line(ptx, LOAD) > wait, "a global load before the wait"


@pytest.mark.parametrize("spec", KERNELS, ids=[spec[0].fn.__name__ for spec in KERNELS])
def test_a_decode_kernel_launched_early_signals_then_waits_before_touching_memory(spec):
    ptx = compile_early(*spec).asm["ptx"].splitlines()
    check_order(ptx, loads_allowed=False)


def test_the_gemv_launched_early_loads_weights_but_stores_nothing_before_the_wait():
    from bench.sass import compile_gemv
    from compute.kernels.gemv_configs import MmaConfig

    ptx = compile_gemv(MmaConfig(tiles=2, warps=2, groups=2, splits=12), 27648).asm["ptx"].splitlines()
    check_order(ptx, loads_allowed=True)
    assert first_line(ptx, LOAD) < first_line(ptx, r"griddepcontrol\.wait"), "its first weights load early"


def test_the_order_check_fails_a_kernel_that_stores_before_its_wait():
    """The check above can fail: a kernel that writes before waiting is caught."""
    import triton.language as tl

    from compute.kernels.pdl import signal_dependents, wait_for_producers

    @triton.jit
    def _eager_writer(out_ptr, EARLY: tl.constexpr):
        signal_dependents(EARLY)
        tl.store(out_ptr + tl.arange(0, 32), tl.zeros((32,), tl.float32))
        wait_for_producers(EARLY)

    ptx = compile_early(_eager_writer, dict(out_ptr=FP32), (), {}, 1).asm["ptx"].splitlines()
    with pytest.raises(AssertionError, match="store before the wait"):
        check_order(ptx, loads_allowed=False)
