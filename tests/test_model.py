"""compute.model and compute.int4_linear: the patched Qwen2 against stock transformers, and the unit hooks.

``CheckpointWeights`` (a test double of ``protocol.client.LoaderClient``) and ``reference_model`` are also used
by tests/test_engine.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

from compute.int4_linear import Int4Linear, UnboundWeightError
from compute.model import HostEmbedding, build_model
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import MANIFEST_NAME, QWEIGHT_SUFFIX, SCALES_SUFFIX, FormatError, dequantize


class CheckpointWeights:
    """Test double of the loader client: serves each unit's qweight/scales from a ``QuantizedCheckpoint``.

    It records every call and refuses what the real ring would refuse: acquiring a unit while another is held,
    or releasing one that is not held.
    """

    plan = None  # an in-process source: nothing streams

    def __init__(self, checkpoint: QuantizedCheckpoint, device: str = "cpu"):
        self.units = {
            unit.name: {
                linear + suffix: checkpoint.tensor(linear + suffix).to(device)
                for linear in unit.linears
                for suffix in (QWEIGHT_SUFFIX, SCALES_SUFFIX)
            }
            for unit in checkpoint.manifest.units
        }
        self.calls: list[tuple[str, str]] = []
        self.held: str | None = None

    def acquire(self, unit: str, stream=None) -> dict[str, torch.Tensor]:
        assert self.held is None, f"acquire({unit!r}) while {self.held!r} is still held"
        self.calls.append(("acquire", unit))
        self.held = unit
        return self.units[unit]

    def release(self, unit: str, stream=None) -> None:
        assert self.held == unit, f"release({unit!r}) but {self.held!r} is held"
        self.calls.append(("release", unit))
        self.held = None


def reference_model(qdir: Path, workdir: Path) -> Qwen2ForCausalLM:
    """Stock transformers Qwen2 (bf16, SDPA) loaded by ``from_pretrained`` from a plain HF checkpoint, written in
    ``workdir``, that holds the quantized checkpoint's dense tensors and its Linears dequantized."""
    checkpoint = QuantizedCheckpoint(qdir)
    state = {name: checkpoint.tensor(name) for name in checkpoint.dense_tensor_names()}
    for linear in checkpoint.manifest.linears:
        state[linear + ".weight"] = dequantize(
            checkpoint.tensor(linear + QWEIGHT_SUFFIX), checkpoint.tensor(linear + SCALES_SUFFIX), dtype=torch.bfloat16
        )
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(qdir / "config.json", workdir / "config.json")
    save_file(state, workdir / "model.safetensors", metadata={"format": "pt"})
    model = Qwen2ForCausalLM.from_pretrained(workdir, dtype=torch.bfloat16, attn_implementation="sdpa")
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


@pytest.fixture(params=["untied", "tied"])
def qdir(request) -> Path:
    return request.getfixturevalue("tiny_q" if request.param == "untied" else "tiny_q_tied")


def expected_calls(checkpoint: QuantizedCheckpoint) -> list[tuple[str, str]]:
    return [(kind, unit.name) for unit in checkpoint.manifest.units for kind in ("acquire", "release")]


def test_logits_match_stock_transformers_with_dequantized_weights(qdir, tmp_path):
    checkpoint = QuantizedCheckpoint(qdir)
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")
    reference = reference_model(qdir, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    with torch.inference_mode():
        ours = model(input_ids=ids).logits.float()
        expected = reference(input_ids=ids).logits.float()
    assert ours.shape == (1, 13, model.config.vocab_size)
    # The same bf16 weights through the same ops: only a kernel's accumulation order may differ (a few ulps).
    torch.testing.assert_close(ours, expected, atol=1e-2 * expected.abs().max().item(), rtol=0)


def test_units_are_acquired_in_execution_order_and_released_each_forward(qdir):
    checkpoint = QuantizedCheckpoint(qdir)
    weights = CheckpointWeights(checkpoint)
    model = build_model(checkpoint, weights, "cpu")
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 300, (1, 5)), logits_to_keep=1)
        model(input_ids=torch.randint(0, 300, (1, 1)), logits_to_keep=1)
    assert weights.calls == expected_calls(checkpoint) * 2
    assert weights.held is None
    assert not any(m.is_bound for m in model.modules() if isinstance(m, Int4Linear))


def test_a_unit_run_out_of_execution_order_is_refused(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = CheckpointWeights(checkpoint)
    model = build_model(checkpoint, weights, "cpu")
    with pytest.raises(RuntimeError, match="unit 'lm_head' ran out of order: the forward pass is at 'layers.0'"):
        model.lm_head(torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16))
    assert weights.calls == []


def test_abandon_pass_walks_the_units_an_interrupted_forward_did_not_reach(qdir):
    checkpoint = QuantizedCheckpoint(qdir)
    weights = CheckpointWeights(checkpoint)
    model = build_model(checkpoint, weights, "cpu")

    def interrupt(_module, _args):
        handle.remove()
        raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        model(input_ids=torch.randint(0, 300, (1, 4)))
    assert model.unit_binder.in_pass and weights.held == "layers.1"
    model.unit_binder.abandon_pass()
    assert not model.unit_binder.in_pass and weights.held is None
    assert weights.calls == expected_calls(checkpoint)
    assert not any(m.is_bound for m in model.modules() if isinstance(m, Int4Linear))
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 300, (1, 4)))
    assert weights.calls == expected_calls(checkpoint) * 2


