"""The decode step's segments, CUDA graphs and decoder (compute.segments, compute.cuda_graphs, compute.decoder) and the engine's CUDA-graph decode, on CPU: how the decode step is cut into segments for a plan,
that a replay passes its resident units to the binder without touching the loader, that the decoder's capture,
replay and eager segments follow stock transformers (with CUDA's streams and graphs stood in for). The same on the
GPU, with real graphs and loaders: tests/test_graphs_gpu.py, which uses this module's fixtures and doubles.
"""

from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import test_engine
from compute.engine import Engine
from compute.cuda_graphs import DecodeGraphs, SegmentGraph
from compute.decoder import Decoder
from compute.grouped_attention import GROUPED_ATTENTION, grouped_decode_attention, register_grouped_attention
from compute.segments import describe, eager_segment, plan_segments, streamed_units
from conftest import make_tiny_qwen2
from quantizer.checkpoint import QuantizedCheckpoint
from test_engine import GREEDY, generate_checked, random_prompt
from test_model import CheckpointWeights, reference_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS = 4
UNTIED = [f"layers.{i}" for i in range(LAYERS)] + ["lm_head"]
TIED = UNTIED[:-1]


@pytest.fixture(params=["untied", "tied"])
def qdir(request):
    return request.getfixturevalue("tiny_q" if request.param == "untied" else "tiny_q_tied")


# The 8-layer model's logits reach |2..4|, where a bf16 ulp is 2**-6: over 30 prompts on CPU they differed from
# stock transformers' by up to 2 ulps (0.03125), past test_engine's 0.03 for the 2-layer models. Allow 4 ulps.
DEEP_LOGIT_TOLERANCE = 0.0625


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """An untied tiny Qwen2 of 8 layers, quantized: deep enough for the hybrid policy to keep some layers resident
    and stream others (with a ring of 2 slots, streaming fewer than 3 units saves nothing). Its vocabulary makes
    the lm_head larger than a layer, as in the 32B model, so that hybrid streams layers and keeps the lm_head."""
    from quantizer.quantize import quantize_checkpoint

    hf = make_tiny_qwen2(tmp_path_factory.mktemp("deep_hf") / "model", num_layers=8, vocab_size=2048, seed=3)
    return quantize_checkpoint(hf, tmp_path_factory.mktemp("deep_q") / "model", device="cpu", progress=False)


@pytest.fixture
def deep_q(deep_checkpoint, monkeypatch):
    """``deep_checkpoint``, with ``generate_checked`` comparing logits to ``DEEP_LOGIT_TOLERANCE``."""
    monkeypatch.setattr(test_engine, "LOGIT_TOLERANCE", DEEP_LOGIT_TOLERANCE)
    return deep_checkpoint


def fake_plan(generation: int, streamed: set[str], units: list[str]) -> SimpleNamespace:
    """The fields of ``protocol.messages.Plan`` the engine reads to decide on graphs."""
    placements = [SimpleNamespace(name=u, pool_offset=None if u in streamed else 0) for u in units]
    return SimpleNamespace(generation=generation, policy="test", units=placements)


class PlannedWeights(CheckpointWeights):
    """``CheckpointWeights`` with a ``plan`` the test sets, standing in for the loader client's policy switches."""

    def __init__(self, checkpoint: QuantizedCheckpoint, device: str, streamed: set[str] = frozenset()):
        super().__init__(checkpoint, device)
        self.unit_names = [unit.name for unit in checkpoint.manifest.units]
        self.plan = fake_plan(0, set(streamed), self.unit_names)

    def switch(self, streamed: set[str]) -> None:
        self.plan = fake_plan(self.plan.generation + 1, streamed, self.unit_names)


def shape(segments) -> list[tuple]:
    """Segments as (captured, starts with the prologue, layers, ends with the head, units), for comparison."""
    return [(s.captured, s.embeds, list(s.layers), s.head, s.units) for s in segments]


