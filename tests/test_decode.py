"""compute.decode: the fused decode layer against HF's decoder layers, on CPU through the Triton interpreter and on
CUDA; the q/k/v and gate/up weights viewed as one matrix in the loader's layout, copied otherwise.

The comparison runs the same decode steps twice from the same prefilled cache, once through HF's modules
(``DecodeStep(fused=False)``) and once through ``FusedDecodeLayer`` (``fused=True``), and compares the logits and
every layer's cache. The engine on CUDA takes the fused path by default, so the GPU tests of test_engine.py and
test_graphs.py also hold it to stock transformers, graphs included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import sdpa_kernel
from transformers import AutoConfig, StaticCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # when run as the interpreter child process

from compute.decode import fused_decode_unsupported, stacked  # noqa: E402
from quantizer.model_spec import head_dim  # noqa: E402
from compute.decode_step import DecodeStep  # noqa: E402
from compute.segments import eager_segment  # noqa: E402
from compute.engine import PREFILL_ATTENTION_BACKENDS  # noqa: E402
from compute.model import build_model  # noqa: E402
from compute.speculate.tree import ROOT, DraftTree, ancestor_bits, tree_attention_mask, tree_positions  # noqa: E402
from loader.layout import layout_units  # noqa: E402
from quantizer.checkpoint import QuantizedCheckpoint, tensor_view  # noqa: E402
from test_model import CheckpointWeights  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_CONTEXT = 32
PROMPT = [5, 17, 3, 250, 42, 7, 99]
DECODED = [11, 180, 64, 2]  # fed one per decode step, at positions len(PROMPT) ...
# a speculative pass's rows after PROMPT: the root token, then a drafted tree (two children of the root, a chain
# under the first, a leaf under the second)
ROOT_TOKEN = 9
TREE = DraftTree((11, 180, 64, 2, 77), (ROOT, ROOT, 0, 2, 1), (0.0,) * 5)


class PooledWeights(CheckpointWeights):
    """``CheckpointWeights`` whose units lie in one buffer each, in the loader's layout (``loader.layout``): the
    views the real loader client hands out, so that q/k/v and gate/up are adjacent as in the product."""

    def __init__(self, checkpoint: QuantizedCheckpoint, device: str = "cpu"):
        super().__init__(checkpoint, device)
        for layout in layout_units(checkpoint.manifest):
            buffer = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
            views = {}
            for slot in layout.tensors:
                views[slot.name] = tensor_view(buffer, slot.offset, slot.nbytes, slot.dtype, slot.shape)
                views[slot.name].copy_(self.units[layout.name][slot.name])
            self.units[layout.name] = views


def decode_both_ways(
    qdir: Path, device: str, weights_class=PooledWeights, ways: tuple[bool, ...] = (False, True)
) -> dict[bool, dict[str, torch.Tensor]]:
    """Prefill ``PROMPT``, then decode ``DECODED`` through HF's layers (False) and the fused ones (True), each from
    its own freshly prefilled cache: per way the logits of every step and every layer's cache at the end."""
    checkpoint = QuantizedCheckpoint(qdir)
    model = build_model(checkpoint, weights_class(checkpoint, device), device)
    config = model.config
    units = [name for name, _ in model.unit_binder.units]
    results = {}
    for fused in ways:
        cache = make_cache(config, device)
        with torch.inference_mode():
            model(input_ids=torch.tensor([PROMPT], device=device), past_key_values=cache, use_cache=True)
            step = DecodeStep(model, cache, torch.device(device), MAX_CONTEXT, fused=fused)
            rows = []
            for offset, token in enumerate(DECODED):
                step.set(token, len(PROMPT) + offset)
                rows.append(step.run(eager_segment(units, config.num_hidden_layers)).float().clone())
        results[fused] = {
            "logits": torch.stack(rows),
            "keys": torch.stack([layer.keys.float() for layer in cache.layers]),
            "values": torch.stack([layer.values.float() for layer in cache.layers]),
            "lengths": torch.stack([layer.cumulative_length for layer in cache.layers]),
        }
    return results


def make_cache(config, device: str) -> StaticCache:
    cache = StaticCache(config=config, max_cache_len=MAX_CONTEXT)
    cache.early_initialization(
        batch_size=1, num_heads=config.num_key_value_heads, head_dim=head_dim(config), dtype=torch.bfloat16,
        device=device,
    )  # fmt: skip
    return cache


