"""compute.graphs and the engine's CUDA-graph decode: when it captures, that replay follows stock transformers, and
when it must not capture (streamed units, a new plan, a failed capture).

The GPU tests compare the graph engine against stock transformers by teacher forcing (``generate_checked``), and
count the lm_head's forward hooks to prove that decode steps after the capture replay instead of running Python.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from compute.engine import Engine
from compute.graphs import DECODE_ATTENTION, DecodeGraph, grouped_decode_attention, unit_addresses_fixed
from compute.launch import LaunchedLoader, LoaderOptions
from loader.layout import layout_units
from loader.planner import plan_placement
from loader.policies import get_policy
from protocol.client import LoaderClient
from quantizer.checkpoint import QuantizedCheckpoint
from test_engine import GREEDY, generate_checked, random_prompt
from test_model import CheckpointWeights, reference_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["untied", "tied"])
def qdir(request):
    return request.getfixturevalue("tiny_q" if request.param == "untied" else "tiny_q_tied")


def fake_plan(generation: int, streamed: set[str], units: list[str]) -> SimpleNamespace:
    """The fields of ``protocol.messages.Plan`` the engine reads to decide on a graph."""
    placements = [SimpleNamespace(name=u, pool_offset=None if u in streamed else 0) for u in units]
    return SimpleNamespace(generation=generation, policy="test", units=placements)


class PlannedWeights(CheckpointWeights):
    """``CheckpointWeights`` with a ``plan`` the test sets, standing in for the loader client's policy switches."""

    def __init__(self, checkpoint: QuantizedCheckpoint, device: str):
        super().__init__(checkpoint, device)
        self.unit_names = [unit.name for unit in checkpoint.manifest.units]
        self.plan = fake_plan(0, set(), self.unit_names)

    def switch(self, streamed: set[str]) -> None:
        self.plan = fake_plan(self.plan.generation + 1, streamed, self.unit_names)


def test_addresses_are_fixed_only_when_no_unit_streams():
    units = ["layers.0", "layers.1", "lm_head"]
    assert unit_addresses_fixed(SimpleNamespace()) is None  # an in-process source serves fixed tensors
    assert unit_addresses_fixed(SimpleNamespace(plan=fake_plan(1, set(), units))) is None
    reason = unit_addresses_fixed(SimpleNamespace(plan=fake_plan(1, {"layers.1", "lm_head"}, units)))
    assert reason is not None and "streams 2 units" in reason and "'test'" in reason


def test_grouped_decode_attention_equals_transformers_sdpa_with_repeated_kv_heads():
    module = SimpleNamespace(num_key_value_groups=5, is_causal=True, training=False)
    query = torch.randn(1, 40, 1, 16)  # (B, H, T, D)
    key, value = torch.randn(2, 1, 8, 24, 16).unbind(0)  # (B, KVH, KV, D)
    mask = (torch.arange(24) <= torch.randint(0, 24, ())).view(1, 1, 1, 24)  # (B, 1, T, KV)
    ours, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == expected.shape == (1, 1, 40, 16)
    torch.testing.assert_close(ours, expected)


