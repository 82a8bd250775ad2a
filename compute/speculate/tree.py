"""Draft trees: what the target checks in one pass, how a draft grows one, and how the pass is laid out.

A ``DraftTree`` holds N drafted nodes; node ``i`` has a ``token``, a ``parent`` (a node index < i, or ``ROOT`` for
the children of the root: the last token already chosen, whose keys/values are not cached yet) and the draft's
cumulative ``log_prob`` of reaching it from the root. Parents always come before their children, so every prefix of
the nodes is itself a tree. A chain (``chain``) is the tree whose node i hangs under node i - 1.

``grow_tree`` is SpecExec's best-first construction (Svirschevski et al., 2024): every node proposed so far is a
candidate; each round, the best candidates (by cumulative draft probability) that would make the final tree and
have not been expanded yet are expanded together (one draft forward over all of them: ``expand``), each adding
its draft's top-k tokens as new candidates; at the end the ``budget`` best candidates form the tree, sorted so
that cumulative probabilities never increase (a prefix of the result is the best tree of that size). The sum of
the nodes' probabilities is the number of tokens the draft expects the target to accept (``expected_accepted``),
which is what sizing weighs against the cost of a longer pass.

The verification pass runs ``1 + N`` rows: row 0 is the root token, row ``1 + i`` is node i. ``tree_positions``
gives each row's position (the prefix length plus its depth) and ``tree_attention_mask`` the boolean mask,
True where a row may attend: every cached prefix position, then, among the tree rows (stored after the prefix in
row order), itself and its ancestors. ``ancestor_rows`` is the same relation on its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import torch

ROOT = -1  # the parent of the root's children


@dataclasses.dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]  # node i's token id
    parents: tuple[int, ...]  # node i's parent: a node index < i, or ROOT
    log_probs: tuple[float, ...]  # node i's cumulative draft log-probability from the root (0.0 when unknown)

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.parents) == len(self.log_probs):
            raise ValueError(f"tokens, parents and log_probs differ in length: {len(self.tokens)}, "
                             f"{len(self.parents)}, {len(self.log_probs)}")
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i} has parent {parent}: a parent must be ROOT or an earlier node")

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Node i's depth: 0 for a child of the root."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(0 if parent == ROOT else depths[parent] + 1)
        return depths

    def children(self, node: int) -> dict[int, int]:
        """The children of ``node`` (or of ROOT): token id -> node index (the first such node, if a token repeats)."""
        found: dict[int, int] = {}
        for i, parent in enumerate(self.parents):
            if parent == node:
                found.setdefault(self.tokens[i], i)
        return found

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root's child down to ``node``, in order."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def prefix(self, size: int) -> DraftTree:
        """The first ``size`` nodes (a tree, since parents come first)."""
        return DraftTree(self.tokens[:size], self.parents[:size], self.log_probs[:size])

    def expected_accepted(self) -> list[float]:
        """``e[k]``: the tokens the draft expects accepted from the first k nodes (sum of their probabilities)."""
        return list(itertools.accumulate((math.exp(lp) for lp in self.log_probs), initial=0.0))


def chain(tokens: Sequence[int], log_probs: Sequence[float] | None = None) -> DraftTree:
    """The degenerate tree: node i under node i - 1."""
    tokens = tuple(int(t) for t in tokens)
    return DraftTree(tokens, tuple(range(-1, len(tokens) - 1)), tuple(log_probs or (0.0,) * len(tokens)))


# expand(tree of every candidate so far, node indices) -> per node, (token ids, log-probabilities) of the draft's
# most likely next tokens after that node, best first
Expand = Callable[[DraftTree, Sequence[int]], Sequence[tuple[Sequence[int], Sequence[float]]]]


def grow_tree(
    root_tokens: Sequence[int],
    root_log_probs: Sequence[float],
    expand: Expand,
    *,
    budget: int,
    max_depth: int,
    rounds: int,
    expand_per_round: int,
) -> DraftTree:
    """SpecExec's best-first tree: at most ``budget`` nodes, at most ``max_depth`` deep, at most ``rounds`` calls of
    ``expand`` with at most ``expand_per_round`` nodes each. ``root_*`` are the draft's candidates after the root.

    ``expand`` receives the tree of all candidates so far (indices stable across rounds: candidates are only ever
    appended) and the nodes to expand, each of whose ancestors was expanded in an earlier round. The result is
    re-indexed: nodes sorted by cumulative log-probability (ties: the earlier candidate first, which keeps parents
    before children).
    """
    if budget < 1 or max_depth < 1 or rounds < 0 or expand_per_round < 1:
        raise ValueError(f"need budget, max_depth, expand_per_round >= 1 and rounds >= 0, got "
                         f"{budget}, {max_depth}, {expand_per_round}, {rounds}")
    tokens = [int(t) for t in root_tokens]
    parents = [ROOT] * len(tokens)
    log_probs = [float(lp) for lp in root_log_probs]
    depths = [0] * len(tokens)
    expanded: set[int] = set()

    def ranking() -> list[int]:
        return sorted(range(len(tokens)), key=lambda i: (-log_probs[i], i))[:budget]

    for _ in range(rounds):
        chosen = [i for i in ranking() if i not in expanded and depths[i] + 1 < max_depth][:expand_per_round]
        if not chosen:
            break
        proposals = expand(DraftTree(tuple(tokens), tuple(parents), tuple(log_probs)), chosen)
        expanded.update(chosen)
        for node, (next_tokens, next_log_probs) in zip(chosen, proposals, strict=True):
            for token, log_prob in zip(next_tokens, next_log_probs, strict=True):
                tokens.append(int(token))
                parents.append(node)
                log_probs.append(log_probs[node] + float(log_prob))
                depths.append(depths[node] + 1)
    order = ranking()
    new_index = {old: new for new, old in enumerate(order)}
    return DraftTree(
        tuple(tokens[i] for i in order),
        tuple(ROOT if parents[i] == ROOT else new_index[parents[i]] for i in order),
        tuple(log_probs[i] for i in order),
    )


def ancestor_rows(tree: DraftTree) -> torch.Tensor:
    """Boolean (1 + N, 1 + N): [r, c] is True when row c is row r itself or one of its ancestors (row 0, the root,
    is everyone's)."""
    rows = len(tree) + 1
    mask = torch.zeros(rows, rows, dtype=torch.bool)
    mask[:, 0] = True
    for i, parent in enumerate(tree.parents):
        row = i + 1
        if parent != ROOT:
            mask[row] = mask[parent + 1]
        mask[row, row] = True
    return mask


def ancestor_bits(tree: DraftTree) -> list[int]:
    """``ancestor_rows`` as one bit mask a row: bit c of row r's is [r, c]."""
    return [sum(1 << c for c in range(len(row)) if row[c]) for row in ancestor_rows(tree).tolist()]


def tree_positions(tree: DraftTree, prefix: int) -> torch.Tensor:
    """Positions of the 1 + N rows: the root at ``prefix`` (the cached prefix's length), node i at prefix + 1 + depth."""
    return torch.tensor([prefix, *(prefix + 1 + d for d in tree.depths())], dtype=torch.long)


def tree_attention_mask(tree: DraftTree, prefix: int, kv_length: int) -> torch.Tensor:
    """Boolean (1 + N, kv_length), True where a row attends: positions < ``prefix`` (the cache), and at ``prefix + c``
    the rows c that are the row itself or its ancestors (the tree's keys are stored after the prefix in row order).
    ``kv_length`` (the static cache's length) must hold them all."""
    rows = len(tree) + 1
    if prefix + rows > kv_length:
        raise ValueError(f"a tree of {rows} rows after {prefix} cached positions does not fit {kv_length} positions")
    mask = torch.zeros(rows, kv_length, dtype=torch.bool)
    mask[:, :prefix] = True
    mask[:, prefix : prefix + rows] = ancestor_rows(tree)
    return mask
