"""compute.draft_model: resident draft weights in the loader's unit layout, the draft's tree and chain (each node's
log-probability is the path's under stock transformers; a chain's cache stays consistent from one proposal to the
next), speculative decode with a draft (teacher-forced), the tokenizer check, the planner's reservation, and
``spillover run --draft-model`` through real processes."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from compute.decode import stacked
from compute.engine import Engine
from compute.draft_model import (
    DraftChain, DraftModel, DraftModelError, ResidentWeights, check_same_tokenizer, open_drafter,
)  # fmt: skip
from compute.sampling import SamplingParams
from compute.speculate.tree import ROOT, DraftTree
from conftest import make_tiny_qwen2
from loader.layout import layout_units
from loader.planner import draft_lines, plan_placement
from loader.policies import get_policy
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.quantize import quantize_checkpoint
from test_cli import BUDGET, spillover, spillover_env
from test_engine import LOGIT_TOLERANCE, generate_checked, make_engine, qdir, random_prompt, references  # noqa: F401


@pytest.fixture(scope="module")
def tiny_draft_q(tmp_path_factory):
    """A one-layer draft with the tiny models' tokenizer and vocabulary, other random weights."""
    root = tmp_path_factory.mktemp("draft")
    hf = make_tiny_qwen2(root / "hf", num_layers=1, tied=True, shards=1, seed=7)
    return quantize_checkpoint(hf, root / "q", device="cpu", progress=False)


def draft_engine(qdir, dtype=torch.bfloat16) -> Engine:
    checkpoint = QuantizedCheckpoint(qdir)
    return Engine(
        checkpoint, ResidentWeights(checkpoint, "cpu"), device="cpu", max_context=64, prefill_chunk=4, dtype=dtype
    )


def draft_of(qdir, dtype=torch.bfloat16, **options) -> DraftModel:
    engine = draft_engine(qdir, dtype)
    return DraftModel(engine, vocab_size=engine.vocab_size, **options)


def chain_of(qdir, dtype=torch.bfloat16, **options) -> DraftChain:
    engine = draft_engine(qdir, dtype)
    return DraftChain(engine, vocab_size=engine.vocab_size, **options)


def test_resident_weights_hold_every_tensor_with_a_units_qkv_as_one_matrix(tiny_q):
    checkpoint = QuantizedCheckpoint(tiny_q)
    weights = ResidentWeights(checkpoint, "cpu")
    for unit in checkpoint.manifest.units:
        views = weights.acquire(unit.name)
        for name, view in views.items():
            assert torch.equal(view, checkpoint.tensor(name)), name
    layer = weights.acquire("layers.0")
    names = [f"model.layers.0.self_attn.{p}_proj.qweight" for p in "qkv"]
    whole = stacked([type("L", (), {"qweight": layer[n], "scales": layer[n.replace("qweight", "scales")]}) for n in names])
    assert whole[0].data_ptr() == layer[names[0]].data_ptr()  # a view, not a copy: the three lie back to back


def test_each_draft_node_carries_its_paths_log_probability(tiny_q, references):
    drafter = draft_of(tiny_q, top_k=2, expand_per_round=3, rounds=4, max_depth=4)
    reference = references(tiny_q)
    context = random_prompt(9)
    tree = drafter.propose(context, 12)
    assert len(tree) == 12 and drafter.engine._cached_ids == context
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path_to(node)]
        with torch.inference_mode():
            logits = reference(input_ids=torch.tensor([context + path[:-1]])).logits[0, len(context) - 1 :].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        expected = sum(float(log_probs[i, t]) for i, t in enumerate(path))
        assert tree.log_probs[node] == pytest.approx(expected, abs=3 * LOGIT_TOLERANCE * len(path)), node
    # the next call continues the same conversation: only the new tokens are fed
    longer = context + [tree.tokens[0], 5]
    drafter.propose(longer, 4)
    assert drafter.engine._cached_ids == longer


def test_a_draft_identical_to_the_target_gets_its_whole_chain_accepted(tiny_q, references):
    # float32, so that no near-tie rounds differently in the draft's one-row passes and the target's tree pass
    drafter = draft_of(tiny_q, dtype=torch.float32, top_k=1, expand_per_round=1, rounds=5, max_depth=6)
    engine = make_engine(tiny_q, drafter=drafter, draft_tokens=6, dtype=torch.float32)
    engine.eos_token_ids = frozenset()
    result = generate_checked(engine, references(tiny_q), random_prompt(8), SamplingParams(temperature=0, max_new_tokens=15))
    stats = result.speculation
    # 14 decode tokens: two passes of a 6-node chain (the root's top-1, then 5 expansions), all accepted, + 1 each
    assert stats.target_passes == 2 and stats.accepted_tokens == stats.drafted_tokens == 12


