"""Acceptance: which drafted tokens the target keeps, so that the emitted tokens have the target's distribution.

Rows are numbered as in the verification pass (``compute.speculate.tree``): row 0 is the root, row 1 + i node i.
Every rule returns ``Accepted``: the accepted nodes (a path from the root) and the emitted tokens, which are the
accepted nodes' tokens followed by exactly one token the target chose itself (so a pass always gains at least one
token).

* ``walk_tree(tree, choose)``: at each row the target chooses a token (``choose(row)``); if it is one of that
  row's children the walk goes down to it, otherwise it stops there. With ``choose`` = the argmax of the target's
  logits this is exact greedy decoding (the same tokens as one per pass); with ``choose`` = a draw from the
  target's distribution it is SpecExec's rule for a deterministic tree (top-k children, not samples): every
  emitted token is a draw from the target's distribution given the tokens before it, the tree only deciding
  whether that distribution was already computed.
* ``speculative_sampling(draft_tokens, draft_probs, target_probs, generator)``: a chain drafted by sampling from
  the draft (Leviathan et al., 2023; Chen et al., 2023): token x at step i is kept with probability
  min(1, p(x) / q(x)); the first rejected one is replaced by a draw from norm(max(0, p - q)); when all are kept,
  a bonus draw from the last row.
* ``multi_draft_step`` and ``accept_multi_draft``: SpecInfer's multi-step speculative sampling (Miao et al., 2024)
  for a tree whose children at each node were drawn independently from the draft's distribution there: each child
  in turn is kept with probability min(1, p(x) / q(x)), and after a rejection p becomes norm(max(0, p - q)); when
  every child is rejected the emitted token is a draw from that residual.

Probabilities are 1-D float tensors over the vocabulary (already processed: penalty, temperature, top-k/top-p);
random draws come only from the caller's ``generator`` (on the probabilities' device), so a seed fixes the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from compute.speculate.tree import ROOT, DraftTree


@dataclasses.dataclass(frozen=True)
class Accepted:
    nodes: tuple[int, ...]  # accepted node indices, from the root's child down
    tokens: tuple[int, ...]  # the emitted tokens: the accepted nodes' tokens, then the target's own (len(nodes) + 1)


def _children_lists(tree: DraftTree) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {ROOT: []}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(node)
    return children


def walk_tree(tree: DraftTree, choose: Callable[[int], int]) -> Accepted:
    """Follow the target's choice (``choose(row) -> token``) down the tree while it names a child."""
    children = _children_lists(tree)
    node, nodes, tokens = ROOT, [], []
    while True:
        token = int(choose(node + 1))
        tokens.append(token)
        child = next((c for c in children.get(node, ()) if tree.tokens[c] == token), None)
        if child is None:
            return Accepted(tuple(nodes), tuple(tokens))
        nodes.append(child)
        node = child


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` ([vocab], summing to 1 up to rounding)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def _uniform(probs: torch.Tensor, generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, device=probs.device, dtype=torch.float64))


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); p itself if nothing is left (a rejection then had probability zero)."""
    left = (p - q).clamp(min=0)
    total = left.sum()
    return left / total if total > 0 else p


def speculative_sampling(
    draft_tokens: Sequence[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Accepted:
    """Accept a sampled chain: ``draft_probs`` (k, vocab) the draft's distribution each token was drawn from,
    ``target_probs`` (k + 1, vocab) the target's at each row (row i before draft token i, row k after the last)."""
    k = len(draft_tokens)
    if draft_probs.shape[0] != k or target_probs.shape[0] != k + 1:
        raise ValueError(f"{k} draft tokens need ({k}, vocab) draft and ({k + 1}, vocab) target probabilities, "
                         f"got {tuple(draft_probs.shape)} and {tuple(target_probs.shape)}")
    for i, token in enumerate(draft_tokens):
        p, q = target_probs[i], draft_probs[i]
        if _uniform(p, generator) * float(q[token]) < float(p[token]):
            continue
        return Accepted(tuple(range(i)), (*map(int, draft_tokens[:i]), draw(_residual(p, q), generator)))
    return Accepted(tuple(range(k)), (*map(int, draft_tokens), draw(target_probs[k], generator)))


def multi_draft_step(
    candidates: Sequence[int], draft_probs: torch.Tensor, target_probs: torch.Tensor, generator: torch.Generator | None
) -> tuple[int | None, int]:
    """One node of SpecInfer's rule: ``candidates`` drawn independently from ``draft_probs``; returns (index of the
    accepted candidate or None, the emitted token)."""
    p, q = target_probs, draft_probs
    for index, token in enumerate(candidates):
        if _uniform(p, generator) * float(q[token]) < float(p[token]):
            return index, int(token)
        p = _residual(p, q)
    return None, draw(p, generator)


def accept_multi_draft(
    tree: DraftTree,
    draft_probs: Callable[[int], torch.Tensor],
    target_probs: Callable[[int], torch.Tensor],
    generator: torch.Generator | None,
) -> Accepted:
    """Walk a tree whose children at each row were drawn independently from ``draft_probs(row)``, accepting by
    ``multi_draft_step`` against ``target_probs(row)``."""
    children = _children_lists(tree)
    node, nodes, tokens = ROOT, [], []
    while True:
        row = node + 1
        kids = children.get(node, [])
        if not kids:
            tokens.append(draw(target_probs(row), generator))
            return Accepted(tuple(nodes), tuple(tokens))
        index, token = multi_draft_step([tree.tokens[c] for c in kids], draft_probs(row), target_probs(row), generator)
        tokens.append(token)
        if index is None:
            return Accepted(tuple(nodes), tuple(tokens))
        node = kids[index]
        nodes.append(node)
