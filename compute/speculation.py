"""Speculative decoding in the engine: drafters, and the per-reply record of what speculation did.

``compute.engine.Engine(..., drafter=...)`` decodes speculatively: each step a ``Drafter`` proposes a
``compute.speculate.tree.DraftTree`` continuing the conversation, the engine checks the whole tree in one target
pass (``Engine._verify``: the root token and every node, under the tree attention mask), walks it with the target's
own choices (``compute.speculate.accept.walk_tree``: the argmax when greedy, a draw from the target's distribution
otherwise, so replies have exactly the target's distribution and a greedy reply is the one-token-per-pass reply),
keeps the keys/values of the accepted path and drops the rest. A step emits the accepted tokens and one more.

This module promises:

* ``Drafter``: ``propose(context, max_tokens) -> DraftTree`` (``context``: every id of the conversation, the root
  token last; at most ``max_tokens`` nodes), ``accepted(drafted, accepted)`` (feedback after each pass), ``reset()``
  and ``name``. ``NgramDrafter`` drafts by prompt lookup (``compute.speculate.ngram``), a chain whose nodes carry the
  acceptance rate it has measured, so that sizing can weigh them; ``compute.draft_model.DraftModel`` runs a smaller
  model.
* ``SpeculationStats``: per reply, target passes (decode only), drafted and accepted tokens, the seconds the draft
  took and the seconds the target's passes took; ``tokens_per_pass`` counts every token a decode pass emitted.

It knows nothing about the loader or about terminals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

from compute.speculate.ngram import propose_ngram
from compute.speculate.tree import DraftTree, chain

DEFAULT_MAX_DRAFT_TOKENS = 128  # nodes per tree at most (a verification pass checks this many + 1 rows)
NGRAM_MAX = 3  # longest suffix prompt lookup matches
NGRAM_PRIOR_ACCEPTANCE = 0.5  # what a drafted n-gram token is assumed worth before any was checked


class Drafter(Protocol):
    name: str

    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree: ...

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

    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree:
        if max_tokens < 1:
            return chain([])
        tokens = propose_ngram(context, max_tokens, max_ngram=self.max_ngram)
        # the i-th drafted token is accepted only if the ones before it were: a geometric guess
        log_rate = math.log(max(self.acceptance, 1e-6))
        return chain(tokens, [log_rate * (i + 1) for i in range(len(tokens))])

    def accepted(self, drafted: int, accepted: int) -> None:
        self._drafted += drafted
        self._accepted += accepted

    def reset(self) -> None:
        """Prompt lookup keeps no state about the conversation."""


@dataclasses.dataclass(kw_only=True)
class SpeculationStats:
    """What speculation did during one reply's decode."""

    drafter: str  # the drafter's name: "ngram" or "draft-model"
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

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "tokens_per_pass": self.tokens_per_pass,
            "accepted_per_pass": self.accepted_per_pass,
            "draft_time_share": self.draft_time_share,
        }
