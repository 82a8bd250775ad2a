"""Speculative decode in compute.engine: every token still the target's own choice (teacher-forced against stock
transformers), the tree's accepted path kept in the cache and the rest dropped, the n-gram drafter, and the stats."""

from __future__ import annotations

import unittest.mock

import pytest
import compute.engine
import compute.sampling
import torch
from compute.engine import FinishReason
from compute.sampling import SamplingParams
from compute.speculate.tree import ROOT, DraftTree
from compute.speculation import NgramDrafter
from test_engine import GREEDY, LOGIT_TOLERANCE, generate_checked, make_engine, qdir, random_prompt, references  # noqa: F401 (fixtures)
from test_engine import reference_model
from test_model import CheckpointWeights
from compute.engine import Engine
from quantizer.checkpoint import QuantizedCheckpoint


class OracleDrafter:
    """Proposes a tree holding what the target will answer (the greedy continuation of the context by an engine
    without a drafter, ``plain``), hidden among decoys: for each of the next ``depth`` tokens, a decoy sibling first,
    then the right token, whose own subtree goes on. With ``wrong_after`` the continuation is altered from there
    on, so a pass accepts only part of it."""

    name = "oracle"

    def __init__(self, plain, depth: int, wrong_after: int | None = None, vocab: int = 300):
        self.plain, self.depth, self.wrong_after, self.vocab = plain, depth, wrong_after, vocab

    def propose(self, context, max_tokens, min_probability=0.0):  # every node is sure
        params = SamplingParams(temperature=0, max_new_tokens=self.depth)
        # the plain engine's own choices, even while a test records the speculating engine's (by patching the name)
        with unittest.mock.patch.object(compute.engine, "sample_next", compute.sampling.sample_next):
            upcoming = list(self.plain.generate(list(context), params).token_ids)
        if self.wrong_after is not None:
            upcoming = upcoming[: self.wrong_after] + [(t + 1) % self.vocab for t in upcoming[self.wrong_after :]]
        tokens, parents, parent = [], [], ROOT
        for token in upcoming:
            tokens += [(token + 7) % self.vocab, token]  # a decoy, then the continuation's token
            parents += [parent, parent]
            parent = len(tokens) - 1
        tree = DraftTree(tuple(tokens), tuple(parents), (0.0,) * len(tokens))
        return tree.prefix(min(len(tree), max_tokens))

    def accepted(self, drafted, accepted):
        pass

    def reset(self):
        pass


# Exact comparisons between a speculating engine and a plain one run in float32: a pass over several rows rounds
# differently from a one-row pass, and in bf16 a random tiny model's two best logits are often close enough for that
# to pick the other one (the bf16 engines are checked against the reference within its tolerance instead).
EXACT = torch.float32


def plain_engine(qdir):
    plain = make_engine(qdir, dtype=EXACT)
    plain.eos_token_ids = frozenset()
    return plain


