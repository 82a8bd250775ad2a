"""compute.speculate: n-gram drafting, draft trees and their verification layout, pass sizing, and the acceptance
rules, the sampling ones checked statistically against the target's own distribution (chi-square, fixed seeds)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compute.speculate.accept import (
    Accepted,
    accept_multi_draft,
    draw,
    multi_draft_step,
    speculative_sampling,
    walk_tree,
)
from compute.speculate.ngram import propose_ngram
from compute.speculate.sizing import PassCost, tree_size
from compute.speculate.tree import (
    ROOT,
    DraftTree,
    ancestor_rows,
    chain,
    grow_tree,
    tree_attention_mask,
    tree_positions,
)

# ---------------------------------------------------------------- n-grams


def test_ngram_copies_what_followed_the_longest_recurring_suffix():
    context = [5, 6, 7, 8, 9, 1, 2, 6, 7]  # "6 7" recurs; "2 6 7" does not
    assert propose_ngram(context, 3) == [8, 9, 1]
    assert propose_ngram(context, 10) == [8, 9, 1, 2, 6, 7]


def test_ngram_prefers_the_longer_match_and_the_most_recent_occurrence():
    # the 1-gram "3" last appeared before 4; the 2-gram "2 3" before 9: the longer wins
    assert propose_ngram([2, 3, 9, 3, 4, 1, 2, 3], 1) == [9]
    # two occurrences of "1 2": the most recent one's continuation
    assert propose_ngram([1, 2, 5, 1, 2, 6, 0, 1, 2], 1, max_ngram=2) == [6]


def test_ngram_proposes_nothing_when_no_suffix_recurs_and_refuses_bad_arguments():
    assert propose_ngram([1, 2, 3, 4], 5) == []
    assert propose_ngram([7], 5) == []
    assert propose_ngram([4, 1, 2, 3], 2, min_ngram=2) == []
    with pytest.raises(ValueError, match="num_tokens"):
        propose_ngram([1, 1], 0)


# ---------------------------------------------------------------- trees


def test_chain_is_a_tree_of_one_branch_and_bad_parents_are_refused():
    tree = chain([4, 5, 6])
    assert tree.parents == (ROOT, 0, 1) and tree.depths() == [0, 1, 2] and tree.path_to(2) == [0, 1, 2]
    with pytest.raises(ValueError, match="parent"):
        DraftTree((1, 2), (ROOT, 1), (0.0, 0.0))


def _markov_draft(vocab: int, seed: int):
    """A draft whose next-token distribution depends on the last token: (root log-probs, expand callback, table)."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.softmax(torch.randn(vocab, vocab, generator=generator) * 2, dim=-1).log()  # [last, next]
    root = torch.softmax(torch.randn(vocab, generator=generator) * 2, dim=-1).log()
    calls: list[list[int]] = []

    def topk(log_probs: torch.Tensor, k: int):
        values, ids = log_probs.topk(k)
        return ids.tolist(), values.tolist()

    def expand(tree: DraftTree, nodes):
        calls.append(list(nodes))
        for node in nodes:  # every ancestor was expanded before: its children exist in the tree given
            for ancestor in tree.path_to(node)[:-1]:
                assert any(p == ancestor for p in tree.parents)
        return [topk(table[tree.tokens[n]], 2) for n in nodes]

    return root, expand, topk, table, calls


def test_grow_tree_keeps_the_best_paths_by_cumulative_draft_probability():
    vocab, top_k, depth, budget = 6, 2, 3, 9
    root, expand, topk, table, calls = _markov_draft(vocab, seed=1)
    root_ids, root_lps = topk(root, top_k)
    tree = grow_tree(root_ids, root_lps, expand, budget=budget, max_depth=depth, rounds=20, expand_per_round=64)
    # brute force: every path of the top-k tree up to the depth, its cumulative log-probability
    paths = {}
    frontier = [((t,), lp) for t, lp in zip(root_ids, root_lps)]
    while frontier:
        path, lp = frontier.pop()
        paths[path] = lp
        if len(path) < depth:
            ids, lps = topk(table[path[-1]], top_k)
            frontier += [((*path, t), lp + l) for t, l in zip(ids, lps)]
    best = sorted(paths.values(), reverse=True)[:budget]
    assert len(tree) == budget
    assert tree.log_probs == pytest.approx(best)
    for node in range(len(tree)):  # each node's log-prob is its path's, and parents precede children
        path = tuple(tree.tokens[n] for n in tree.path_to(node))
        assert paths[path] == pytest.approx(tree.log_probs[node])
    assert all(a >= b for a, b in itertools.pairwise(tree.log_probs))
    expected = tree.expected_accepted()
    assert expected[0] == 0 and expected[-1] == pytest.approx(sum(math.exp(lp) for lp in best))