def test_speculative_decode_with_a_different_draft_still_gives_the_targets_tokens(qdir, tiny_draft_q, references):
    drafter = draft_of(tiny_draft_q, top_k=3, expand_per_round=4, rounds=3, max_depth=4)
    engine = make_engine(qdir, drafter=drafter)  # sized from the measured pass cost
    engine.eos_token_ids = frozenset()
    result = generate_checked(engine, references(qdir), random_prompt(7), SamplingParams(temperature=0, max_new_tokens=10))
    assert result.speculation.drafter == "draft-model" and result.speculation.draft_seconds > 0
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=4, max_new_tokens=8)
    assert engine.generate(random_prompt(5), sampled).speculation.emitted_tokens >= 1


def test_a_chain_is_the_drafts_greedy_continuation_each_node_carrying_its_log_probability(tiny_q, references):
    drafter = chain_of(tiny_q, max_tokens=6)
    context = random_prompt(9)
    tree = drafter.propose(context, 10)  # the chain's own cap is the lower
    assert len(tree) == 6 and tree.parents == (ROOT, 0, 1, 2, 3, 4)
    with torch.inference_mode():
        ids = torch.tensor([context + list(tree.tokens[:-1])])
        log_probs = torch.log_softmax(references(tiny_q)(input_ids=ids).logits[0, len(context) - 1 :].float(), dim=-1)
    for i, token in enumerate(tree.tokens):
        assert log_probs[i, token] >= log_probs[i].max() - 2 * LOGIT_TOLERANCE, i  # the argmax, up to rounding
        expected = sum(float(log_probs[j, tree.tokens[j]]) for j in range(i + 1))
        assert tree.log_probs[i] == pytest.approx(expected, abs=3 * LOGIT_TOLERANCE * (i + 1)), i
    # the chain's keys/values stay: every node but the last was fed, and the cache's length says so
    assert drafter.engine._cached_ids == context + list(tree.tokens[:-1])
    assert all(int(layer.cumulative_length) == len(context) + 5 for layer in drafter.engine.cache.layers)
    assert len(drafter.propose(context, 2)) == 2 and len(drafter.propose(context, 0)) == 0


def test_a_chain_stops_before_a_node_less_probable_than_asked(tiny_q):
    drafter = chain_of(tiny_q, max_tokens=8)
    context = random_prompt(9)
    full = drafter.propose(context, 8)
    floor = math.exp((full.log_probs[2] + full.log_probs[3]) / 2)  # between the third node's and the fourth's
    cut = drafter.propose(context, 8, min_probability=floor)
    assert cut.tokens == full.tokens[:3] and cut.log_probs == pytest.approx(full.log_probs[:3], abs=6 * LOGIT_TOLERANCE)
    # stopped at the floor, the chain's every node was fed: the cache holds them all
    assert drafter.engine._cached_ids == context + list(cut.tokens)
    assert len(drafter.propose(context, 8, min_probability=1.0)) == 0
    assert drafter.propose(context, 8).tokens == full.tokens  # and the next proposal starts from there


def test_a_chain_leaves_the_drafts_cache_consistent_from_one_proposal_to_the_next(tiny_q):
    """Whatever the target accepted of the last chain, the next one is what a draft that prefills the whole context
    from an empty cache proposes (float32: the decode step and a prefill round differently in bf16)."""
    drafter = chain_of(tiny_q, dtype=torch.float32, max_tokens=8)
    fresh = chain_of(tiny_q, dtype=torch.float32, max_tokens=8)

    def proposes_as_fresh(context: list[int]) -> DraftTree:
        chain = drafter.propose(context, 8)
        fresh.reset()
        expected = fresh.propose(context, 8)
        assert chain.tokens == expected.tokens and chain.parents == expected.parents
        assert chain.log_probs == pytest.approx(expected.log_probs, abs=1e-4)
        engine = drafter.engine
        assert engine._cached_ids == context + list(chain.tokens[:-1])
        assert all(int(layer.cumulative_length) == len(engine._cached_ids) for layer in engine.cache.layers)
        return chain

    context = random_prompt(7)
    chain = proposes_as_fresh(context)
    assert proposes_as_fresh(context).tokens == chain.tokens  # the same context again: its last token runs again
    other = (chain.tokens[3] + 1) % 300
    context = context + list(chain.tokens[:3]) + [other]  # three accepted, then the target's own token
    chain = proposes_as_fresh(context)
    context = context + list(chain.tokens) + [5]  # all accepted: the last node and the target's token are new
    chain = proposes_as_fresh(context)
    proposes_as_fresh(context[:4] + random_prompt(9))  # another conversation sharing a prefix: prefilled