@pytest.mark.parametrize(
    "units, streamed, expected",
    [
        pytest.param(UNTIED, set(), [(True, True, [0, 1, 2, 3], True, tuple(UNTIED))], id="all-resident"),
        pytest.param(TIED, set(), [(True, True, [0, 1, 2, 3], True, tuple(TIED))], id="all-resident-tied"),
        pytest.param(UNTIED, {"layers.2", "layers.3"}, [
            (True, True, [0, 1], False, ("layers.0", "layers.1")),
            (False, False, [2, 3], False, ("layers.2", "layers.3")),
            (True, False, [], True, ("lm_head",)),
        ], id="tail-streamed"),
        pytest.param(UNTIED, {"layers.2", "layers.3", "lm_head"}, [
            (True, True, [0, 1], False, ("layers.0", "layers.1")),
            (False, False, [2, 3], True, ("layers.2", "layers.3", "lm_head")),
        ], id="tail-and-lm_head-streamed"),
        pytest.param(UNTIED, {"layers.1", "layers.2"}, [
            (True, True, [0], False, ("layers.0",)),
            (False, False, [1, 2], False, ("layers.1", "layers.2")),
            (True, False, [3], True, ("layers.3", "lm_head")),
        ], id="middle-stretch"),
        pytest.param(UNTIED, {"lm_head", "layers.0"}, [
            (False, True, [0], False, ("layers.0",)),
            (True, False, [1, 2, 3], False, ("layers.1", "layers.2", "layers.3")),
            (False, False, [], True, ("lm_head",)),
        ], id="stretch-wrapping-around"),
        pytest.param(TIED, {"layers.3"}, [
            (True, True, [0, 1, 2], False, ("layers.0", "layers.1", "layers.2")),
            (False, False, [3], True, ("layers.3",)),  # a tied head alone is not worth a graph
        ], id="tied-last-layer-streamed"),
        pytest.param(TIED, {"layers.0"}, [
            (False, True, [0], False, ("layers.0",)),  # nor is the prologue alone
            (True, False, [1, 2, 3], True, ("layers.1", "layers.2", "layers.3")),
        ], id="tied-first-layer-streamed"),
        pytest.param(UNTIED, set(UNTIED), [(False, True, [0, 1, 2, 3], True, tuple(UNTIED))], id="all-streamed"),
        pytest.param(TIED, set(TIED), [(False, True, [0, 1, 2, 3], True, tuple(TIED))], id="all-streamed-tied"),
    ],
)  # fmt: skip
def test_segments_for_plans(units, streamed, expected):
    assert shape(plan_segments(units, streamed, LAYERS)) == expected


def test_describe_says_how_the_step_runs():
    assert describe(plan_segments(UNTIED, set(), LAYERS)) == "graph"
    assert describe(plan_segments(UNTIED, {"layers.2", "layers.3"}, LAYERS)) == "piecewise (2 graphs, 2 eager units)"
    assert describe(plan_segments(UNTIED, {"layers.3", "lm_head"}, LAYERS)) == "piecewise (1 graphs, 2 eager units)"
    assert describe(plan_segments(UNTIED, set(UNTIED), LAYERS)) == "eager"


def test_segments_of_any_plan_cover_the_step_in_order_and_capture_only_resident_runs():
    rng = random.Random(5)
    for _ in range(300):
        layers = rng.randint(1, 9)
        units = [f"layers.{i}" for i in range(layers)] + (["lm_head"] if rng.random() < 0.5 else [])
        streamed = {u for u in units if rng.random() < 0.4}
        segments = plan_segments(units, streamed, layers)
        assert segments[0].embeds and segments[-1].head
        assert not any(s.embeds for s in segments[1:]) and not any(s.head for s in segments[:-1])
        assert [i for s in segments for i in s.layers] == list(range(layers))
        assert [u for s in segments for u in s.units] == units  # the binder's order, every unit once
        for segment, after in zip(segments, segments[1:]):
            assert segment.captured or after.captured, "two eager segments side by side"
        for segment in segments:
            if segment.captured:
                assert segment.units and not set(segment.units) & streamed
        assert (len(segments) == 1 and segments[0].captured) == (not streamed)
        if set(units) <= streamed:
            assert segments == (eager_segment(units, layers),)


def test_segments_refuse_units_that_are_not_the_decode_order():
    with pytest.raises(ValueError, match="not the decode step's order"):
        plan_segments(["layers.1", "layers.0", "lm_head"], set(), 2)
    with pytest.raises(ValueError, match="not units of this model"):
        plan_segments(TIED, {"lm_head"}, LAYERS)


def test_streamed_units_come_from_the_plan():
    units = ["layers.0", "layers.1", "lm_head"]
    assert streamed_units(None) == frozenset()  # an in-process source serves fixed tensors
    assert streamed_units(fake_plan(1, set(), units)) == frozenset()
    assert streamed_units(fake_plan(1, {"layers.1", "lm_head"}, units)) == {"layers.1", "lm_head"}


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
    AttentionInterface.register(GROUPED_ATTENTION, spy)
    try:
        result = engine.generate(random_prompt(6), GREEDY)
    finally:
        register_grouped_attention()
    assert calls == [1] * (result.decode_tokens * engine.config.num_hidden_layers)
    assert engine.config._attn_implementation == "sdpa"


