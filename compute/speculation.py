"""Speculative decoding in the engine: drafters, and the per-reply record of what speculation did.

``compute.engine.Engine(..., drafter=...)`` decodes speculatively: each step a ``Drafter`` proposes a
``compute.speculate.tree.DraftTree`` continuing the conversation, the engine checks the whole tree in one target
pass (``Engine._verify``: the root token and every node, under the tree attention mask), walks it with the target's
own choices (``compute.speculate.accept.walk_tree``: the argmax when greedy, a draw from the target's distribution
otherwise, so replies have exactly the target's distribution and a greedy reply is the one-token-per-pass reply),
keeps the keys/values of the accepted path and drops the rest. A step emits the accepted tokens and one more.

This module promises:

* ``Drafter``: ``propose(context, max_tokens, min_probability=0.0) -> DraftTree`` (``context``: every id of the
  conversation, the root token last; at most ``max_tokens`` nodes; a chain stops before a node whose probability,
  the draft's for the chain down to it, is below ``min_probability``: a tree, whose cost does not grow node by
  node, may ignore it), ``accepted(drafted, accepted)`` (feedback after each pass), ``reset()``
  and ``name``. ``NgramDrafter`` drafts by prompt lookup (``compute.speculate.ngram``), a chain whose nodes carry the
  acceptance rate it has measured, so that sizing can weigh them; ``compute.draft_model`` runs a smaller model,
  in one of the ``DRAFT_SHAPES``.
* ``speculative_step(engine, ...)``: one such pass for ``Engine.generate`` (drafting, sizing the tree by
  ``compute.speculate.sizing`` unless ``engine.draft_tokens`` fixes it, ``verify``, the walk, ``Engine.keep_rows``).
* ``SpeculationGovernor``: whether the next step drafts at all (a probe drafts at most ``PROBE_TOKENS``, so a draft
  that does not pay costs little to find out), and how probable a chain's node must be to be worth
  drafting (``chain_floor``: a node costs a draft step and a verified row, and pays while the tokens it is expected
  to bring per second beat what speculative passes achieve; so a chain is long where passes stream, short where
  everything is resident). Drafting pays only where a pass over many rows
  costs about what a pass over one does; where it does not (everything resident, a one-token step replayed from a
  CUDA graph in a fraction of the time a verifying pass takes), the engine's own timings say so and it decodes one
  token a pass, trying drafting again after a doubling number of steps.
* ``SpeculationStats``: per reply, target passes (decode only), drafted and accepted tokens, the seconds the draft
  took and the seconds the target's passes took; ``tokens_per_pass`` counts every token a decode pass emitted.
  ``a + b`` sums two records (a server's totals over its replies).

It knows nothing about the loader or about terminals.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from compute.sampling import SamplingParams, sample_next
from compute.speculate.accept import walk_tree
from compute.speculate.ngram import propose_ngram
from compute.speculate.sizing import tree_size
from compute.speculate.tree import DraftTree, ancestor_bits, chain, tree_attention_mask, tree_positions

if TYPE_CHECKING:
    from compute.engine import Engine

DEFAULT_MAX_DRAFT_TOKENS = 128  # nodes per tree at most (a verification pass checks this many + 1 rows)
DEFAULT_CHAIN_TOKENS = 16  # tokens per drafted chain at most: each costs a draft decode step
NGRAM_MAX = 3  # longest suffix prompt lookup matches
PROBE_TOKENS = 4  # nodes a probing pass drafts at most: drafting has not won yet, so the probe is kept cheap
NGRAM_PRIOR_ACCEPTANCE = 0.5  # what a drafted n-gram token is assumed worth before any was checked
# how a draft model drafts (compute.draft_model): "chain", its greedy continuation one decode step a token, or
# "tree", a SpecExec tree a few wide forwards grow
DRAFT_SHAPES = ("chain", "tree")


class Drafter(Protocol):
    name: str

    def propose(self, context: Sequence[int], max_tokens: int, min_probability: float = 0.0) -> DraftTree: ...

    def accepted(self, drafted: int, accepted: int) -> None: ...

    def reset(self) -> None: ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed the last earlier occurrence of the context's tail, as a chain."""

    name = "ngram"

    def __init__(self, max_ngram: int = NGRAM_MAX):
        self.max_ngram = max_ngram
        self._drafted = 0
        self._accepted = 0

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens over this drafter's life (with one prior draft counted at the prior rate)."""
        return (self._accepted + NGRAM_PRIOR_ACCEPTANCE) / (self._drafted + 1)

    def propose(self, context: Sequence[int], max_tokens: int, min_probability: float = 0.0) -> DraftTree:
        if max_tokens < 1:
            return chain([])
        tokens = propose_ngram(context, max_tokens, max_ngram=self.max_ngram)
        # the i-th drafted token is accepted only if the ones before it were: a geometric guess
        log_rate = math.log(max(self.acceptance, 1e-6))
        drafted = chain(tokens, [log_rate * (i + 1) for i in range(len(tokens))])
        return drafted.prefix(sum(math.exp(lp) >= min_probability for lp in drafted.log_probs))

    def accepted(self, drafted: int, accepted: int) -> None:
        self._drafted += drafted
        self._accepted += accepted

    def reset(self) -> None:
        """Prompt lookup keeps no state about the conversation."""