def test_speculative_decode_with_a_chain_gives_the_targets_greedy_reply(qdir, tiny_draft_q, references):
    exact = torch.float32  # a verification pass rounds differently from a one-row pass: no near-tie may flip
    engine = make_engine(qdir, drafter=chain_of(tiny_draft_q, dtype=exact, max_tokens=5), dtype=exact)
    plain = make_engine(qdir, dtype=exact)
    engine.eos_token_ids = plain.eos_token_ids = frozenset()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompt = random_prompt(7)
    result = generate_checked(engine, references(qdir), prompt, params)  # chains sized from the measured pass cost
    assert result.token_ids == plain.generate(prompt, params).token_ids
    stats = result.speculation
    assert stats.drafter == "draft-chain" and stats.target_passes == result.decode_passes
    assert stats.emitted_tokens == result.decode_tokens and stats.draft_seconds > 0
    follow = prompt + list(result.token_ids) + random_prompt(3)  # a second turn over both engines' caches
    assert engine.generate(follow, params).token_ids == plain.generate(follow, params).token_ids


def test_a_chain_drafted_by_the_target_itself_is_accepted_whole(tiny_q, references):
    drafter = chain_of(tiny_q, dtype=torch.float32, max_tokens=6)
    engine = make_engine(tiny_q, drafter=drafter, draft_tokens=6, dtype=torch.float32)
    engine.eos_token_ids = frozenset()
    result = generate_checked(engine, references(tiny_q), random_prompt(8), SamplingParams(temperature=0, max_new_tokens=15))
    stats = result.speculation
    # 14 decode tokens: two passes of a 6-token chain, all accepted, + 1 each
    assert stats.target_passes == 2 and stats.accepted_tokens == stats.drafted_tokens == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_chain_drafts_by_replaying_its_captured_decode_step_as_eager_steps_would(tiny_q):
    drafters = [open_drafter(QuantizedCheckpoint(tiny_q), shape="chain", device="cuda", max_context=64,
                             vocab_size=320, max_tokens=6) for _ in range(2)]  # fmt: skip
    drafters[1].engine.cuda_graphs = False
    context = random_prompt(9)
    for _ in range(3):  # after each: two nodes accepted, then another token
        graphed, eager = (drafter.propose(context, 6) for drafter in drafters)
        assert graphed.tokens == eager.tokens and len(graphed) == 6
        context = context + list(graphed.tokens[:2]) + [7]
    assert drafters[0].engine.decode_mode == "graph" and drafters[1].engine.decode_mode.startswith("eager")


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(tiny_q, tmp_path):
    from transformers import AutoTokenizer

    other = make_tiny_qwen2(tmp_path / "other", tokenizer_vocab=280, shards=1)
    with pytest.raises(DraftModelError, match="tokenizer differs") as refused:
        check_same_tokenizer(AutoTokenizer.from_pretrained(tiny_q), AutoTokenizer.from_pretrained(other), "other")
    assert "\n" not in str(refused.value)
    check_same_tokenizer(AutoTokenizer.from_pretrained(tiny_q), AutoTokenizer.from_pretrained(tiny_q), "same")


def test_the_planner_reserves_the_draft_and_the_table_shows_it(tiny_q, tiny_draft_q):
    target, draft = QuantizedCheckpoint(tiny_q), QuantizedCheckpoint(tiny_draft_q)
    units, draft_units = layout_units(target.manifest), layout_units(draft.manifest)
    lines = draft_lines(device="cpu", units=draft_units, config=draft.config, max_context=64)
    assert lines[0][1] == sum(u.nbytes for u in draft_units)
    assert lines[0][1] == ResidentWeights(draft, "cpu").nbytes  # what compute holds is what was counted
    common = dict(device="cpu", units=units, config=target.config, max_context=64, policy=get_policy("hybrid"))
    budget = sum(n for _, n in plan_placement(budget_bytes=1 << 40, **common).lines[:-1]) + sum(u.nbytes for u in units)
    without = plan_placement(budget_bytes=budget, **common)
    # the same budget plus a byte less than the draft: the draft costs the pool a unit
    with_draft = plan_placement(budget_bytes=budget + sum(n for _, n in lines) - 1, reserved=lines, **common)
    assert len(with_draft.streamed) > len(without.streamed) == 0  # the draft's bytes came out of the pool
    assert "draft model: INT4 weights" in with_draft.table()


