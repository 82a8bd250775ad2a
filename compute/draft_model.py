"""A draft model for speculative decoding: a smaller model with the target's tokenizer, held resident by compute.

The draft's INT4 weights never go through the loader: compute reads them once into device memory and keeps them
there, and the loader's planner reserves their bytes (``loader.planner.draft_lines``, shown in the plan's table;
``Plan.draft_model`` names the directory it counted, which compute checks). This module promises:

* ``ResidentWeights(checkpoint, device)``: every unit in one device buffer, its Linears' ``qweight``s back to back
  in manifest order, then their ``scales`` (the order the loader lays a unit out, so the decode step's fused GEMVs
  see q/k/v and gate/up as one matrix); ``acquire`` returns fixed views, ``release`` does nothing, ``plan`` is None
  (``compute.model.UnitWeights``). With ``cpu_kernel_form`` (on CPU, where the loader's planner counts that form:
  ``loader.layout.pool_layouts``) every Linear that has one is held in the CPU INT4 kernel's form instead
  (``protocol.cpu_kernel_form``), so a draft forward dequantizes nothing.
* ``check_same_tokenizer(target, draft, label)``: ``DraftModelError`` (one line) unless both tokenizers map every
  token, special ones included, to the same id.
* Two ``compute.speculation.Drafter``s over an ``Engine`` of the draft (``ModelDrafter``, their common part: both
  bring the draft's KV cache to the ``context`` of ``propose(context, max_tokens)`` first, reusing the prefix it
  holds as ``Engine.generate`` does, and limit node ids to the target's vocabulary):

  - ``DraftModel`` (shape "tree") grows a SpecExec tree (``compute.speculate.tree.grow_tree``): the draft's
    ``top_k`` most likely tokens after the root, then ``rounds`` rounds each expanding up to ``expand_per_round``
    of the best candidates in ONE draft forward (``Engine.forward_rows`` under a tree mask: a row sees the context,
    its ancestors' cached rows and itself). The tree's keys/values are dropped afterwards: the next call feeds the
    accepted tokens again (a few rows, in the pass that also yields the new root's distribution). Few, wide draft
    forwards: what pays where a forward costs little more for 16 rows than for one (a CPU, eager launches).
  - ``DraftChain`` (shape "chain") drafts the draft's greedy continuation, one token per ``Engine._decode_step``
    (a CUDA graph replay where the draft engine captures its decode step, eager elsewhere), up to ``max_tokens``
    tokens, each node carrying the chain's cumulative log-probability under the draft. It stops there, or before a
    node less probable than the ``min_probability`` the engine asks for (what a node must bring to pay for its
    draft step and its row: ``SpeculationGovernor.chain_floor``); the engine's sizing (``compute.speculate.sizing``)
    then keeps the prefix worth checking. The chain's keys/values stay in the
    draft's cache, recorded as cached ids: the next context is the accepted part of the chain plus the target's
    token, so the next call keeps that prefix (``Engine._reuse_prefix`` moves the cache layers' lengths back in
    place, the very tensors a captured step reads; the step's position buffer is written before every step) and
    feeds one or two tokens, by decode steps too. Many one-token forwards: what pays where a forward's cost is its
    launches and a graph removes them.

* ``open_drafter(checkpoint, shape=..., device=..., ...)`` builds the draft engine (resident weights; CUDA graphs
  for its decode steps where the device has them) and the drafter of that shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from compute.engine import Engine
from compute.speculate.tree import DraftTree, chain, grow_tree
from compute.speculation import DEFAULT_CHAIN_TOKENS, DRAFT_SHAPES
from protocol.cpu_kernel_form import has_kernel_form, pack_for_cpu_kernel
from protocol.defaults import DEFAULT_PREFILL_CHUNK
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import QWEIGHT_SUFFIX, SCALES_SUFFIX

log = logging.getLogger(__name__)

UNIT_ALIGN = 256  # bytes: a unit's scales start at this boundary, as in the loader's layout
DEFAULT_TOP_K = 4  # children the draft proposes per expanded node
DEFAULT_EXPAND_PER_ROUND = 16  # nodes expanded together in one draft forward
DEFAULT_ROUNDS = 12  # draft forwards per tree, after the one that yields the root's distribution
DEFAULT_MAX_DEPTH = 24  # nodes deep at most
# New context tokens a chain feeds by decode steps (more go through prefill chunks): the one or two a pass leaves
FOLLOW_BY_STEPS = 2


class DraftModelError(ValueError):
    """The draft model cannot serve this target; the message says why in one line."""


def _cpu_kernel_form(views: dict[str, torch.Tensor], linears: Sequence[str]) -> dict[str, torch.Tensor]:
    """The Linears of ``linears`` that have a CPU kernel form, packed into it (``protocol.cpu_kernel_form``): what
    ``Int4Linear`` multiplies with the CPU INT4 kernel instead of dequantizing its weight at every forward."""
    packed: dict[str, torch.Tensor] = {}
    for linear in linears:
        qweight = views[linear + QWEIGHT_SUFFIX]
        if has_kernel_form(qweight.shape[0], 2 * qweight.shape[1]):
            form = pack_for_cpu_kernel(qweight, views[linear + SCALES_SUFFIX])
            packed[linear + QWEIGHT_SUFFIX], packed[linear + SCALES_SUFFIX] = form
    return packed


class ResidentWeights:
    """Every unit of ``checkpoint`` resident on ``device``, laid out as the loader lays out a unit."""

    plan = None  # no loader: nothing streams

    def __init__(self, checkpoint: QuantizedCheckpoint, device: torch.device | str, *, cpu_kernel_form: bool = False):
        self.units: dict[str, dict[str, torch.Tensor]] = {}
        self.nbytes = 0
        for unit in checkpoint.manifest.units:
            names = [linear + QWEIGHT_SUFFIX for linear in unit.linears] + [linear + SCALES_SUFFIX for linear in unit.linears]
            tensors = [checkpoint.tensor(name) for name in names]
            offsets, offset = [], 0
            for index, tensor in enumerate(tensors):
                if index == len(unit.linears):  # the first scales
                    offset = -(-offset // UNIT_ALIGN) * UNIT_ALIGN
                offsets.append(offset)
                offset += tensor.numel() * tensor.element_size()
            buffer = torch.empty(offset, dtype=torch.uint8, device=device)
            views = {}
            for name, tensor, start in zip(names, tensors, offsets):
                raw = buffer[start : start + tensor.numel() * tensor.element_size()]
                view = raw.view(tensor.dtype).view(tensor.shape)
                view.copy_(tensor)
                views[name] = view
            if cpu_kernel_form:  # the CPU INT4 kernel's form, as a loader's CPU pool holds its units
                packed = _cpu_kernel_form(views, unit.linears)
                # the rest copied out of the unit's buffer, so that the file form is freed
                views = {name: packed[name] if name in packed else view.clone() for name, view in views.items()}
            self.units[unit.name] = views
            self.nbytes += sum(t.numel() * t.element_size() for t in views.values())

    def acquire(self, unit: str, stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        return self.units[unit]

    def release(self, unit: str, stream: torch.cuda.Stream | None = None) -> None:
        """Resident: nothing to give back."""


def check_same_tokenizer(target, draft, label: str) -> None:
    """Refuse a draft whose tokenizer maps any token to another id than the target's does."""
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab == draft_vocab:
        return
    differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])
    example = differing[0] if differing else ("?", -1)
    raise DraftModelError(
        f"--draft-model {label}: its tokenizer differs from the model's ({len(draft_vocab)} vs {len(target_vocab)} "
        f"tokens; e.g. {example[0]!r} -> {example[1]} in only one of them): a draft must share the target's tokenizer"
    )