@dataclasses.dataclass(kw_only=True)
class SpeculationStats:
    """What speculation did during one reply's decode."""

    drafter: str  # the drafter's name: "ngram", "draft-model" (a tree) or "draft-chain"
    target_passes: int = 0  # decode forward passes of the target (verification passes and one-token passes)
    emitted_tokens: int = 0  # tokens those passes emitted (accepted drafts + the target's own one per pass)
    drafted_tokens: int = 0  # tree nodes the target checked
    accepted_tokens: int = 0  # tree nodes accepted
    draft_seconds: float = 0.0  # time spent drafting
    target_seconds: float = 0.0  # time spent in the target's decode passes and acceptance

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def draft_time_share(self) -> float:
        total = self.draft_seconds + self.target_seconds
        return self.draft_seconds / total if total > 0 else 0.0

    def __add__(self, other: SpeculationStats) -> SpeculationStats:
        """Both records summed: the totals of several replies (the drafter is this record's)."""
        counts = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)
                  if f.name != "drafter"}  # fmt: skip
        return SpeculationStats(drafter=self.drafter, **counts)

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "tokens_per_pass": self.tokens_per_pass,
            "accepted_per_pass": self.accepted_per_pass,
            "draft_time_share": self.draft_time_share,
        }


class SpeculationGovernor:
    """Compares the seconds a token costs by one-token steps and by speculative passes (draft and verify over the
    tokens the pass emitted), each a moving average of what the engine measured, and says whether to draft.

    The first step of an engine is a one-token step (its cost is then known). While speculation costs more per token
    than plain steps, the next ``backoff`` steps are plain; ``backoff`` starts at ``probe_after`` and doubles each
    time a probe loses again (to ``max_probe_after``), and returns to ``probe_after`` when speculation wins."""

    def __init__(self, probe_after: int = 16, max_probe_after: int = 1024, weight: float = 0.3):
        self.probe_after = probe_after
        self.max_probe_after = max_probe_after
        self.weight = weight  # of the newest measurement in the moving averages
        self.plain: float | None = None  # seconds per token, one-token steps
        self.speculative: float | None = None  # seconds per emitted token, speculative passes
        self.draft_node: float | None = None  # seconds per drafted node
        self._plain_left = 0
        self._backoff = probe_after

    @property
    def probing(self) -> bool:
        """Whether the next speculative pass is a probe: none has been measured, or the last lost to plain steps."""
        return self.speculative is None or (self.plain is not None and self.speculative > self.plain)

    def should_draft(self) -> bool:
        if self.plain is None:
            return False
        if self._plain_left > 0:
            self._plain_left -= 1
            return False
        return True

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def record_plain(self, seconds: float) -> None:
        self.plain = self._average(self.plain, seconds)

    def record_draft(self, seconds: float, nodes: int) -> None:
        if nodes:
            self.draft_node = self._average(self.draft_node, seconds / nodes)

    def chain_floor(self, row_seconds: float) -> float:
        """The least probability a chain's next node must have to be drafted: it costs ``draft_node`` seconds and a
        verified row (``row_seconds``) and brings that many tokens on average, which pays while it beats the
        tokens per second of speculative passes (a node below it lowers the rate). 0 until both are measured."""
        if self.draft_node is None or self.speculative is None:
            return 0.0
        return min(1.0, (self.draft_node + row_seconds) / self.speculative)

    def record_speculative(self, seconds: float, emitted: int) -> None:
        self.speculative = self._average(self.speculative, seconds / max(emitted, 1))
        if self.plain is not None and self.speculative > self.plain:
            self._plain_left = self._backoff
            self._backoff = min(2 * self._backoff, self.max_probe_after)
        else:
            self._backoff = self.probe_after


