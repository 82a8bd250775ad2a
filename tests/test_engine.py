"""compute.engine: generation checked step by step against stock transformers, stops, limits and the KV cache.

Most tests take the weights from ``CheckpointWeights`` (an in-process double of the loader client, in
tests/test_model.py); the last ones run the same teacher-forcing check through a real loader process and
``protocol.client.LoaderClient``, under each policy, with budgets that make the streaming policies stream.
"""

from __future__ import annotations

import shutil
import unittest.mock
from pathlib import Path

import pytest
import torch

import compute.engine
import compute.speculation
from compute.engine import ContextLengthError, Engine, FinishReason, eos_token_ids
from quantizer.model_spec import kv_cache_nbytes
from compute.launch import LaunchedLoader
from protocol.launch import LoaderCommand
from compute.sampling import SamplingParams, sample_next
from conftest import make_tiny_qwen2
from loader.layout import pool_layouts
from loader.planner import plan_placement
from loader.policies import get_policy
from protocol.client import LoaderClient, LoaderError
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.quantize import quantize_checkpoint
from test_model import CheckpointWeights, reference_model

# The tiny models' bf16 logits are O(1) (an ulp in [2, 4) is 0.0156); chunked prefill and a static cache change
# the rounding a little (0.008 seen), a wrong position or mask by far more (0.1-0.2 for a position off by one).
# On CUDA the decode step's fused layer (compute.decode) keeps attention scores and probabilities in fp32 where
# HF rounds them to bf16: two ulps in [2, 4) were seen (0.03125). On CPU the INT4 kernel multiplies the exact
# weights (q * scale in fp32) where the reference holds them rounded to bf16: 0.0352 seen. Three ulps in [2, 4).
LOGIT_TOLERANCE = 0.047
GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