def test_grow_tree_respects_rounds_and_the_expansion_width():
    root, expand, topk, _table, calls = _markov_draft(5, seed=2)
    root_ids, root_lps = topk(root, 2)
    tree = grow_tree(root_ids, root_lps, expand, budget=50, max_depth=10, rounds=3, expand_per_round=2)
    assert len(calls) == 3 and all(len(c) <= 2 for c in calls)
    assert len(tree) == 2 + 3 * 2 * 2  # the root's 2 candidates, then 2 per expanded node
    assert max(tree.depths()) <= 3


def test_tree_positions_and_mask_follow_the_ancestry():
    # root -> a(0) -> c(2); root -> b(1) -> d(3) -> e(4)
    tree = DraftTree((10, 11, 12, 13, 14), (ROOT, ROOT, 0, 1, 3), (0.0,) * 5)
    assert tree_positions(tree, 7).tolist() == [7, 8, 8, 9, 9, 10]
    rows = ancestor_rows(tree)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for row, ancestors in {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 2, 4], 5: [0, 2, 4, 5]}.items():
        expected[row, ancestors] = True
    assert torch.equal(rows, expected)
    mask = tree_attention_mask(tree, prefix=3, kv_length=12)
    assert mask.shape == (6, 12) and mask[:, :3].all() and not mask[:, 9:].any()
    assert torch.equal(mask[:, 3:9], expected)
    with pytest.raises(ValueError, match="does not fit"):
        tree_attention_mask(tree, prefix=7, kv_length=12)


# ---------------------------------------------------------------- sizing


def test_pass_cost_fits_the_line_and_the_size_follows_it():
    cost = PassCost()
    assert tree_size([0.0, 0.9, 1.6, 2.0], cost) == 3  # nothing measured: the whole tree
    cost.record(4, 1.0)
    assert tree_size([0.0, 0.9, 1.6, 2.0, 2.3, 2.5, 2.6, 2.65, 2.7], cost) == 2  # one length seen: probe a quarter
    streaming = PassCost()
    for rows in (1, 17, 65, 129):
        streaming.record(rows, 0.25 + 0.001 * rows)  # streaming: a pass is mostly its fixed cost
    fixed, per_row = streaming.line()
    assert fixed == pytest.approx(0.25) and per_row == pytest.approx(0.001)
    expected = [0.0, *itertools.accumulate(0.98**i for i in range(1, 129))]  # slowly decaying gains
    assert tree_size(expected, streaming) > 60
    resident = PassCost()
    for rows in (1, 17, 65):
        resident.record(rows, 0.004 + 0.002 * rows)  # resident: every row costs half a pass
    steep = [0.0, *itertools.accumulate(0.9**i for i in range(1, 129))]
    assert 0 < tree_size(steep, resident) < 8 < tree_size(steep, streaming)


# ---------------------------------------------------------------- acceptance