def speculative_step(
    engine: Engine,
    token: int,
    params: SamplingParams,
    generator: torch.Generator,
    seen: torch.Tensor,
    room: int,
    stats: SpeculationStats,
) -> list[int]:
    """One speculative decode pass from ``token`` (chosen, not yet cached): draft a tree, verify it in one target
    pass, keep the accepted path's keys/values; the tokens the pass emits (the accepted ones and one more).
    ``seen`` holds every id so far (for the repetition penalty), ``room`` how many tokens the reply may still
    take."""
    prefix = len(engine._cached_ids)
    started = time.perf_counter()
    # nodes past the reply's end or the cache's are wasted: at most room - 1 (one token comes from the target)
    limit = min(engine.draft_tokens or DEFAULT_MAX_DRAFT_TOKENS, room - 1, engine.max_context - prefix - 1)
    if engine.step_rows > 1:
        # everything resident: a pass over the decode step's rows costs a few one-token steps, one over more runs
        # HF's modules eagerly (an order of magnitude more), so no tree outgrows the step
        limit = min(limit, engine.step_rows - 1)
    governed = engine.draft_tokens is None  # a fixed --draft-tokens drafts every step
    if governed and not engine.governor.should_draft():
        limit = 0
    elif governed and engine.governor.probing:
        limit = min(limit, PROBE_TOKENS)
    line = engine._pass_cost.line()
    floor = engine.governor.chain_floor(line[1] if line is not None else 0.0)
    context = [*engine._cached_ids, token]
    tree = engine.drafter.propose(context, limit, min_probability=floor) if limit > 0 else DraftTree((), (), ())
    draft_seconds = time.perf_counter() - started
    engine.governor.record_draft(draft_seconds, len(tree))
    if engine.draft_tokens is None:
        tree = tree.prefix(tree_size(tree.expected_accepted(), engine._pass_cost, draft_seconds))
    verify_started = time.perf_counter()
    if not len(tree):
        logits = engine._decode_step(token, prefix)
        engine._cached_ids.append(token)
        chosen = [sample_next(logits, params, generator, seen)]
    else:
        logits = verify(engine, token, tree, prefix)  # (1 + N, vocab)

        def choose(row: int) -> int:  # the target's token at ``row``, after the path leading to it
            path = [tree.tokens[n] for n in tree.path_to(row - 1)] if row else []
            previous = torch.cat([seen, torch.tensor(path, dtype=seen.dtype, device=seen.device)]) if path else seen
            return sample_next(logits[row], params, generator, previous)

        accepted = walk_tree(tree, choose)
        engine.keep_rows(prefix, [0, *(node + 1 for node in accepted.nodes)])
        engine._cached_ids += [token, *(tree.tokens[node] for node in accepted.nodes)]
        chosen = list(accepted.tokens)
    seconds = time.perf_counter() - verify_started
    engine._pass_cost.record(1 + len(tree), seconds)
    if limit == 0:
        engine.governor.record_plain(seconds)
    elif governed:  # a draft that proposed nothing still cost its time: a speculative pass that emitted one token
        engine.governor.record_speculative(draft_seconds + seconds, len(chosen))
    engine.drafter.accepted(len(tree), len(chosen) - 1)
    stats.target_passes += 1
    stats.emitted_tokens += len(chosen)
    stats.drafted_tokens += len(tree)
    stats.accepted_tokens += len(chosen) - 1
    stats.draft_seconds += draft_seconds
    stats.target_seconds += seconds
    return chosen

def verify(engine: Engine, token: int, tree: DraftTree, prefix: int) -> torch.Tensor:
    """The target over ``token`` (at ``prefix``) and every node of ``tree``, each row attending to the cache and
    its own ancestors (``compute.speculate.tree``); their keys/values go to positions ``prefix …`` in row order.
    Returns every row's logits, (1 + N, vocab): through the decode step's kernels where they take that many rows,
    else through the model's modules."""
    positions = tree_positions(tree, prefix)
    if 1 + len(tree) <= engine.step_rows:
        return engine.step_rows_forward([token, *tree.tokens], positions.tolist(), ancestor_bits(tree))
    mask = tree_attention_mask(tree, prefix, engine.max_context)
    return engine.forward_rows([token, *tree.tokens], positions, mask)