def same_until_a_near_tie(ours, theirs, prompt, reference) -> None:
    """Two greedy replies agree, or part where the reference's two best logits are closer than the arithmetic's
    rounding could tell apart (a pass over several rows rounds differently from a one-row pass)."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            ids = torch.tensor([prompt + list(ours[:step])])
            with torch.inference_mode():
                top2 = reference(input_ids=ids).logits[0, -1].float().topk(2).values
            assert top2[0] - top2[1] <= 2 * LOGIT_TOLERANCE, f"step {step}: {a} != {b} with a clear argmax"
            return
    assert len(ours) == len(theirs)


def test_a_tree_pass_emits_the_targets_greedy_tokens_and_keeps_only_the_accepted_path(qdir, references):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompt = random_prompt(7)
    plain = plain_engine(qdir)
    script = prompt + list(plain.generate(prompt, params).token_ids)
    engine = make_engine(qdir, drafter=OracleDrafter(plain, depth=4), draft_tokens=8, dtype=EXACT)
    engine.eos_token_ids = frozenset()
    result = generate_checked(engine, references(qdir), prompt, params)  # every row checked against the reference
    assert list(result.token_ids) == script[len(prompt) :]
    stats = result.speculation
    # 11 decode tokens; the tree is cut to the room the reply has left (one token always comes from the target):
    # 8 nodes -> 4 accepted + 1; 5 nodes -> 2 + 1; 2 nodes -> 1 + 1; none -> a one-token pass
    assert stats.target_passes == result.decode_passes == 4 and stats.emitted_tokens == 11
    assert stats.drafted_tokens == 8 + 5 + 2 and stats.accepted_tokens == 4 + 2 + 1
    assert engine._cached_ids == script[:-1]  # the last token is never fed; no decoy left in the cache
    # a second turn on the same cache must still follow the reference (the kept keys/values are right)
    follow = script + random_prompt(3)
    engine.drafter = NgramDrafter()
    generate_checked(engine, references(qdir), follow, GREEDY)


def test_a_partly_wrong_tree_accepts_up_to_the_first_wrong_token(qdir, references):
    params = SamplingParams(temperature=0, max_new_tokens=10)
    prompt = random_prompt(6)
    plain = plain_engine(qdir)
    script = prompt + list(plain.generate(prompt, params).token_ids)
    engine = make_engine(qdir, drafter=OracleDrafter(plain, depth=5, wrong_after=2), draft_tokens=10, dtype=EXACT)
    engine.eos_token_ids = frozenset()
    result = generate_checked(engine, references(qdir), prompt, params)
    assert list(result.token_ids) == script[len(prompt) :]
    # 9 decode tokens: 8 nodes -> 2 right, then a wrong one: 2 + 1; 5 nodes -> 2 + 1; 2 nodes -> 1 + 1; then 1
    assert result.speculation.target_passes == 4 and result.speculation.accepted_tokens == 2 + 2 + 1


def test_the_reply_ends_inside_a_pass_at_an_eos_and_the_cache_is_cut_back(tiny_q):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompt = random_prompt(6)
    plain = plain_engine(tiny_q)
    script = prompt + list(plain.generate(prompt, params).token_ids)
    eos = script[len(prompt) + 2]
    end = script.index(eos, len(prompt)) + 1
    engine = make_engine(tiny_q, drafter=OracleDrafter(plain, depth=6), draft_tokens=12, dtype=EXACT)
    engine.eos_token_ids = frozenset({eos})
    result = engine.generate(prompt, params)
    assert list(result.token_ids) == script[len(prompt) : end] and result.finish_reason is FinishReason.EOS
    assert engine._cached_ids == script[: end - 1]


def test_ngram_speculation_gives_the_same_greedy_reply_and_sampled_reply_per_seed(qdir, references):
    # Repeats, so prompt lookup finds something to propose; and a fixed draw, because whether the first probe finds
    # one depends on the reply's first tokens (prompt lookup matches the context's last tokens): with some prompts it
    # finds none, the empty draft counts as a lost probe, and the next 16 steps are plain.
    torch.manual_seed(3)
    prompt = random_prompt(5) * 3
    plain = make_engine(qdir)
    plain.eos_token_ids = frozenset()
    engine = make_engine(qdir, drafter=NgramDrafter())
    engine.eos_token_ids = frozenset()
    params = SamplingParams(temperature=0, max_new_tokens=10)
    reference = references(qdir)
    result = generate_checked(engine, reference, prompt, params)
    same_until_a_near_tie(result.token_ids, plain.generate(prompt, params).token_ids, prompt, reference)
    stats = result.speculation
    assert stats.drafter == "ngram" and stats.target_passes == result.decode_passes >= 1
    assert stats.emitted_tokens == result.decode_tokens and stats.drafted_tokens > 0
    sampled = SamplingParams(temperature=1.0, top_p=1.0, seed=11, max_new_tokens=10)
    first = engine.generate(prompt, sampled)
    assert engine.generate(prompt, sampled).token_ids == first.token_ids  # the seed fixes the reply
    assert first.speculation.emitted_tokens == first.decode_tokens


def test_drafts_never_run_past_the_context(tiny_q):
    prompt = random_prompt(4) * 3
    engine = make_engine(tiny_q, drafter=NgramDrafter(), max_context=16)
    engine.eos_token_ids = frozenset()
    result = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=20))
    assert result.finish_reason is FinishReason.CONTEXT and len(prompt) + len(result.token_ids) == 17
    assert len(engine._cached_ids) == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_tree_passes_run_the_graphed_decode_step_and_follow_stock_transformers(qdir, tmp_path):
    """On CUDA a tree of up to 15 nodes is checked by the decode step's fused kernels over 16 rows at most,
    replayed from a CUDA graph per bucket: every row's logits still follow the reference, and the accepted path's
    keys/values are the ones the next turn reads."""
    checkpoint = QuantizedCheckpoint(qdir)
    reference = reference_model(qdir, tmp_path).to("cuda")

    def engine_on_cuda(**kwargs):
        engine = Engine(checkpoint, CheckpointWeights(checkpoint, device="cuda"), device="cuda", max_context=64,
                        prefill_chunk=4, **kwargs)  # fmt: skip
        engine.eos_token_ids = frozenset()
        return engine

    plain = engine_on_cuda()
    engine = engine_on_cuda(drafter=OracleDrafter(plain, depth=4), draft_tokens=8)
    prompt = random_prompt(7)
    result = generate_checked(engine, reference, prompt, SamplingParams(temperature=0, max_new_tokens=12))
    assert engine.step_rows == 16 and engine.decode_mode == "graph"
    assert 16 in engine._decoder._row_graphs and engine._decoder._row_graphs[16] is not None  # 9 rows: bucket 16
    assert result.speculation.accepted_tokens > 0 and result.decode_passes < result.decode_tokens
    generate_checked(engine, reference, prompt + list(result.token_ids) + random_prompt(3))
