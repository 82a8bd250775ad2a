"""The decode step's segments, CUDA graphs and decoder (compute.segments, compute.cuda_graphs, compute.decoder) on the GPU: whole-step and piecewise replay follow stock transformers, over a real loader too,
and decode does not capture when it must not (everything streamed, cuda_graphs off, a failed capture).

The tests compare the engine against stock transformers by teacher forcing (``generate_checked``), and count
acquisitions and forward hooks to prove that decode steps after the capture replay the resident units (no Python
runs for them) while the streamed ones run eagerly every pass. Fixtures and test doubles come from
tests/test_graphs.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from compute.engine import Engine
from compute.cuda_graphs import SegmentGraph
from compute.segments import describe, plan_segments, streamed_units
from compute.launch import LaunchedLoader
from protocol.launch import LoaderCommand
from loader.layout import layout_units
from loader.planner import BudgetError, plan_placement
from loader.policies import get_policy
from protocol.client import LoaderClient
from quantizer.checkpoint import QuantizedCheckpoint
from test_engine import GREEDY, generate_checked, random_prompt
from test_graphs import PlannedWeights, deep_checkpoint, deep_q, qdir  # noqa: F401 (fixtures)
from test_model import CheckpointWeights, reference_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def count_calls(module: torch.nn.Module) -> list[None]:
    """A list that grows by one at every forward of ``module`` run in Python (none during a graph replay)."""
    calls: list[None] = []
    module.register_forward_hook(lambda *_: calls.append(None))
    return calls


@pytest.mark.gpu
@requires_cuda
def test_graph_replay_follows_stock_transformers_across_turns_and_resets(qdir, tmp_path):
    checkpoint = QuantizedCheckpoint(qdir)
    engine = Engine(checkpoint, CheckpointWeights(checkpoint, device="cuda"), device="cuda", max_context=64,
                    prefill_chunk=4)  # fmt: skip
    engine.eos_token_ids = frozenset()
    reference = reference_model(qdir, tmp_path).to("cuda")
    lm_head_calls = count_calls(engine.model.lm_head)

    prompt = random_prompt(11)
    first = generate_checked(engine, reference, prompt)
    assert engine.decode_mode == "graph"
    graphs = engine._decoder.graphs
    assert len(graphs.segments) == 1

    # The next turn reuses the cache; its decode steps replay: the lm_head runs only in the prefill passes.
    before = len(lm_head_calls)
    second_prompt = prompt + list(first.token_ids) + random_prompt(5)
    second = generate_checked(engine, reference, second_prompt)
    assert len(lm_head_calls) - before == second.prefill_passes
    assert second.decode_tokens == GREEDY.max_new_tokens - 1

    # After a reset the same graph writes from position 0 again.
    engine.reset()
    again = generate_checked(engine, reference, prompt)
    assert again.prefill_tokens == len(prompt) and engine._decoder.graphs is graphs

    eager = Engine(checkpoint, CheckpointWeights(checkpoint, device="cuda"), device="cuda", max_context=64,
                   prefill_chunk=4, cuda_graphs=False)  # fmt: skip
    eager.eos_token_ids = frozenset()
    generate_checked(eager, reference, prompt)
    assert eager._decoder.graphs is None and eager.decode_mode == "eager: cuda_graphs is off"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "streamed, mode",
    [
        ({"layers.5", "layers.6", "layers.7"}, "piecewise (2 graphs, 3 eager units)"),
        ({"layers.5", "layers.6", "layers.7", "lm_head"}, "piecewise (1 graphs, 4 eager units)"),
        ({"layers.2", "layers.3", "layers.4"}, "piecewise (2 graphs, 3 eager units)"),
        ({"lm_head", "layers.0"}, "piecewise (1 graphs, 2 eager units)"),
        ({"layers.0", "layers.7"}, "piecewise (2 graphs, 2 eager units)"),
    ],
)
def test_piecewise_replay_follows_stock_transformers_and_runs_only_streamed_layers(deep_q, tmp_path, streamed, mode):
    checkpoint = QuantizedCheckpoint(deep_q)
    weights = PlannedWeights(checkpoint, "cuda", streamed=streamed)
    engine = Engine(checkpoint, weights, device="cuda", max_context=64, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    reference = reference_model(deep_q, tmp_path).to("cuda")

    prompt = random_prompt(9)
    first = generate_checked(engine, reference, prompt)
    assert engine.decode_mode == mode and engine._decoder.graphs is not None
    graphs = engine._decoder.graphs

    # Once captured, a decode step runs the streamed units in Python, acquiring each, and replays the resident ones,
    # which acquire nothing (the decode step's fused layers acquire through the binder, not the module hooks).
    weights.calls.clear()
    second = generate_checked(engine, reference, prompt + list(first.token_ids) + random_prompt(4))
    acquired = [unit for call, unit in weights.calls if call == "acquire"]
    for unit in weights.unit_names:
        expected = second.prefill_passes + (second.decode_tokens if unit in streamed else 0)
        assert acquired.count(unit) == expected, unit
    assert weights.held is None and not engine.model.unit_binder.in_pass

    engine.reset()
    generate_checked(engine, reference, prompt)
    assert engine._decoder.graphs is graphs


@pytest.mark.gpu
@requires_cuda
def test_a_new_plan_drops_the_graphs_and_a_plan_streaming_everything_decodes_eagerly(tiny_q, tmp_path, caplog):
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = PlannedWeights(checkpoint, device="cuda")
    engine = Engine(checkpoint, weights, device="cuda", max_context=64, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    reference = reference_model(tiny_q, tmp_path).to("cuda")
    prompt = random_prompt(7)

    generate_checked(engine, reference, prompt)
    captured = engine._decoder.graphs
    assert engine.decode_mode == "graph"

    weights.switch(streamed={"layers.1"})
    generate_checked(engine, reference, prompt)
    assert engine.decode_mode == "piecewise (2 graphs, 1 eager units)"
    piecewise = engine._decoder.graphs

    weights.switch(streamed={"layers.0", "layers.1", "lm_head"})
    with caplog.at_level(logging.INFO, logger="compute.decoder"):
        generate_checked(engine, reference, prompt)
    assert engine._decoder.graphs is None
    assert engine.decode_mode == "eager: policy 'test' streams 3 of 3 units: nothing to capture"
    assert "decode runs eagerly: policy 'test' streams 3 of 3 units" in caplog.text

    weights.switch(streamed=set())
    generate_checked(engine, reference, prompt)
    assert engine.decode_mode == "graph" and engine._decoder.graphs not in (captured, piecewise)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("streamed, failing_capture", [(set(), 1), ({"layers.1"}, 1), ({"layers.1"}, 2)])
def test_a_failed_capture_falls_back_to_eager_decode_with_the_reason(tiny_q, tmp_path, monkeypatch, caplog,
                                                                     streamed, failing_capture):  # fmt: skip
    captures = []
    real_capture = SegmentGraph.capture

    def fail(run):
        captures.append(None)
        if len(captures) < failing_capture:
            return real_capture(run)
        run()  # half a capture's side effects: units walked by the hooks
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(SegmentGraph, "capture", staticmethod(fail))
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = PlannedWeights(checkpoint, device="cuda", streamed=streamed)
    engine = Engine(checkpoint, weights, device="cuda", max_context=64, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    reference = reference_model(tiny_q, tmp_path).to("cuda")
    with caplog.at_level(logging.WARNING, logger="compute.decoder"):
        generate_checked(engine, reference, random_prompt(7))
    assert engine._decoder.graphs is None and weights.held is None and not engine.model.unit_binder.in_pass
    reason = "capturing the decode step as CUDA graphs failed: operation not permitted"
    assert engine.decode_mode == f"eager: {reason} when stream is capturing"
    assert "capturing the decode step as CUDA graphs failed" in caplog.text
    generate_checked(engine, reference, random_prompt(5))  # and it goes on decoding eagerly
    assert len(captures) == failing_capture


def planned_budget(qdir, max_context: int, policy: str, accept) -> tuple[int, object]:
    """The largest ``--gpu-memory`` (bytes, scanned downwards from what places every unit resident) whose placement
    under ``policy`` satisfies ``accept(placement)``, and that placement."""
    checkpoint = QuantizedCheckpoint(qdir)
    units = layout_units(checkpoint.manifest)

    def place(budget: int, name: str):
        return plan_placement(budget_bytes=budget, device="cuda", units=units, config=checkpoint.config,
                              max_context=max_context, policy=get_policy(name))  # fmt: skip

    budget = place(1 << 40, "resident").total_bytes
    step = min(unit.nbytes for unit in units) // 4
    while budget > 0:
        try:
            placement = place(budget, policy)
        except BudgetError:
            break
        if accept(placement):
            return budget, placement
        budget -= step
    raise AssertionError(f"no budget places {qdir} under {policy!r} as the test needs")


@pytest.mark.gpu
@requires_cuda
def test_graph_over_a_real_resident_loader_and_eager_when_it_streams_everything(tiny_q, tmp_path):
    reference = reference_model(tiny_q, tmp_path).to("cuda")
    checkpoint = QuantizedCheckpoint(tiny_q)
    resident, _ = planned_budget(tiny_q, 64, "resident", lambda placement: True)
    # stream holds a ring of a few units besides: a MiB more is plenty for these tiny units
    for policy, budget, mode in [("resident", resident, "graph"), ("stream", resident + (1 << 20), "eager: policy")]:
        options = LoaderCommand(model=tiny_q, gpu_memory=budget, policy=policy, device="cuda", max_context=64)
        with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=60) as client:
            engine = Engine(checkpoint, client, device="cuda", max_context=64, prefill_chunk=4)
            engine.eos_token_ids = frozenset()
            prompt = random_prompt(9)
            first = generate_checked(engine, reference, prompt)
            generate_checked(engine, reference, prompt + list(first.token_ids) + random_prompt(3))
            assert engine.decode_mode.startswith(mode), (policy, engine.decode_mode)


@pytest.mark.gpu
@requires_cuda
def test_piecewise_decode_over_a_real_hybrid_loader_across_generations_resets_and_policy_switches(deep_q, tmp_path):
    """The product's path: the loader process streams a stretch of layers through its ring of 2 slots under
    ``hybrid``, the engine replays the resident runs and runs the streamed layers eagerly, pass after pass."""
    reference = reference_model(deep_q, tmp_path).to("cuda")
    checkpoint = QuantizedCheckpoint(deep_q)
    layers = checkpoint.config["num_hidden_layers"]

    def mixed(placement) -> bool:
        streamed_layers = [u for u in placement.streamed if u.startswith("layers.")]
        return len(streamed_layers) >= 3 and len(streamed_layers) < layers

    budget, placement = planned_budget(deep_q, 64, "hybrid", mixed)
    units = [unit.name for unit in checkpoint.manifest.units]
    expected = plan_segments(units, set(placement.streamed), layers)
    expected_mode = describe(expected)
    assert expected_mode.startswith("piecewise"), expected_mode
    options = LoaderCommand(model=deep_q, gpu_memory=budget, policy="hybrid", device="cuda", max_context=64)
    with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=60) as client:
        assert set(placement.streamed) == streamed_units(client.plan)
        engine = Engine(checkpoint, client, device="cuda", max_context=64, prefill_chunk=4)
        engine.eos_token_ids = frozenset()
        prompt = random_prompt(9)
        reply = generate_checked(engine, reference, prompt)
        assert engine.decode_mode == expected_mode
        graphs = engine._decoder.graphs
        for _ in range(3):  # more turns on the same cache, all replaying the same graphs
            conversation = prompt + list(reply.token_ids) + random_prompt(3)
            reply = generate_checked(engine, reference, conversation)
            prompt = conversation
        engine.reset()
        generate_checked(engine, reference, random_prompt(6))
        assert engine._decoder.graphs is graphs

        client.set_policy("stream")  # everything streams: nothing left to capture
        generate_checked(engine, reference, random_prompt(6))
        assert engine.decode_mode.startswith("eager: policy 'stream' streams")

        client.set_policy("hybrid")  # the same placement again, under a new plan generation: captured anew
        generate_checked(engine, reference, random_prompt(6))
        assert engine.decode_mode == expected_mode and engine._decoder.graphs is not graphs