def verify_both_ways(qdir: Path, device: str, rows: int | None = None) -> dict[bool, dict[str, torch.Tensor]]:
    """Prefill ``PROMPT``, then run the rows of ``TREE`` (after ``ROOT_TOKEN``) in one pass: through HF's modules
    under the tree's attention mask (False; what ``Engine.forward_rows`` runs) and through a fused step of ``rows``
    rows (True; default: as many as the tree's, else the extra ones padding as ``Decoder.rows`` pads them). Per
    way every real row's logits and every layer's cache rows after the prompt."""
    checkpoint = QuantizedCheckpoint(qdir)
    model = build_model(checkpoint, PooledWeights(checkpoint, device), device)
    config = model.config
    units = [name for name, _ in model.unit_binder.units]
    prefix, real = len(PROMPT), 1 + len(TREE)
    rows = rows or real
    tokens, positions = [ROOT_TOKEN, *TREE.tokens], tree_positions(TREE, prefix)
    results = {}
    for fused in (False, True):
        cache = make_cache(config, device)
        with torch.inference_mode():
            model(input_ids=torch.tensor([PROMPT], device=device), past_key_values=cache, use_cache=True)
            if fused:
                step = DecodeStep(model, cache, torch.device(device), MAX_CONTEXT, fused=True, rows=rows)
                pad = rows - real
                step.set_rows(tokens + [0] * pad, positions.tolist() + [prefix] * pad, prefix,
                              ancestor_bits(TREE) + [1 << r for r in range(real, rows)])  # fmt: skip
                logits = step.run(eager_segment(units, config.num_hidden_layers))[:real]
            else:
                mask = tree_attention_mask(TREE, prefix, MAX_CONTEXT).to(device)[None, None]
                with sdpa_kernel(PREFILL_ATTENTION_BACKENDS):
                    out = model(
                        input_ids=torch.tensor([tokens], device=device), position_ids=positions.to(device)[None],
                        attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=0,
                    )  # fmt: skip
                logits = out.logits[0]
        results[fused] = {
            "logits": logits.float().clone(),
            "keys": torch.stack([layer.keys[..., prefix : prefix + real, :].float() for layer in cache.layers]),
            "values": torch.stack([layer.values[..., prefix : prefix + real, :].float() for layer in cache.layers]),
        }
    return results


def check_verify_agreement(results, logit_tolerance: float, cache_tolerance: float) -> None:
    hf, fused = results[False], results[True]
    for name in ("keys", "values"):
        for layer, (ours, theirs) in enumerate(zip(fused[name], hf[name])):
            error = float((ours - theirs).norm() / theirs.norm())
            assert error < cache_tolerance, f"layer {layer}'s {name}: relative error {error:.2e} against HF's"
    torch.testing.assert_close(fused["logits"], hf["logits"], atol=logit_tolerance, rtol=0)
    assert torch.equal(fused["logits"].argmax(-1), hf["logits"].argmax(-1))


def check_agreement(results: dict[bool, dict[str, torch.Tensor]], logit_tolerance: float, cache_tolerance: float) -> None:
    hf, fused = results[False], results[True]
    assert torch.equal(fused["lengths"], hf["lengths"]), (fused["lengths"], hf["lengths"])
    assert int(hf["lengths"][0]) == len(PROMPT) + len(DECODED)
    written = len(PROMPT) + len(DECODED)
    # Keys and values: the prompt's bit for bit (one prefill), the decoded tokens' within bf16 noise of HF's, per
    # layer (attention keeps fp32 where HF rounds to bf16, and what a layer writes depends on the layers before);
    # beyond the last position written, untouched zeros.
    prompt = len(PROMPT)
    for name in ("keys", "values"):
        assert torch.equal(fused[name][..., :prompt, :], hf[name][..., :prompt, :])
        for layer, (ours, theirs) in enumerate(zip(fused[name], hf[name])):
            ours, theirs = ours[..., prompt:written, :], theirs[..., prompt:written, :]
            error = float((ours - theirs).norm() / theirs.norm())
            assert error < cache_tolerance, f"layer {layer}'s {name}: relative error {error:.2e} against HF's"
        assert not fused[name][..., written:, :].any()
    torch.testing.assert_close(fused["logits"], hf["logits"], atol=logit_tolerance, rtol=0)
    assert torch.equal(fused["logits"].argmax(-1), hf["logits"].argmax(-1))


def test_stacked_views_adjacent_weights_and_copies_the_rest():
    pool = torch.arange(64, dtype=torch.uint8)
    a, b = pool[0:16].view(4, 4), pool[16:24].view(2, 4)
    linears = [type("L", (), {"qweight": t, "scales": t}) for t in (a, b)]
    qweight, _ = stacked(linears)
    assert qweight.shape == (6, 4) and qweight.data_ptr() == a.data_ptr() and torch.equal(qweight, pool[:24].view(6, 4))
    apart = pool[32:40].view(2, 4)  # not where a ends: a copy
    linears[1].qweight = linears[1].scales = apart
    qweight, _ = stacked(linears)
    assert qweight.data_ptr() != a.data_ptr() and torch.equal(qweight, torch.cat([a, apart]))
    # Where a ends, but in another storage (the caching allocator can place two tensors side by side): a copy too.
    other = torch.empty(0, dtype=torch.uint8)
    other.set_(pool.untyped_storage()[16:24], 0, (2, 4), (4, 1))
    assert other.data_ptr() == a.data_ptr() + a.nbytes and other.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr()
    linears[1].qweight = linears[1].scales = other
    qweight, _ = stacked(linears)
    assert qweight.data_ptr() != a.data_ptr() and torch.equal(qweight, torch.cat([a, other]))