class ModelDrafter:
    """What both shapes of draft share: the draft's engine, the target's vocabulary, following the conversation."""

    name = "draft-model"

    def __init__(self, engine: Engine, *, vocab_size: int):
        self.engine = engine
        self.vocab_size = min(vocab_size, engine.vocab_size)  # ids the target knows

    def reset(self) -> None:
        self.engine.reset()

    def accepted(self, drafted: int, accepted: int) -> None:
        """The draft's probabilities already carry what it expects; nothing to learn here."""

    def _follow(self, context: list[int], *, by_steps: int = 0) -> torch.Tensor:
        """Bring the draft's cache to hold ``context``; the logits after its last token ([vocab], valid until the
        draft's next forward). Up to ``by_steps`` new tokens run as decode steps, more in prefill chunks."""
        engine = self.engine
        keep = engine._reuse_prefix(context)  # at least the last token runs
        if len(context) - keep <= by_steps:
            for position in range(keep, len(context)):
                logits = engine._decode_step(context[position], position)
                engine._cached_ids.append(context[position])
            return logits
        for begin in range(keep, len(context), engine.prefill_chunk):
            logits = engine._prefill_chunk(context[begin : begin + engine.prefill_chunk], begin)
            engine._cached_ids.extend(context[begin : begin + engine.prefill_chunk])
        return logits

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the ids the target knows, float32, of ``logits`` ([..., vocab])."""
        return torch.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)


class DraftModel(ModelDrafter):
    """Drafts SpecExec trees with a smaller model; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        *,
        vocab_size: int,
        top_k: int = DEFAULT_TOP_K,
        expand_per_round: int = DEFAULT_EXPAND_PER_ROUND,
        rounds: int = DEFAULT_ROUNDS,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ):
        super().__init__(engine, vocab_size=vocab_size)
        self.top_k = top_k
        self.expand_per_round = expand_per_round
        self.rounds = rounds
        self.max_depth = max_depth

    @torch.inference_mode()
    def propose(self, context: Sequence[int], max_tokens: int, min_probability: float = 0.0) -> DraftTree:
        """A SpecExec tree of at most ``max_tokens`` nodes (its cost grows by forwards, not by nodes: it does not
        stop at ``min_probability``; the engine's sizing cuts what is not worth checking)."""
        context = [int(t) for t in context]
        if max_tokens < 1:
            return DraftTree((), (), ())
        root = self._follow(context)
        base = len(context)
        root_ids, root_log_probs = self._top_k(root[None])[0]
        slots: dict[int, int] = {}  # node -> where its keys/values went in the draft's cache

        def expand(tree: DraftTree, nodes: Sequence[int]):
            depths = tree.depths()
            start = base + len(slots)
            mask = torch.zeros(len(nodes), self.engine.max_context, dtype=torch.bool)
            mask[:, :base] = True
            for row, node in enumerate(nodes):
                for ancestor in tree.path_to(node)[:-1]:
                    mask[row, slots[ancestor]] = True
                mask[row, start + row] = True
            for row, node in enumerate(nodes):
                slots[node] = start + row
            positions = torch.tensor([base + depths[node] for node in nodes], dtype=torch.long)
            logits = self.engine.forward_rows([tree.tokens[node] for node in nodes], positions, mask)
            return self._top_k(logits)

        # every expanded node takes a cache position: stay inside the cache
        rounds = min(self.rounds, (self.engine.max_context - base) // self.expand_per_round)
        try:
            return grow_tree(
                root_ids,
                root_log_probs,
                expand,
                budget=max_tokens,
                max_depth=self.max_depth,
                rounds=rounds,
                expand_per_round=self.expand_per_round,
            )
        finally:
            self.engine._rewind_cache(base)  # the tree's keys/values are not the conversation's

    def _top_k(self, logits: torch.Tensor) -> list[tuple[list[int], list[float]]]:
        """Per row of ``logits`` (rows, vocab): the ``top_k`` ids the target knows and their log-probabilities."""
        values, ids = self._log_probs(logits).topk(self.top_k, dim=-1)
        return [(i.tolist(), v.tolist()) for i, v in zip(ids.cpu(), values.cpu())]


class DraftChain(ModelDrafter):
    """Drafts the draft model's greedy continuation, one decode step a token; see the module docstring."""

    name = "draft-chain"

    def __init__(self, engine: Engine, *, vocab_size: int, max_tokens: int = DEFAULT_CHAIN_TOKENS):
        if max_tokens < 1:
            raise ValueError(f"a chain needs max_tokens >= 1, got {max_tokens}")
        super().__init__(engine, vocab_size=vocab_size)
        self.max_tokens = max_tokens

    @torch.inference_mode()
    def propose(self, context: Sequence[int], max_tokens: int, min_probability: float = 0.0) -> DraftTree:
        """The draft's greedy chain after ``context``: at most ``max_tokens`` (and ``self.max_tokens``) nodes, node
        i under node i - 1, its log-probability the chain's down to it, stopping before a node whose probability is
        below ``min_probability``. The cache then holds ``context`` and every node but the last (every node, when
        the chain stopped at ``min_probability``): ``engine._cached_ids`` says which."""
        context = [int(t) for t in context]
        engine = self.engine
        # node i is fed at position len(context) + i - 1; the last node is never fed
        length = min(max_tokens, self.max_tokens, engine.max_context + 1 - len(context))
        if length < 1:
            return chain([])
        logits = self._follow(context, by_steps=FOLLOW_BY_STEPS)
        tokens: list[int] = []
        log_probs: list[float] = []
        total = 0.0
        floor = math.log(min_probability) if min_probability > 0 else -math.inf
        while True:
            log_prob, token = self._log_probs(logits).max(dim=-1)
            total += float(log_prob)
            if total < floor:
                return chain(tokens, log_probs)
            tokens.append(int(token))
            log_probs.append(total)
            if len(tokens) == length:
                return chain(tokens, log_probs)
            logits = engine._decode_step(tokens[-1], len(engine._cached_ids))
            engine._cached_ids.append(tokens[-1])


def open_drafter(
    checkpoint: QuantizedCheckpoint,
    *,
    shape: str,
    device: torch.device | str,
    max_context: int,
    vocab_size: int,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_tokens: int | None = None,
) -> ModelDrafter:
    """The draft model of ``checkpoint`` resident on ``device`` (on CPU in the CPU kernel's form, as the planner
    counts it), its engine's KV cache for ``max_context`` tokens, drafting in ``shape`` ("tree" or "chain") for a
    target of ``vocab_size`` ids. The engine captures its decode steps as CUDA graphs where the device has them:
    a chain runs on them, a tree never takes a decode step. ``max_tokens`` caps a chain (default
    ``DEFAULT_CHAIN_TOKENS``); a tree is capped by what ``propose`` is asked for."""
    if shape not in DRAFT_SHAPES:
        raise ValueError(f"draft shape {shape!r} is none of {DRAFT_SHAPES}")
    device = torch.device(device)
    weights = ResidentWeights(checkpoint, device, cpu_kernel_form=device.type == "cpu")
    engine = Engine(checkpoint, weights, device=device, max_context=max_context, prefill_chunk=prefill_chunk)
    if shape == "chain":
        return DraftChain(engine, vocab_size=vocab_size, max_tokens=max_tokens or DEFAULT_CHAIN_TOKENS)
    return DraftModel(engine, vocab_size=vocab_size)
