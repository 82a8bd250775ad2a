"""Choosing the next token from the logits: ``SamplingParams`` and the pure ``sample_next``.

The steps and their order are those of HF transformers' ``generate`` (so results can be checked against its
logits processors): repetition penalty (CTRL, over every id seen so far, prompt included), then temperature,
top-k, top-p, then a draw from the softmax. Temperature 0 means greedy: the argmax of the penalized logits.

Nothing here holds state: the caller owns the ``torch.Generator`` (seeded once per reply, which makes a reply
reproducible from its seed) and the ids seen so far. Nothing here knows about the model, the tokenizer or
the KV cache.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one reply is generated. The defaults are DeepSeek-R1's recommended settings."""

    temperature: float = 0.6  # 0 = greedy (argmax); otherwise logits are divided by it before the softmax
    top_p: float = 0.95  # nucleus: keep the smallest set of tokens whose probability reaches top_p; 1.0 = off
    top_k: int = 0  # keep only the k most likely tokens (ties at the k-th kept); 0 = off
    repetition_penalty: float = 1.0  # CTRL penalty on every id already seen; 1.0 = off, > 1 discourages repeats
    seed: int | None = None  # seeds the reply's generator: same seed, prompt and model -> same reply; None = random
    max_new_tokens: int = 256  # the reply stops after this many tokens

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for every id in ``previous_ids``, a positive logit is divided by ``penalty``, a negative
    one multiplied by it. ``logits`` [vocab] float; returns a new tensor."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    ids = previous_ids.to(device=logits.device, dtype=torch.long)
    seen = logits.gather(0, ids)
    return logits.scatter(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept). ``top_k`` 0 = no-op."""
    if top_k == 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities sum to at least ``top_p`` (always at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)  # the unlikely tail holding at most 1 - top_p of the mass
    drop_sorted[-1] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def process_logits(logits: torch.Tensor, params: SamplingParams, previous_ids: torch.Tensor) -> torch.Tensor:
    """The logits the draw is made from: penalty, then (unless greedy) temperature, top-k, top-p. [vocab] float32."""
    logits = apply_repetition_penalty(logits.float(), previous_ids, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    return filter_top_p(filter_top_k(logits, params.top_k), params.top_p)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    previous_ids: torch.Tensor,
) -> int:
    """The next token id from one position's ``logits`` ([vocab], any float dtype).

    ``previous_ids`` (1-D integer tensor, duplicates allowed) are the ids seen so far, for the repetition
    penalty. ``generator`` (on ``logits``' device) makes the draw reproducible; it is not used when greedy.
    """
    if logits.dim() != 1:
        raise ValueError(f"sample_next takes one position's logits of shape [vocab], got {tuple(logits.shape)}")
    processed = process_logits(logits, params, previous_ids)
    if params.greedy:
        return int(processed.argmax())
    probs = processed.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