def test_cpu_engine_decodes_eagerly_even_with_graphs_asked_for(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    engine = Engine(checkpoint, CheckpointWeights(checkpoint), device="cpu", max_context=32, cuda_graphs=True)
    assert engine.decode_mode.startswith("undecided")
    engine.generate(random_prompt(5), GREEDY)
    assert engine._decoder.graphs is None
    assert engine.decode_mode == "eager: CUDA graphs need a CUDA device (decode runs on cpu)"
    engine.cuda_graphs = False
    engine.generate(random_prompt(5), GREEDY)
    assert engine.decode_mode == "eager: cuda_graphs is off"


class RecordedGraph:
    """Stands in for a ``SegmentGraph`` on CPU: a replay returns what the segment returned, and runs no hooks."""

    def __init__(self, output):
        self.output = output
        self.replays = 0

    def replay(self):
        self.replays += 1
        return self.output


def test_a_replay_passes_its_resident_units_to_the_binder_and_acquires_only_the_streamed(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = PlannedWeights(checkpoint, "cpu", streamed={"layers.1"})
    engine = Engine(checkpoint, weights, device="cpu", max_context=32)
    step, binder = engine._decoder.step, engine.model.unit_binder
    segments = plan_segments(weights.unit_names, {"layers.1"}, 2)  # [prologue, layer 0] | layer 1 | [head]
    logits = torch.randn(engine.vocab_size)
    graphs = [RecordedGraph(None), None, RecordedGraph(logits)]
    replayed = DecodeGraphs(step, segments, graphs, binder)
    assert replayed.description == "piecewise (2 graphs, 1 eager units)"
    with torch.inference_mode():
        for _ in range(3):
            assert replayed.run() is logits
            assert not binder.in_pass
    assert weights.calls == [("acquire", "layers.1"), ("release", "layers.1")] * 3
    assert [g.replays for g in graphs if g is not None] == [3, 3]


class RerunGraph:
    """Stands in for a ``SegmentGraph`` on CPU: a replay runs the segment's Python again (computing what the
    captured kernels would), then puts the unit binder back where a real replay, which runs no hooks, leaves it."""

    def __init__(self, run, binder):
        self.run = run
        self.binder = binder

    def replay(self):
        at = self.binder.next_unit
        output = self.run()
        self.binder.next_unit = at
        return output


class FakeStream:
    def wait_stream(self, other) -> None:
        pass


@pytest.mark.parametrize("host_embedding", [False, True], ids=["device-embedding", "host-embedding"])
@pytest.mark.parametrize("streamed", [set(), {"layers.5", "layers.6", "layers.7"}, {"lm_head", "layers.0"}])
def test_the_decoder_captures_replays_and_recaptures_per_plan_with_cuda_stood_in_for(deep_q, tmp_path, monkeypatch,
                                                                                     streamed, host_embedding):  # fmt: skip
    """The decoder's own logic on CPU: what the GPU tests check, with CUDA's streams and graphs replaced by
    stand-ins that run the same Python, so a mistake in the order of capture, replay and eager segments shows
    here as a wrong token or a unit out of order. With the embedding in host memory (as on CUDA for an untied
    model), every step's row comes through ``DecodeStep.set``, outside the captured prologue."""
    checkpoint = QuantizedCheckpoint(deep_q)
    weights = PlannedWeights(checkpoint, "cpu", streamed=streamed)
    engine = Engine(checkpoint, weights, device="cpu", max_context=64, prefill_chunk=4, host_embedding=host_embedding)
    assert (engine._decoder.step.host_embedding is not None) == host_embedding
    engine.eos_token_ids = frozenset()
    binder = engine.model.unit_binder

    def capture(run):
        run()  # a capture runs the Python, hooks included, and launches nothing
        return RerunGraph(run, binder)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *device: FakeStream())
    monkeypatch.setattr(SegmentGraph, "capture", staticmethod(capture))
    engine._decoder = Decoder(engine._decoder.step, binder, weights, torch.device("cuda"))
    reference = reference_model(deep_q, tmp_path)

    prompt = random_prompt(9)
    first = generate_checked(engine, reference, prompt)
    expected = plan_segments(weights.unit_names, streamed, 8)
    assert engine._decoder.graphs.segments == expected
    graphs = engine._decoder.graphs
    generate_checked(engine, reference, prompt + list(first.token_ids) + random_prompt(3))
    engine.reset()
    generate_checked(engine, reference, prompt)
    assert engine._decoder.graphs is graphs and not binder.in_pass and weights.held is None

    weights.switch({"layers.3", "layers.4", "layers.5"})
    generate_checked(engine, reference, prompt)
    assert engine.decode_mode == "piecewise (2 graphs, 3 eager units)"


def test_the_binder_refuses_a_replay_out_of_execution_order(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = CheckpointWeights(checkpoint)
    binder = Engine(checkpoint, weights, device="cpu", max_context=32).model.unit_binder
    with pytest.raises(RuntimeError, match="'layers.1' out of order: the forward pass is at 'layers.0'"):
        binder.skip(["layers.1"])
    binder.skip(["layers.0", "layers.1"])
    assert binder.in_pass
    binder.skip(["lm_head"])
    assert not binder.in_pass and weights.calls == []