def test_run_with_a_draft_model_through_both_processes(tiny_q, tiny_draft_q, tmp_path):
    args = ["run", "--model", str(tiny_q), "--device", "cpu", "--gpu-memory", BUDGET, "--max-context", "128",
            "-p", "Hello there", "-n", "6", "--temperature", "0", "--output-format", "json"]  # fmt: skip
    plain = subprocess.run(spillover(*args), capture_output=True, text=True, env=spillover_env(tmp_path), timeout=180)
    assert plain.returncode == 0, plain.stderr
    drafted = subprocess.run(spillover(*args, "--draft-model", str(tiny_draft_q), "--draft-tokens", "8"),
                             capture_output=True, text=True, env=spillover_env(tmp_path), timeout=180)  # fmt: skip
    assert drafted.returncode == 0, drafted.stderr
    assert "draft model: INT4 weights" in drafted.stderr  # the plan's table
    reply, stats = json.loads(drafted.stdout), json.loads(drafted.stdout)["stats"]["speculation"]
    assert stats["drafter"] == "draft-model" and stats["target_passes"] >= 1
    assert stats["emitted_tokens"] == len(reply["token_ids"]) - 1
    assert reply["token_ids"] == json.loads(plain.stdout)["token_ids"] or reply["finish_reason"] == "length"
    chained = subprocess.run(spillover(*args, "--draft-model", str(tiny_draft_q), "--draft-shape", "chain"),
                             capture_output=True, text=True, env=spillover_env(tmp_path), timeout=180)  # fmt: skip
    assert chained.returncode == 0, chained.stderr
    assert json.loads(chained.stdout)["stats"]["speculation"]["drafter"] == "draft-chain"
    ngram = subprocess.run(spillover(*args, "--speculate", "ngram"),
                           capture_output=True, text=True, env=spillover_env(tmp_path), timeout=180)  # fmt: skip
    assert ngram.returncode == 0, ngram.stderr
    assert json.loads(ngram.stdout)["stats"]["speculation"]["drafter"] == "ngram"
    both = subprocess.run(spillover(*args, "--speculate", "ngram", "--draft-model", str(tiny_draft_q)),
                          capture_output=True, text=True, env=spillover_env(tmp_path), timeout=60)  # fmt: skip
    assert both.returncode != 0 and "choose one" in both.stderr and "Traceback" not in both.stderr


def test_sampled_replies_with_a_draft_tree_have_the_targets_distribution(tiny_q, tiny_draft_q):
    """Many seeds, the first three tokens of a reply (top-2 sampling: 8 possible replies) drawn with a draft tree
    (the second and third come from a verification pass), against the target's own probabilities."""
    from test_speculate import chi_square_p_value

    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=3)
    # float32 throughout: the top-2 sets must be the same ones, which bf16 rounding can swap
    drafter = draft_of(tiny_draft_q, dtype=torch.float32, top_k=2, expand_per_round=2, rounds=2)
    engine = make_engine(tiny_q, drafter=drafter, draft_tokens=6, dtype=torch.float32)
    engine.eos_token_ids = frozenset()
    prompt = random_prompt(6)
    counts: dict[tuple[int, ...], int] = {}
    samples = 160
    for seed in range(samples):
        reply = engine.generate(prompt, SamplingParams(**{**params.__dict__, "seed": seed})).token_ids
        counts[reply] = counts.get(reply, 0) + 1

    # the target's own distribution, from one plain causal pass of a float32 engine over the reply so far
    plain = make_engine(tiny_q, dtype=torch.float32)

    def top2(ids: list[int]) -> dict[int, float]:
        with torch.inference_mode():
            causal = torch.ones(len(ids), plain.max_context, dtype=torch.bool).tril()
            logits = plain.forward_rows(ids, torch.arange(len(ids)), causal)[-1].float()
        plain.reset()
        values, tokens = logits.topk(2)
        return dict(zip(tokens.tolist(), torch.softmax(values, dim=-1).tolist()))

    expected: dict[tuple[int, ...], float] = {}
    for a, pa in top2(prompt).items():
        for b, pb in top2(prompt + [a]).items():
            for c, pc in top2(prompt + [a, b]).items():
                expected[(a, b, c)] = pa * pb * pc
    assert set(counts) <= set(expected)
    # cells expected fewer than 5 times are pooled into one (the chi-square approximation needs that)
    rare = [cell for cell in expected if expected[cell] * samples < 5]
    cells = [[cell] for cell in expected if cell not in rare] + ([rare] if rare else [])
    observed = torch.tensor([sum(counts.get(c, 0) for c in group) for group in cells], dtype=torch.float64)
    probs = torch.tensor([sum(expected[c] for c in group) for group in cells], dtype=torch.float64)
    assert len(cells) >= 3 and chi_square_p_value(observed, probs) > 1e-3