def test_models_the_fused_layer_cannot_run_are_named(tiny_q):
    config = AutoConfig.from_pretrained(tiny_q)
    assert fused_decode_unsupported(config) is None
    config.hidden_act = "gelu"
    assert "gelu" in fused_decode_unsupported(config)
    config = AutoConfig.from_pretrained(tiny_q)
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    assert "sliding" in fused_decode_unsupported(config)
    config = AutoConfig.from_pretrained(tiny_q)
    config.head_dim = 80
    assert "head sizes 16, 32, … 256 (the model's is 80)" in fused_decode_unsupported(config)
    assert "runs in torch.float16" in fused_decode_unsupported(AutoConfig.from_pretrained(tiny_q), torch.float16)


def test_the_decode_step_keeps_hf_layers_on_cpu_unless_told(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")
    cache = StaticCache(config=model.config, max_cache_len=MAX_CONTEXT)
    assert DecodeStep(model, cache, torch.device("cpu"), MAX_CONTEXT).fused_layers is None
    assert DecodeStep(model, cache, torch.device("cpu"), MAX_CONTEXT, fused=True).fused_layers is not None
    with pytest.raises(ValueError, match="a step of 4 rows needs fused decode layers"):
        DecodeStep(model, cache, torch.device("cpu"), MAX_CONTEXT, rows=4)
    with pytest.raises(ValueError, match="a step of 17 rows"):
        DecodeStep(model, cache, torch.device("cpu"), MAX_CONTEXT, fused=True, rows=17)
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="gelu"):
        DecodeStep(model, cache, torch.device("cpu"), MAX_CONTEXT, fused=True)


def test_fused_decode_layers_follow_hf_in_the_interpreter(tiny_q):
    """Runs ``interpreter_cases`` below in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, __file__, str(tiny_q)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"interpreter cases failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.count("ok ") == 4, done.stdout


def interpreter_cases(untied: Path) -> None:
    # The interpreter rounds fp32 -> bf16 toward zero where CUDA rounds to nearest: a bias of half an ulp (2**-9)
    # per rounding, the same way each time, so the six roundings between the embedding and the cache add up to
    # ~1% instead of averaging out; a few bf16 ulps of the logits (|logits| < 4 here, an ulp 2**-6).
    check_agreement(decode_both_ways(untied, "cpu"), logit_tolerance=0.1, cache_tolerance=0.03)
    print("ok untied, pooled weights")
    check_agreement(decode_both_ways(untied, "cpu", CheckpointWeights), logit_tolerance=0.1, cache_tolerance=0.03)
    print("ok untied, separate weights (copied into one matrix)")
    check_verify_agreement(verify_both_ways(untied, "cpu"), logit_tolerance=0.1, cache_tolerance=0.03)
    print("ok a tree of 6 rows in one pass")
    check_verify_agreement(verify_both_ways(untied, "cpu", rows=8), logit_tolerance=0.1, cache_tolerance=0.03)
    print("ok the same tree padded to 8 rows")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("weights_class", [PooledWeights, CheckpointWeights], ids=["pooled", "separate"])
def test_fused_decode_layers_follow_hf_on_cuda(tiny_q, weights_class):
    check_agreement(decode_both_ways(tiny_q, "cuda", weights_class), logit_tolerance=0.03, cache_tolerance=0.01)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [None, 16])
def test_fused_verify_rows_follow_hf_on_cuda(tiny_q, rows):
    check_verify_agreement(verify_both_ways(tiny_q, "cuda", rows), logit_tolerance=0.03, cache_tolerance=0.01)


@pytest.mark.gpu
@requires_cuda
def test_early_launch_changes_no_bit_of_the_fused_decode_step(tiny_q, monkeypatch):
    """Every kernel of the fused step launched early (compute.kernels.pdl) against every one launched plainly: the
    same logits and caches, bit for bit (a kernel reading before its producer finished would differ)."""
    from compute.kernels import pdl

    if not pdl.early_launch(torch.device("cuda")):
        pytest.skip("early launch needs compute capability 9 or later")
    early = decode_both_ways(tiny_q, "cuda", ways=(True,))[True]
    monkeypatch.setattr(pdl, "_EARLY_LAUNCH", False)
    assert not pdl.early_launch(torch.device("cuda"))
    plain = decode_both_ways(tiny_q, "cuda", ways=(True,))[True]
    for name, tensor in early.items():
        assert torch.equal(tensor, plain[name]), name


if __name__ == "__main__":
    interpreter_cases(Path(sys.argv[1]))
