"""compute.sampling: parameter validation, hand-computed cases, and agreement with HF transformers' processors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from compute.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    process_logits,
    sample_next,
)

NONE_SEEN = torch.empty(0, dtype=torch.long)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", -3),
        ("seed", "7"),
        ("max_new_tokens", 0),
        ("max_new_tokens", True),
    ],
)
def test_invalid_params_are_refused_with_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as excinfo:
        SamplingParams(**{field: value})
    assert str(value) in str(excinfo.value)


def test_params_are_frozen_and_temperature_zero_is_greedy():
    params = SamplingParams(temperature=0.0)
    assert params.greedy and not SamplingParams(temperature=0.7).greedy
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([0, 1, 1])  # a repeated id is penalized once, not twice
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([1.0, -4.0, 1.0, 0.5]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0])
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [False, True, False, True, False]
    assert torch.isfinite(filter_top_k(logits, 3)).tolist() == [False, True, True, True, False]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [False, True, False, True]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [True, True, False, True]
    # p below the largest probability still keeps the most likely token
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [False, True, False, False]


@pytest.mark.parametrize("case", range(6))
def test_process_logits_matches_hf_logits_processors(case):
    generator = torch.Generator().manual_seed(1000 + case)
    vocab = 97
    logits = 3 * torch.randn(vocab, generator=generator)
    seen = torch.randint(0, vocab, (20,), generator=generator)
    params = SamplingParams(
        temperature=[0.3, 0.7, 1.0, 1.5, 0.6, 2.0][case],
        top_k=[0, 5, 40, 0, 10, 96][case],
        top_p=[1.0, 0.9, 0.5, 0.95, 0.3, 0.99][case],
        repetition_penalty=[1.0, 1.3, 0.8, 1.1, 2.0, 1.0][case],
    )
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
    hf.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    hf.append(TopPLogitsWarper(params.top_p))
    expected = hf(seen.unsqueeze(0), logits.unsqueeze(0).clone())[0]
    ours = process_logits(logits, params, seen)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    kept = torch.isfinite(expected)
    torch.testing.assert_close(ours[kept], expected[kept])


def test_greedy_is_the_argmax_of_the_penalized_logits():
    logits = torch.tensor([0.1, 5.0, 4.0, -1.0])
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample_next(logits, params, None, NONE_SEEN) == 1
    assert sample_next(logits, params, None, torch.tensor([1])) == 2  # 5 / 1.5 < 4


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds():
    logits = torch.randn(300)
    params = SamplingParams(temperature=1.0, top_p=1.0)

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample_next(logits, params, generator, NONE_SEEN) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_samples_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_next(logits, params, generator, NONE_SEEN) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 3}  # only the two most likely tokens survive top-k
    expected = math.exp(3.0) / (math.exp(3.0) + math.exp(2.0))
    assert abs((draws == 3).float().mean().item() - expected) < 0.04


def test_sample_next_refuses_batched_logits():
    with pytest.raises(ValueError, match=r"\[vocab\]"):
        sample_next(torch.zeros(2, 5), SamplingParams(), None, NONE_SEEN)
