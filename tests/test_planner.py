"""The planner on the real DeepSeek-R1-Distill-Qwen-32B shapes (a config dict and an in-memory manifest, no files),
its refusals, its table, and parse_size."""

from __future__ import annotations

import functools

import click
from click.testing import CliRunner
import pytest

from loader.layout import layout_units
from quantizer.checkpoint import QuantizedCheckpoint
from loader.planner import (
    choose_prefill_chunk,
    ALLOCATOR_MARGIN_BYTES,
    BudgetError,
    budget_lines,
    plan_placement,
)
from loader.policies import get_policy
from protocol.defaults import CUDA_CONTEXT_BYTES
from protocol.sizes import SIZE, parse_size
from quantizer.format import Manifest, TensorEntry, UnitEntry

GiB = 1 << 30
QWEN2_32B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
LAYER_LINEARS = {
    "self_attn.q_proj": (5120, 5120),
    "self_attn.k_proj": (1024, 5120),
    "self_attn.v_proj": (1024, 5120),
    "self_attn.o_proj": (5120, 5120),
    "mlp.gate_proj": (27648, 5120),
    "mlp.up_proj": (27648, 5120),
    "mlp.down_proj": (5120, 27648),
}


def qwen2_32b_units():
    """UnitLayouts of the 32B model's INT4 Linears: 64 layers and the untied lm_head."""
    tensors, units = [], []

    def linear(name: str, out_features: int, in_features: int) -> str:
        tensors.append(TensorEntry(name=name + ".qweight", dtype="U8", shape=(out_features, in_features // 2), file="x"))
        tensors.append(TensorEntry(name=name + ".scales", dtype="BF16", shape=(out_features, in_features // 128), file="x"))
        return name

    for layer in range(64):
        names = tuple(linear(f"model.layers.{layer}.{m}", *shape) for m, shape in LAYER_LINEARS.items())
        units.append(UnitEntry(name=f"layers.{layer}", linears=names))
    units.append(UnitEntry(name="lm_head", linears=(linear("lm_head", 152064, 5120),)))
    manifest = Manifest(architecture="Qwen2ForCausalLM", source="test", units=tuple(units), tensors=tuple(tensors), shards=())
    return layout_units(manifest)


UNITS = qwen2_32b_units()
LAYER_BYTES = UNITS[0].nbytes


def plan(budget: str, policy: str = "hybrid", *, device: str = "cuda", max_context: int = 4096, **kwargs):
    return plan_placement(
        budget_bytes=parse_size(budget), device=device, units=UNITS, config=QWEN2_32B, max_context=max_context,
        policy=get_policy(policy), **kwargs,
    )  # fmt: skip


def test_the_32b_unit_sizes():
    assert len(UNITS) == 65 and UNITS[-1].name == "lm_head"
    assert 250e6 < LAYER_BYTES < 252e6 and 400e6 < UNITS[-1].nbytes < 402e6
    assert 16.4e9 < sum(u.nbytes for u in UNITS) < 16.5e9  # the 32B model: about 16.5 GB with an INT4 lm_head


def test_lines_counted_for_the_32b_model():
    lines = dict(budget_lines(device="cuda", units=UNITS, config=QWEN2_32B, max_context=4096))
    assert lines["CUDA contexts (2 × 640.0 MiB)"] == 2 * CUDA_CONTEXT_BYTES
    assert lines["KV cache (4096 tokens)"] == 2 * 64 * 8 * 128 * 4096 * 2 == GiB
    # untied: the embedding stays in the compute process's host memory (compute.model.HostEmbedding)
    assert lines["norms, biases (bf16; embedding in host memory)"] == (129 * 5120 + 64 * (40 + 16) * 128) * 2
    assert lines["dequantization workspace"] == 27648 * 5120 * 2  # gate/up as bf16; not the lm_head
    assert lines["allocator margin"] == ALLOCATOR_MARGIN_BYTES
    assert 200 * 2**20 < lines["activations (prefill chunk 512)"] < 400 * 2**20
    # the KV cache and the attention scores grow with the context
    longer = dict(budget_lines(device="cuda", units=UNITS, config=QWEN2_32B, max_context=8192))
    assert longer["KV cache (8192 tokens)"] == 2 * GiB
    assert longer["activations (prefill chunk 512)"] > lines["activations (prefill chunk 512)"]
    # a tied lm_head is the embedding: on the device
    tied = dict(budget_lines(device="cuda", units=UNITS, config={**QWEN2_32B, "tie_word_embeddings": True}, max_context=4096))
    assert tied["embedding, norms, biases (bf16)"] == (152064 * 5120 + 129 * 5120 + 64 * (40 + 16) * 128) * 2
    # on CPU the same lines without the contexts, and the embedding counted: host memory is the device's there
    cpu = budget_lines(device="cpu", units=UNITS, config=QWEN2_32B, max_context=4096)
    assert cpu == [(what, n) for what, n in tied.items() if not what.startswith("CUDA")]
    with pytest.raises(ValueError, match="device 'gpu' is neither 'cpu' nor 'cuda'"):
        budget_lines(device="gpu", units=UNITS, config=QWEN2_32B, max_context=4096)
    with pytest.raises(ValueError, match="config.json: 'vocab_size' is None"):
        budget_lines(device="cpu", units=UNITS, config={**QWEN2_32B, "vocab_size": None}, max_context=4096)


def test_24gib_keeps_everything_resident():
    placement = plan("24GiB")
    assert placement.streamed == () and len(placement.resident) == 65 and placement.ring_slots == 0
    assert placement.pool_bytes == sum(u.nbytes for u in UNITS)
    assert placement.total_bytes <= 24 * GiB and placement.budget_bytes == 24 * GiB
    assert sum(n for _, n in placement.lines) == placement.total_bytes


@pytest.mark.parametrize("budget", ["12GiB", "8GiB"])
def test_smaller_budgets_stream_the_last_layers(budget):
    placement = plan(budget)
    streamed = [int(name.split(".")[1]) for name in placement.streamed]
    assert streamed and streamed == list(range(streamed[0], 64))  # one stretch, ending at the last layer
    assert "lm_head" in placement.resident and "layers.0" in placement.resident
    assert (placement.ring_slots, placement.prefetch_depth, placement.slot_bytes) == (2, 2, LAYER_BYTES)
    assert placement.pool_bytes == sum(u.nbytes for u in UNITS if u.name in placement.resident) + 2 * LAYER_BYTES
    assert placement.total_bytes <= parse_size(budget)
    assert parse_size(budget) - placement.total_bytes < LAYER_BYTES  # one more resident layer would not fit
    assert len(plan("8GiB").streamed) > len(plan("12GiB").streamed)


def test_stream_policy_at_8gib_uses_three_slots_of_the_lm_head():
    placement = plan("8GiB", "stream")
    assert placement.resident == () and len(placement.streamed) == 65
    assert (placement.ring_slots, placement.prefetch_depth, placement.slot_bytes) == (3, 2, UNITS[-1].nbytes)
    assert plan("8GiB", "stream", ring_slots=4, prefetch_depth=4).pool_bytes == 4 * UNITS[-1].nbytes


def test_small_budgets_are_refused_with_the_numbers():
    with pytest.raises(BudgetError) as refused:
        plan("3GiB")
    message = str(refused.value)
    assert message.startswith("--gpu-memory 3.00 GiB is too small: ")
    for part in ("KV cache (4096 tokens) 1.00 GiB", "ring (2 slots × 382.9 MiB) 765.7 MiB", "CUDA contexts (2 × 640.0 MiB) 1.25 GiB",
                 "needed for policy 'hybrid'", "lower --max-context or raise --gpu-memory"):  # fmt: skip
        assert part in message, message
    needed = float(message.split(" = ")[1].split(" GiB")[0])
    assert 3.0 < needed < 4.5
    # the same budget fits once the context is short enough
    assert plan("3GiB", max_context=1024).streamed


def test_resident_refuses_what_does_not_fit_and_names_the_alternatives():
    with pytest.raises(BudgetError, match=r"resident weights \(65 units\) 15.36 GiB .* policy 'resident'; use --policy hybrid or stream"):
        plan("16GiB", "resident")
    assert plan("20GiB", "resident").resident[-1] == "lm_head"
    with pytest.raises(BudgetError, match="use --ring-slots 2"):
        plan("4GiB", "stream")


def test_cpu_budget_bounds_the_same_way():
    cuda, cpu = plan("8GiB"), plan("8GiB", device="cpu")
    assert not any(what.startswith("CUDA") for what, _ in cpu.lines)
    # CPU: no contexts (1.25 GiB), but the embedding (1.45 GiB) counts, host memory being the device's there
    fixed = lambda placement: sum(n for what, n in placement.lines if not what.startswith(("resident", "ring")))  # noqa: E731
    assert fixed(cpu) - fixed(cuda) == 152064 * 5120 * 2 - 2 * CUDA_CONTEXT_BYTES
    assert len(cpu.resident) <= len(cuda.resident) and cpu.total_bytes <= 8 * GiB


def test_table_shows_lines_placement_and_total():
    table = plan("12GiB").table()
    for part in ("policy 'hybrid'", "max context 4096", "KV cache (4096 tokens)", "1.00 GiB", "resident: layers.0 … layers.",
                 "lm_head (", "streamed: layers.", "… layers.63", "through 2 × 239.8 MiB slots, prefetch depth 2", "of 12.00 GiB budget"):  # fmt: skip
        assert part in table, table
    assert "streamed" not in plan("24GiB").table()


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("24GiB", 24 * GiB), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("8G", 8 * GiB), ("8g", 8 * GiB),
     (" 2 gib ", 2 * GiB), ("0.5GiB", GiB // 2), ("100", 100), ("64KB", 64_000), ("3k", 3072), (".5M", 1 << 19),
     ("1TiB", 1 << 40), ("7B", 7)],
)  # fmt: skip
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-1GiB", "1.2.3GB", "24 GiB of memory", "0", "0.0001B"])
def test_parse_size_refuses_with_a_hint(text):
    with pytest.raises(ValueError, match=r"not a (usable )?size") as refused:
        parse_size(text)
    assert repr(text) in str(refused.value)


def test_size_click_type():
    @click.command()
    @click.option("--gpu-memory", type=SIZE, required=True)
    def show(gpu_memory):
        click.echo(gpu_memory)

    ok = CliRunner().invoke(show, ["--gpu-memory", "1.5GiB"])
    assert ok.exit_code == 0 and ok.output.strip() == str(3 * GiB // 2)
    bad = CliRunner().invoke(show, ["--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "'lots' is not a size" in bad.output


@pytest.mark.parametrize(("policy", "slots"), [("hybrid", 2), ("stream", 2), ("stream", 3)])
def test_tiny_model_on_cpu_streams_through_a_small_ring(tiny_q, policy, slots):
    """On the real quantizer's output and config.json: a budget a little over the fixed lines forces the ring."""
    checkpoint = QuantizedCheckpoint(tiny_q)
    units = layout_units(checkpoint.manifest)
    fixed = sum(n for _, n in budget_lines(device="cpu", units=units, config=checkpoint.config, max_context=256))
    largest = max(u.nbytes for u in units)
    kwargs = dict(device="cpu", units=units, config=checkpoint.config, max_context=256, policy=get_policy(policy))
    placement = plan_placement(budget_bytes=fixed + slots * largest, ring_slots=slots, **kwargs)
    assert placement.ring_slots == slots and placement.streamed and placement.total_bytes <= fixed + slots * largest
    assert not any(what.startswith("CUDA") for what, _ in placement.lines)
    with pytest.raises(BudgetError, match=f"needed for policy '{policy}'"):
        plan_placement(budget_bytes=fixed + slots * largest - 1, ring_slots=slots, **kwargs)


def test_a_longer_prefill_chunk_only_when_it_costs_no_residency():
    def plan_for(budget):
        return functools.partial(plan, budget)

    # 24 GiB: everything resident with room to spare -> the longest chunk, still everything resident
    assert choose_prefill_chunk(plan_for("24GiB")) == 2048
    longest = plan("24GiB", prefill_chunk=2048)
    assert longest.streamed == () and longest.total_bytes <= 24 * GiB
    assert dict(longest.lines)["activations (prefill chunk 2048)"] > dict(plan("24GiB").lines)["activations (prefill chunk 512)"]
    # 12 GiB: a longer chunk would push a layer out of the pool -> the default
    assert choose_prefill_chunk(plan_for("12GiB")) == 512
    assert len(plan("12GiB", prefill_chunk=1024).resident) < len(plan("12GiB").resident)
    # what the default cannot fit is refused as before
    with pytest.raises(BudgetError, match="is too small"):
        choose_prefill_chunk(plan_for("3GiB"))


KV_BYTES_PER_TOKEN_32B = 2 * 64 * 8 * 128 * 2  # keys and values, 64 layers, 8 KV heads of 128, bf16


def test_many_sequences_share_a_paged_kv_pool_counted_in_whole_pages():
    one = plan("12GiB")
    batched = plan("12GiB", max_batch=16, kv_tokens=5000)  # 5000 -> 157 pages of 32 = 5024 positions
    assert (batched.max_batch, batched.kv_tokens, one.max_batch, one.kv_tokens) == (16, 5024, 1, 0)
    lines, one_lines = dict(batched.lines), dict(one.lines)
    assert lines["KV pool (5024 tokens, paged)"] == (5024 + 32) * KV_BYTES_PER_TOKEN_32B  # and the padding page
    assert one_lines["KV cache (4096 tokens)"] == 4096 * KV_BYTES_PER_TOKEN_32B
    activations = next(n for what, n in batched.lines if what.startswith("activations"))
    one_activations = next(n for what, n in one.lines if what.startswith("activations"))
    # 16 logit rows (bf16 + float32) and one sequence's gathered keys/values for 40 heads
    assert activations - one_activations == 16 * 152064 * 6 + 2 * 4096 * 40 * 128 * 2
    assert "batch 16, KV pool 5024 tokens" in batched.table()
    assert batched.total_bytes <= parse_size("12GiB") and len(batched.resident) < len(one.resident)


def test_a_batch_without_kv_tokens_gets_the_memory_of_one_context_and_keeps_the_residency():
    one = plan("8GiB")
    batched = plan("8GiB", max_batch=16)
    assert batched.kv_tokens == 4096 and dict(batched.lines)["KV pool (4096 tokens, paged)"] == 4128 * KV_BYTES_PER_TOKEN_32B
    assert batched.resident == one.resident and batched.streamed == one.streamed


def test_a_kv_pool_smaller_than_one_context_is_refused():
    with pytest.raises(ValueError, match="--kv-tokens 1000 is less than --max-context 4096"):
        plan("24GiB", max_batch=4, kv_tokens=1000)
    with pytest.raises(BudgetError, match="or --kv-tokens"):
        plan("8GiB", "stream", max_batch=4, kv_tokens=200_000)