def test_decode_steps_use_the_grouped_attention_and_prefill_does_not(tiny_q):
    calls: list[int] = []  # query positions of each call

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return grouped_decode_attention(module, query, *args, **kwargs)

    checkpoint = QuantizedCheckpoint(tiny_q)
    engine = Engine(checkpoint, CheckpointWeights(checkpoint), device="cpu", max_context=32, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    AttentionInterface.register(DECODE_ATTENTION, spy)
    try:
        result = engine.generate(random_prompt(6), GREEDY)
    finally:
        AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
    assert calls == [1] * (result.decode_tokens * engine.config.num_hidden_layers)
    assert engine.config._attn_implementation == "sdpa"


def test_cpu_engine_decodes_eagerly_even_with_graphs_asked_for(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    engine = Engine(checkpoint, CheckpointWeights(checkpoint), device="cpu", max_context=32, cuda_graphs=True)
    engine.generate(random_prompt(5), GREEDY)
    assert not engine.decodes_with_cuda_graph


def count_lm_head_calls(engine: Engine) -> list[None]:
    """A list that grows by one at every lm_head forward run in Python (none during a graph replay)."""
    calls: list[None] = []
    engine.model.lm_head.register_forward_hook(lambda *_: calls.append(None))
    return calls


@pytest.mark.gpu
@requires_cuda
def test_graph_replay_follows_stock_transformers_across_turns_and_resets(qdir, tmp_path):
    checkpoint = QuantizedCheckpoint(qdir)
    engine = Engine(checkpoint, CheckpointWeights(checkpoint, device="cuda"), device="cuda", max_context=64,
                    prefill_chunk=4)  # fmt: skip
    engine.eos_token_ids = frozenset()
    reference = reference_model(qdir, tmp_path).to("cuda")
    lm_head_calls = count_lm_head_calls(engine)

    prompt = random_prompt(11)
    first = generate_checked(engine, reference, prompt)
    assert engine.decodes_with_cuda_graph
    graph = engine._graph

    # The next turn reuses the cache; its decode steps replay: the lm_head runs only in the prefill passes.
    before = len(lm_head_calls)
    second_prompt = prompt + list(first.token_ids) + random_prompt(5)
    second = generate_checked(engine, reference, second_prompt)
    assert len(lm_head_calls) - before == second.prefill_passes
    assert second.decode_tokens == GREEDY.max_new_tokens - 1

    # After a reset the same graph writes from position 0 again.
    engine.reset()
    again = generate_checked(engine, reference, prompt)
    assert again.prefill_tokens == len(prompt) and engine._graph is graph

    eager = Engine(checkpoint, CheckpointWeights(checkpoint, device="cuda"), device="cuda", max_context=64,
                   prefill_chunk=4, cuda_graphs=False)  # fmt: skip
    eager.eos_token_ids = frozenset()
    generate_checked(eager, reference, prompt)
    assert not eager.decodes_with_cuda_graph


@pytest.mark.gpu
@requires_cuda
def test_a_new_plan_drops_the_graph_and_a_streaming_plan_decodes_eagerly(tiny_q, tmp_path, caplog):
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = PlannedWeights(checkpoint, device="cuda")
    engine = Engine(checkpoint, weights, device="cuda", max_context=64, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    reference = reference_model(tiny_q, tmp_path).to("cuda")
    prompt = random_prompt(7)

    generate_checked(engine, reference, prompt)
    captured = engine._graph
    assert captured is not None

    weights.switch(streamed={"layers.1"})
    with caplog.at_level(logging.INFO, logger="compute.engine"):
        generate_checked(engine, reference, prompt)
    assert not engine.decodes_with_cuda_graph
    assert "decode runs eagerly: policy 'test' streams 1 units" in caplog.text

    weights.switch(streamed=set())
    generate_checked(engine, reference, prompt)
    assert engine.decodes_with_cuda_graph and engine._graph is not captured


@pytest.mark.gpu
@requires_cuda
def test_a_failed_capture_falls_back_to_eager_decode_with_the_reason(tiny_q, tmp_path, monkeypatch, caplog):

    def fail(step, restore):
        step()  # half a warm-up's side effects: the cache advanced, the units walked
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraph, "capture", staticmethod(fail))
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = CheckpointWeights(checkpoint, device="cuda")
    engine = Engine(checkpoint, weights, device="cuda", max_context=64, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    with caplog.at_level(logging.WARNING, logger="compute.engine"):
        generate_checked(engine, reference_model(tiny_q, tmp_path).to("cuda"), random_prompt(7))
    assert not engine.decodes_with_cuda_graph and weights.held is None
    assert "capturing the decode step as a CUDA graph failed: operation not permitted" in caplog.text


def resident_cuda_budget(qdir, max_context: int) -> int:
    """The smallest ``--gpu-memory`` (bytes) under which the planner places every unit resident on CUDA."""
    checkpoint = QuantizedCheckpoint(qdir)
    placement = plan_placement(
        budget_bytes=1 << 40,
        device="cuda",
        units=layout_units(checkpoint.manifest),
        config=checkpoint.config,
        max_context=max_context,
        policy=get_policy("resident"),
    )
    return placement.total_bytes


@pytest.mark.gpu
@requires_cuda
def test_graph_over_a_real_resident_loader_and_eager_when_it_streams(tiny_q, tmp_path):
    reference = reference_model(tiny_q, tmp_path).to("cuda")
    checkpoint = QuantizedCheckpoint(tiny_q)
    resident = resident_cuda_budget(tiny_q, 64)
    # stream holds a ring of a few units besides: a MiB more is plenty for these tiny units
    for policy, budget, graphed in [("resident", resident, True), ("stream", resident + (1 << 20), False)]:
        options = LoaderOptions(model=tiny_q, gpu_memory=str(budget), policy=policy, device="cuda", max_context=64)
        with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=60) as client:
            engine = Engine(checkpoint, client, device="cuda", max_context=64, prefill_chunk=4)
            engine.eos_token_ids = frozenset()
            prompt = random_prompt(9)
            first = generate_checked(engine, reference, prompt)
            generate_checked(engine, reference, prompt + list(first.token_ids) + random_prompt(3))
            assert engine.decodes_with_cuda_graph is graphed, policy