def test_walk_tree_with_the_argmax_emits_the_targets_greedy_tokens():
    tree = DraftTree((10, 11, 12, 13), (ROOT, ROOT, 1, 2), (0.0,) * 4)
    greedy = {0: 11, 2: 12, 3: 99}  # row -> the target's argmax: root picks 11 (node 1), then 12 (node 2), then 99
    assert walk_tree(tree, greedy.__getitem__) == Accepted((1, 2), (11, 12, 99))
    assert walk_tree(tree, {0: 5}.__getitem__) == Accepted((), (5,))
    assert walk_tree(chain([]), {0: 3}.__getitem__) == Accepted((), (3,))


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs`` (cells of zero probability must be empty)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    statistic = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def _distribution(vocab: int, generator: torch.Generator, sharpness: float = 1.5, zeros: int = 0) -> torch.Tensor:
    logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * sharpness
    if zeros:
        logits[torch.randperm(vocab, generator=generator)[:zeros]] = -math.inf  # like top-k/top-p filtering
    return torch.softmax(logits, dim=-1)


class TwoSteps:
    """A target and a draft over two tokens: p1, p2[x1] and q1, q2[x1] (each row a distribution)."""

    def __init__(self, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.p1 = _distribution(vocab, g, zeros=1)
        self.p2 = torch.stack([_distribution(vocab, g) for _ in range(vocab)])
        self.p3 = torch.stack([_distribution(vocab, g) for _ in range(vocab)])  # after two tokens: on the second
        self.q1 = _distribution(vocab, g)
        self.q2 = torch.stack([_distribution(vocab, g) for _ in range(vocab)])

    def joint(self) -> torch.Tensor:
        return self.p1[:, None] * self.p2  # [x1, x2]

    def first_two(self, tokens: tuple[int, ...], g: torch.Generator) -> tuple[int, int]:
        """The first two tokens of a reply: what a pass emitted, completed by the next pass (a plain draw)."""
        if len(tokens) >= 2:
            return tokens[0], tokens[1]
        return tokens[0], draw(self.p2[tokens[0]], g)


TRIALS = 6000
SEEDS = (0, 1, 2)


def _histogram(model: TwoSteps, emit, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    counts = torch.zeros(model.vocab, model.vocab)
    for _ in range(TRIALS):
        x1, x2 = model.first_two(emit(g), g)
        counts[x1, x2] += 1
    return counts


@pytest.mark.parametrize("seed", SEEDS)
def test_walking_a_top_k_tree_with_target_draws_keeps_the_target_distribution(seed):
    model = TwoSteps(5, seed)
    # the draft's deterministic top-2 tree, two levels: children of the root, then of each of them
    first = model.q1.topk(2).indices.tolist()
    tokens, parents = list(first), [ROOT, ROOT]
    for node, token in enumerate(first):
        for t in model.q2[token].topk(2).indices.tolist():
            tokens.append(t)
            parents.append(node)
    tree = DraftTree(tuple(tokens), tuple(parents), (0.0,) * len(tokens))

    def emit(g):
        def choose(row: int) -> int:
            probs = model.p1 if row == 0 else (model.p2 if tree.parents[row - 1] == ROOT else model.p3)[tokens[row - 1]]
            return draw(probs, g)

        return walk_tree(tree, choose).tokens

    assert chi_square_p_value(_histogram(model, emit, seed), model.joint()) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_speculative_sampling_of_a_sampled_chain_keeps_the_target_distribution(seed):
    model = TwoSteps(5, seed)

    def emit(g):
        x1 = draw(model.q1, g)
        x2 = draw(model.q2[x1], g)
        draft = torch.stack([model.q1, model.q2[x1]])
        target = torch.stack([model.p1, model.p2[x1], model.p3[x2]])
        return speculative_sampling([x1, x2], draft, target, g).tokens

    assert chi_square_p_value(_histogram(model, emit, seed), model.joint()) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_draft_rule_on_a_sampled_tree_keeps_the_target_distribution(seed):
    model = TwoSteps(5, seed)

    def emit(g):
        tokens, parents = [], []
        for _ in range(3):  # three children of the root drawn from q1, two under each drawn from q2[child]
            tokens.append(draw(model.q1, g))
            parents.append(ROOT)
        for node in range(3):
            for _ in range(2):
                tokens.append(draw(model.q2[tokens[node]], g))
                parents.append(node)
        tree = DraftTree(tuple(tokens), tuple(parents), (0.0,) * len(tokens))

        def probs(table1, table2, table3):
            def at(row: int) -> torch.Tensor:
                if row == 0:
                    return table1
                return (table2 if tree.parents[row - 1] == ROOT else table3)[tokens[row - 1]]

            return at

        return accept_multi_draft(tree, probs(model.q1, model.q2, model.q2), probs(model.p1, model.p2, model.p3), g).tokens

    assert chi_square_p_value(_histogram(model, emit, seed), model.joint()) > 1e-3


def test_the_chi_square_check_rejects_a_rule_that_skips_the_residual():
    """The control: keep/reject as speculative sampling does, but after a rejection draw from p itself instead of
    norm(max(0, p - q)). Tokens the draft over-proposes come out too often, and the test must notice."""
    model = TwoSteps(5, 0)

    def emit(g):
        x1 = draw(model.q1, g)
        if float(torch.rand((), generator=g, dtype=torch.float64)) * model.q1[x1] < model.p1[x1]:
            return (x1,)
        return (draw(model.p1, g),)

    assert chi_square_p_value(_histogram(model, emit, 0), model.joint()) < 1e-6


def test_multi_draft_step_accepts_a_candidate_the_target_prefers_and_emits_no_impossible_token():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    for _ in range(20):  # candidates the target never emits are rejected; the residual is the target itself
        assert multi_draft_step([0, 1], q, p, g) == (None, 2)
    assert multi_draft_step([2], torch.tensor([0.0, 0.0, 1.0, 0.0]), p, g) == (0, 2)


def test_the_governor_drafts_only_while_drafting_costs_less_per_token():
    from compute.speculation import SpeculationGovernor

    governor = SpeculationGovernor(probe_after=2, max_probe_after=8, weight=1.0)
    assert not governor.should_draft()  # the first step is plain: its cost must be known
    governor.record_plain(0.010)
    assert governor.should_draft()
    governor.record_speculative(0.100, emitted=5)  # 20 ms a token against 10: lose, then 2 plain steps
    assert [governor.should_draft() for _ in range(3)] == [False, False, True]
    governor.record_speculative(0.100, emitted=5)  # lose again: 4 plain steps
    assert [governor.should_draft() for _ in range(5)] == [False] * 4 + [True]
    for _ in range(3):
        governor.record_speculative(0.100, emitted=5)
        while not governor.should_draft():
            pass
    assert governor._backoff == 8  # doubled up to its cap
    assert governor.probing  # the last pass lost: the next is a probe, drafting little
    governor.record_speculative(0.030, emitted=5)  # 6 ms a token: drafting wins, every step drafts
    assert all(governor.should_draft() for _ in range(10)) and governor._backoff == 2
    assert not governor.probing and SpeculationGovernor().probing  # and drafts in full; a fresh one probes


def test_a_chains_node_must_bring_more_than_its_cost_at_the_rate_speculation_achieves():
    from compute.speculation import NgramDrafter, SpeculationGovernor

    governor = SpeculationGovernor(weight=1.0)
    assert governor.chain_floor(0.001) == 0.0  # nothing measured yet: no floor
    governor.record_draft(0.009, nodes=10)  # 0.9 ms a drafted node
    assert governor.chain_floor(0.001) == 0.0
    governor.record_speculative(0.020, emitted=5)  # 4 ms a token: 250 tok/s
    # a node costs 0.9 + 0.3 ms and must bring 1.2 ms x 250 tok/s = 0.3 tokens
    assert governor.chain_floor(0.0003) == pytest.approx(0.3)
    governor.record_speculative(0.500, emitted=5)  # 100 ms a token (layers stream): nearly any node pays
    assert governor.chain_floor(0.0003) == pytest.approx(0.012)
    governor.record_speculative(0.001, emitted=1)
    assert governor.chain_floor(0.0003) == 1.0  # capped: no node is that sure
    drafter = NgramDrafter()  # prior acceptance 0.5: node i has probability 0.5 ** (i + 1)
    context = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert len(drafter.propose(context, 6)) == 6
    assert len(drafter.propose(context, 6, min_probability=0.2)) == 2  # 0.5, 0.25; not 0.125
    assert len(drafter.propose(context, 6, min_probability=0.9)) == 0