@pytest.fixture(params=["untied", "tied"])
def qdir(request) -> Path:
    return request.getfixturevalue("tiny_q" if request.param == "untied" else "tiny_q_tied")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Stock transformers models for the tiny checkpoints, built once per module and qdir."""
    built = {}

    def get(qdir: Path):
        if qdir not in built:
            built[qdir] = reference_model(qdir, tmp_path_factory.mktemp("reference"))
        return built[qdir]

    return get


def make_engine(qdir: Path, **kwargs) -> Engine:
    checkpoint = QuantizedCheckpoint(qdir)
    options = {"device": "cpu", "max_context": 64, "prefill_chunk": 4} | kwargs
    return Engine(checkpoint, CheckpointWeights(checkpoint), **options)


def random_prompt(length: int, vocab: int = 300) -> list[int]:
    return torch.randint(2, vocab, (length,)).tolist()  # 0 and 1 are BOS and EOS


def generate_checked(engine: Engine, reference, prompt: list[int], params: SamplingParams = GREEDY, **kwargs):
    """``engine.generate``, checked by teacher forcing against the stock ``reference`` model fed the same tokens:
    at every step the engine's logits match the reference's, and its choice is the reference's argmax or a
    near-tie with it. Returns the ``GenerationResult``."""
    rows: list[torch.Tensor] = []  # the logits every reply token was chosen from, in order

    def recording_sample_next(logits, *args):
        # Recorded where the engine samples, not by a hook on lm_head: a replayed CUDA graph runs no hooks.
        rows.append(logits.float().clone())
        return sample_next(logits, *args)

    with (
        unittest.mock.patch.object(compute.engine, "sample_next", recording_sample_next),
        unittest.mock.patch.object(compute.speculation, "sample_next", recording_sample_next),  # speculative passes
    ):
        result = engine.generate(prompt, params, **kwargs)
    reply = result.token_ids
    ids = torch.tensor([prompt + list(reply[:-1])], device=reference.device)
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits[0, len(prompt) - 1 :].float()  # (len(reply), V)
    ours = torch.stack(rows).to(expected.device)  # the last prefill pass, then one per decode step
    torch.testing.assert_close(ours, expected, atol=LOGIT_TOLERANCE, rtol=0)
    for step, token in enumerate(reply):
        row = expected[step]
        best = int(row.argmax())
        assert row[best] - row[token] <= 2 * LOGIT_TOLERANCE, (
            f"step {step}: chose {token} (logit {row[token]:.4f}), the reference's argmax is {best} ({row[best]:.4f})"
        )
    return result


def test_greedy_reply_follows_stock_transformers_step_by_step(qdir, references):
    engine = make_engine(qdir)
    engine.eos_token_ids = frozenset()  # random weights: let the reply run its full length
    prompt = random_prompt(11)  # three prefill chunks of 4, the last one short
    seen: list[int] = []
    result = generate_checked(engine, references(qdir), prompt, on_token=seen.append)
    assert len(result.token_ids) == GREEDY.max_new_tokens and result.finish_reason is FinishReason.LENGTH
    assert seen == list(result.token_ids)
    assert (result.prompt_tokens, result.prefill_tokens, result.decode_tokens) == (11, 11, 5)
    assert (result.prefill_passes, result.forward_passes) == (3, 8)
    assert result.prefill_seconds > 0 and result.decode_seconds > 0 and result.decode_tokens_per_s > 0


def test_next_turns_reuse_the_cached_prefix_and_still_follow_the_reference(qdir, references):
    engine = make_engine(qdir)
    engine.eos_token_ids = frozenset()
    reference = references(qdir)
    first_prompt = random_prompt(9)
    first = generate_checked(engine, reference, first_prompt)

    # The conversation goes on: only the reply's last token (never fed to the model) and the new turn are new.
    second_prompt = first_prompt + list(first.token_ids) + random_prompt(5)
    second = generate_checked(engine, reference, second_prompt)
    assert second.prefill_tokens == 1 + 5

    # A prompt that departs from the conversation after 6 tokens: the cache is cut back to those 6.
    third_prompt = first_prompt[:6] + random_prompt(7)
    third = generate_checked(engine, reference, third_prompt)
    assert third.prefill_tokens == 7

    engine.reset()
    again = engine.generate(third_prompt, GREEDY)
    assert again.prefill_tokens == len(third_prompt) and again.token_ids == third.token_ids


def interrupt_once(module: torch.nn.Module) -> None:
    """Make the next forward of ``module`` raise KeyboardInterrupt, as a second Ctrl-C would, half-way through."""

    def interrupt(_module, _args):
        handle.remove()
        raise KeyboardInterrupt

    handle = module.register_forward_pre_hook(interrupt)


def test_a_forward_interrupted_half_way_leaves_the_engine_usable(tiny_q, references):
    engine = make_engine(tiny_q)
    engine.eos_token_ids = frozenset()
    weights = engine.model.unit_binder.weights
    prompt = random_prompt(6)
    engine.generate(prompt, GREEDY)
    interrupt_once(engine.model.model.layers[1].self_attn)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompt + random_prompt(3), GREEDY)
    # the interrupted pass was walked to its end: layers.1 released, lm_head acquired and released
    assert weights.held is None
    walked = [("acquire", "layers.1"), ("release", "layers.1"), ("acquire", "lm_head"), ("release", "lm_head")]
    assert weights.calls[-4:] == walked
    result = generate_checked(engine, references(tiny_q), prompt)
    assert result.prefill_tokens == len(prompt)  # the cache was emptied: nothing in it can be trusted


def test_sampling_is_reproducible_from_the_seed(tiny_q):
    engine = make_engine(tiny_q)
    engine.eos_token_ids = frozenset()
    prompt = random_prompt(6)

    def reply(seed: int) -> tuple[int, ...]:
        params = SamplingParams(temperature=1.0, top_p=1.0, seed=seed, max_new_tokens=5)
        return engine.generate(prompt, params).token_ids

    first = reply(5)
    assert reply(5) == first
    engine.reset()
    assert reply(5) == first
    assert reply(6) != first


def test_reply_stops_at_an_eos_id_and_includes_it(tiny_q):
    engine = make_engine(tiny_q)
    engine.eos_token_ids = frozenset()
    prompt = random_prompt(7)
    full = engine.generate(prompt, GREEDY).token_ids
    stop_at = full.index(full[3])  # the first occurrence of that token
    engine.eos_token_ids = frozenset({full[3]})
    seen: list[int] = []
    result = engine.generate(prompt, GREEDY, on_token=seen.append)
    assert result.token_ids == full[: stop_at + 1] and result.finish_reason is FinishReason.EOS
    assert seen == list(result.token_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_reply_on_cuda_follows_stock_transformers(qdir, tmp_path):
    checkpoint = QuantizedCheckpoint(qdir)
    weights = CheckpointWeights(checkpoint, device="cuda")
    engine = Engine(checkpoint, weights, device="cuda", max_context=64, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    prompt = random_prompt(11)
    result = generate_checked(engine, reference_model(qdir, tmp_path).to("cuda"), prompt)
    assert len(result.token_ids) == GREEDY.max_new_tokens
    sampled = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2, seed=3, max_new_tokens=6)
    assert engine.generate(prompt, sampled).token_ids == engine.generate(prompt, sampled).token_ids


def test_eos_ids_are_read_from_generation_config_and_config(tiny_q, tmp_path):
    assert eos_token_ids(QuantizedCheckpoint(tiny_q)) == {1}
    copy = tmp_path / "model"
    shutil.copytree(tiny_q, copy)
    (copy / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    assert eos_token_ids(QuantizedCheckpoint(copy)) == {1, 7, 9}


def test_should_stop_ends_the_reply_between_tokens(tiny_q):
    engine = make_engine(tiny_q)
    engine.eos_token_ids = frozenset()
    prompt = random_prompt(5)
    full = engine.generate(prompt, GREEDY).token_ids
    seen: list[int] = []
    result = engine.generate(prompt, GREEDY, on_token=seen.append, should_stop=lambda: len(seen) >= 3)
    assert result.finish_reason is FinishReason.STOPPED and result.token_ids == full[:3]


def test_should_stop_during_a_long_prefill_stops_before_the_reply(tiny_q):
    engine = make_engine(tiny_q, prefill_chunk=2)
    polls: list[int] = []
    result = engine.generate(random_prompt(9), GREEDY, should_stop=lambda: polls.append(1) or len(polls) >= 2)
    assert result.finish_reason is FinishReason.STOPPED and result.token_ids == ()
    assert (result.prefill_tokens, result.prefill_passes) == (4, 2)  # two chunks ran, then the poll said stop


def test_a_prompt_longer_than_max_context_is_refused_with_the_numbers(tiny_q):
    engine = make_engine(tiny_q, max_context=16)
    with pytest.raises(ContextLengthError, match="the prompt has 17 tokens but max_context is 16"):
        engine.generate(random_prompt(17), GREEDY)


def test_the_reply_stops_when_the_cache_is_full(tiny_q, references):
    engine = make_engine(tiny_q, max_context=12)
    engine.eos_token_ids = frozenset()
    prompt = random_prompt(9)
    result = generate_checked(engine, references(tiny_q), prompt)
    # 9 prompt tokens fill 9 positions; each further token needs one more, and the last one chosen needs none
    assert result.finish_reason is FinishReason.CONTEXT and len(result.token_ids) == 12 - 9 + 1


def test_invalid_prompts_are_refused(tiny_q):
    engine = make_engine(tiny_q)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], GREEDY)
    with pytest.raises(ValueError, match=r"\[320\] are outside the model's vocabulary \[0, 320\)"):
        engine.generate([5, 320], GREEDY)


def test_kv_cache_is_allocated_up_front_at_exactly_the_counted_size(qdir):
    engine = make_engine(qdir, max_context=40)
    config = engine.config
    expected = 2 * config.num_hidden_layers * config.num_key_value_heads * (128 // 4) * 40 * 2
    assert engine.kv_cache_bytes == kv_cache_nbytes(config, 40) == expected
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in engine.cache.layers)
    assert allocated == expected


PIPELINE_CONTEXT = 64
PIPELINE_LAYERS = 6  # enough units that a ring of 2-3 slots is well below the whole model


@pytest.fixture(scope="module", params=["untied", "tied"])
def deep_q(request, tmp_path_factory) -> Path:
    """A quantized tiny Qwen2 with more layers, so the streaming policies have room to stream."""
    root = tmp_path_factory.mktemp(f"deep_{request.param}")
    hf = make_tiny_qwen2(root / "hf", tied=request.param == "tied", num_layers=PIPELINE_LAYERS, seed=3)
    return quantize_checkpoint(hf, root / "q", device="cpu", progress=False)


def resident_budget(qdir: Path) -> int:
    """The smallest ``--gpu-memory`` (bytes) under which the planner places every unit resident."""
    checkpoint = QuantizedCheckpoint(qdir)
    placement = plan_placement(
        budget_bytes=1 << 40,
        device="cpu",
        units=pool_layouts(checkpoint.manifest, "cpu"),
        config=checkpoint.config,
        max_context=PIPELINE_CONTEXT,
        policy=get_policy("resident"),
    )
    return placement.total_bytes


def pipeline_engine(qdir: Path, client: LoaderClient) -> Engine:
    checkpoint = QuantizedCheckpoint(qdir)
    engine = Engine(checkpoint, client, device="cpu", max_context=client.plan.max_context, prefill_chunk=4)
    engine.eos_token_ids = frozenset()
    return engine


def streamed_bytes(client: LoaderClient) -> dict[str, int]:
    return {p.policy: p.streamed_bytes for p in client.stats().policies}


def test_greedy_reply_through_a_real_resident_loader_follows_stock_transformers(deep_q, references):
    options = LoaderCommand(
        model=deep_q, gpu_memory=resident_budget(deep_q), policy="resident", device="cpu",
        max_context=PIPELINE_CONTEXT,
    )
    with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=30) as client:
        assert all(unit.pool_offset is not None for unit in client.plan.units)
        engine = pipeline_engine(deep_q, client)
        prompt = random_prompt(10)  # three prefill passes, then five decode passes
        result = generate_checked(engine, references(deep_q), prompt)
        assert streamed_bytes(client) == {"resident": 0}
    assert len(result.token_ids) == GREEDY.max_new_tokens


def test_greedy_replies_through_a_real_loader_that_must_stream_follow_stock_transformers(deep_q, references):
    # one byte less than the whole model needs: hybrid and stream must put units through the ring
    budget = resident_budget(deep_q) - 1
    options = LoaderCommand(
        model=deep_q, gpu_memory=budget, policy="hybrid", device="cpu", max_context=PIPELINE_CONTEXT
    )
    with LaunchedLoader.start(options) as loader, LoaderClient.connect(loader.address, timeout_s=30) as client:
        streamed = [unit.name for unit in client.plan.units if unit.pool_offset is None]
        assert streamed and len(streamed) < len(client.plan.units), "hybrid should keep some units resident"
        engine = pipeline_engine(deep_q, client)
        prompt = random_prompt(10)
        # A forward interrupted half-way, in a streamed layer, must not leave the ring out of step.
        streamed_layer = next(int(name.split(".")[1]) for name in streamed if name.startswith("layers."))
        interrupt_once(engine.model.model.layers[streamed_layer].mlp)
        with pytest.raises(KeyboardInterrupt):
            engine.generate(prompt, GREEDY)
        first = generate_checked(engine, references(deep_q), prompt)

        # The next turn under stream: switched between forward passes, the KV cache kept.
        plan = client.set_policy("stream")
        assert all(unit.pool_offset is None for unit in plan.units)
        second_prompt = prompt + list(first.token_ids) + random_prompt(3)
        second = generate_checked(engine, references(deep_q), second_prompt)
        assert second.prefill_tokens == 4

        with pytest.raises(LoaderError, match="resident"):
            client.set_policy("resident")
        moved = streamed_bytes(client)
    assert moved["hybrid"] > 0 and moved["stream"] > 0