def test_every_manifest_linear_is_int4_and_the_rest_is_materialized(qdir, tmp_path):
    checkpoint = QuantizedCheckpoint(qdir)
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")
    int4 = {name for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert int4 == set(checkpoint.manifest.linears)
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta, name
    assert not any(key.endswith((QWEIGHT_SUFFIX, SCALES_SUFFIX)) for key in model.state_dict())
    bias = "model.layers.1.self_attn.v_proj.bias"
    assert torch.equal(model.get_parameter(bias), checkpoint.tensor(bias))
    assert model.model.layers[0].self_attn.o_proj.bias is None
    # inv_freq is not in any checkpoint: it must have been computed again, as stock transformers does
    reference = reference_model(qdir, tmp_path)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_tied_lm_head_is_the_embedding_and_not_a_unit(tiny_q_tied):
    checkpoint = QuantizedCheckpoint(tiny_q_tied)
    assert "lm_head" not in [unit.name for unit in checkpoint.manifest.units]
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, checkpoint.tensor("model.embed_tokens.weight"))


def test_untied_lm_head_is_an_int4_unit(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")
    assert isinstance(model.lm_head, Int4Linear)
    assert checkpoint.manifest.units[-1].name == "lm_head"


def test_an_unsupported_architecture_is_refused_by_name(tiny_q, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_q, copy)
    manifest = copy / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"Qwen2ForCausalLM"', '"LlamaForCausalLM"'))
    checkpoint = QuantizedCheckpoint(copy)
    with pytest.raises(FormatError, match="'LlamaForCausalLM' is not supported .supported: Qwen2ForCausalLM"):
        build_model(checkpoint, CheckpointWeights(checkpoint), "cpu")


def test_int4_linear_used_unbound_names_itself():
    linear = Int4Linear(256, 64, bias=True, name="model.layers.7.mlp.up_proj")
    with pytest.raises(UnboundWeightError, match=r"model\.layers\.7\.mlp\.up_proj"):
        linear(torch.zeros(1, 256, dtype=torch.bfloat16))


def test_int4_linear_binds_views_without_copying_and_computes_the_dequantized_product():
    out_features, in_features = 48, 256
    weight = torch.randn(out_features, in_features)
    from quantizer.format import quantize

    qweight, scales = quantize(weight)
    linear = Int4Linear(in_features, out_features, bias=True, name="probe")
    linear.bias.copy_(torch.randn(out_features))
    linear.bind(qweight, scales)
    assert linear.qweight.data_ptr() == qweight.data_ptr() and linear.scales.data_ptr() == scales.data_ptr()
    x = torch.randn(3, in_features, dtype=torch.bfloat16)
    expected = x.float() @ dequantize(qweight, scales, torch.float32).T + linear.bias.float()
    torch.testing.assert_close(linear(x).float(), expected, atol=0.1, rtol=0.02)
    linear.unbind()
    assert not linear.is_bound


@pytest.mark.parametrize(
    ("qshape", "qdtype", "sshape", "message"),
    [
        ((48, 64), torch.uint8, (48, 2), r"qweight is torch.uint8 \(48, 64\), expected torch.uint8 \(48, 128\)"),
        ((48, 128), torch.int8, (48, 2), "qweight is torch.int8"),
        ((48, 128), torch.uint8, (48, 1), r"scales are torch.bfloat16 \(48, 1\), expected torch.bfloat16 \(48, 2\)"),
    ],
)
def test_int4_linear_refuses_weights_of_the_wrong_shape_or_dtype(qshape, qdtype, sshape, message):
    linear = Int4Linear(256, 48, bias=False, name="probe")
    with pytest.raises(ValueError, match=message):
        linear.bind(torch.zeros(qshape, dtype=qdtype), torch.ones(sshape, dtype=torch.bfloat16))


def test_int4_linear_refuses_an_input_width_that_is_not_a_whole_number_of_blocks():
    with pytest.raises(ValueError, match="in_features=200 is not a multiple"):
        Int4Linear(200, 8, bias=False, name="odd")


def test_host_embedding_looks_rows_up_like_the_embedding():
    weight = torch.randn(50, 16, dtype=torch.bfloat16)
    table = torch.nn.Embedding.from_pretrained(weight)
    host = HostEmbedding(weight.clone(), "cpu")
    for ids in (torch.tensor([[3, 0, 49, 3]]), torch.tensor([7]), torch.randint(0, 50, (2, 5))):
        assert torch.equal(host(ids), table(ids))
    with pytest.raises(ValueError, match="2-D host tensor"):
        HostEmbedding(torch.zeros(5), "cpu")


def test_the_embedding_stays_on_the_host_when_asked_and_never_for_a_tied_model(tiny_q, tiny_q_tied, tmp_path):
    checkpoint = QuantizedCheckpoint(tiny_q)
    model = build_model(checkpoint, CheckpointWeights(checkpoint), "cpu", host_embedding=True)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, HostEmbedding) and model.model.embed_tokens is embedding
    assert torch.equal(embedding.weight, checkpoint.tensor("model.embed_tokens.weight"))
    # the model computes what stock transformers does with the same weights
    reference = reference_model(tiny_q, tmp_path)
    ids = torch.tensor([[5, 17, 3, 250, 42]])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0.03, rtol=0)
    assert not isinstance(build_model(checkpoint, CheckpointWeights(checkpoint), "cpu").get_input_embeddings(), HostEmbedding)
    tied = QuantizedCheckpoint(tiny_q_tied)
    with pytest.raises(ValueError, match="tied model's embedding is its lm_head"):
        build_model(tied, CheckpointWeights(tied), "cpu", host_embedding=True)
