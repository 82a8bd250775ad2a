"""The generation engine: one model, one static KV cache, one conversation at a time (batch size 1).

``Engine`` is what the CLI and any server drive. It promises:

* ``Engine(checkpoint, weights, device=..., max_context=N)`` builds the model (``compute.model.build_model``),
  loads the tokenizer from the model directory (``engine.tokenizer``, a transformers tokenizer; the engine
  itself only ever sees token ids), and allocates a static KV cache for exactly ``max_context`` tokens:
  ``quantizer.model_spec.kv_cache_nbytes(config, max_context)`` bytes, the number the loader's planner counts.
* ``generate(prompt_ids, params, on_token=None, should_stop=None) -> GenerationResult``: prefill in chunks of
  ``prefill_chunk`` tokens (logits only for the last position), then decode one token per forward until an EOS
  id (``engine.eos_token_ids``: generation_config.json and config.json together), ``params.max_new_tokens``,
  a full KV cache (``max_context``), or ``should_stop()``. ``on_token(token_id)`` is called for every token as
  it is chosen, the EOS that ends a reply included. ``should_stop`` is polled between forward passes (between
  prefill chunks and between tokens), never during one: a forward interrupted half-way would leave units
  acquired and the loader's ring out of step. So Ctrl-C handling belongs in a signal handler that sets a
  flag ``should_stop`` reads, not in an exception. If an exception does stop a forward half-way (a second
  Ctrl-C), ``generate`` walks the rest of that pass's units before re-raising, so the engine stays usable.
* Decode runs one token per forward through ``compute.decoder.Decoder`` on fixed input buffers. On CUDA, with
  ``cuda_graphs=True`` (the default), the first decode step under a plan captures the decode step as CUDA graphs:
  ONE graph when every unit is resident (one launch per token instead of a thousand); when some units stream, one
  graph per run of resident layers, the streamed layers running eagerly in between (their weights arrive through
  the loader's ring, behind host-side waits a graph cannot make). A new plan (a policy switch) drops the graphs and
  decides again; a plan that streams every unit, or a capture that fails (logged with its reason), decodes
  eagerly. ``decode_mode`` says which in one line: "graph", "piecewise (N graphs, M eager units)", "eager: why".
* With a ``drafter`` (``compute.speculation``), decode is speculative: each pass checks a drafted tree of tokens
  (at most ``draft_tokens`` nodes; without it, as many as ``compute.speculate.sizing`` finds worth the measured
  cost of a pass, up to ``compute.speculation.DEFAULT_MAX_DRAFT_TOKENS``) and emits the accepted ones plus one. The target still
  chooses every token (the argmax when greedy, a draw from its own distribution otherwise, one draw per token as
  without a drafter), so replies are the same up to the arithmetic's rounding in a pass over several rows.
  ``GenerationResult.speculation`` reports what it did. A drafter that proposes nothing costs a one-token pass;
  where drafting costs more per token than one-token passes, the engine stops drafting for a while
  (``compute.speculation.SpeculationGovernor``): the first decode step of an engine is a one-token step.
* Two primitives serve speculation and the draft model: ``forward_rows(ids, positions, mask)``, one forward over
  arbitrary rows (any positions, a boolean mask over the whole cache; keys/values appended after what the cache
  holds; every row's logits), and ``keep_rows(prefix, rows)``, which moves the kept rows' keys/values into place
  and cuts the cache there. Up to ``step_rows`` rows (16 where the fused decode layers run and nothing streams,
  else 1),
  ``step_rows_forward(ids, positions, ancestors)`` does what ``forward_rows`` does through the decode step's
  kernels, a row's mask given by the rows it attends (bits), replayed from CUDA graphs where decode is: the pass a
  speculative step takes when everything is resident costs a few one-token steps, not an eager forward.
* ``prompt_ids`` is the whole conversation so far. The KV cache is kept between calls, and the longest prefix
  the new prompt shares with what the cache holds is not computed again (a multi-turn chat prefills only the
  new turn). ``reset()`` empties the cache; it is never required for correctness.
* ``logits_of(ids, chunk)`` runs ``ids`` from an empty cache and yields the logits of every position, ``chunk``
  positions at a time (what a perplexity needs); the cache then holds ``ids``.
* A prompt longer than ``max_context`` raises ``ContextLengthError`` before anything runs; ids outside the
  model's vocabulary raise ``ValueError``. Any exception from ``generate`` empties the KV cache; one from the
  loader (``protocol.client.LoaderGone`` …) means the engine cannot go on.

The engine knows nothing about chat templates, text decoding, terminals or processes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoTokenizer, PretrainedConfig, StaticCache

from compute.decode_step import DecodeStep, keyword_of
from compute.decoder import Decoder
from compute.model import HostEmbedding, UnitWeights, build_model
from compute.sampling import SamplingParams, sample_next
from compute.segments import streamed_units
from compute.speculate.sizing import PassCost
from compute.speculation import Drafter, SpeculationGovernor, SpeculationStats, speculative_step
from protocol.defaults import DEFAULT_PREFILL_CHUNK
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.model_spec import head_dim, kv_cache_nbytes

log = logging.getLogger(__name__)

# SDPA backends prefill may use: all but cuDNN. torch 2.11 tries cuDNN first for a masked SDPA on Hopper, and cuDNN
# builds an execution plan, costing most of a second of CPU, for every shape it has not seen. Prefill chunk lengths
# change with every prompt, so each new length would pay that again.
PREFILL_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ContextLengthError(ValueError):
    """The prompt does not fit in the KV cache (``max_context`` tokens)."""


class FinishReason(str, enum.Enum):
    EOS = "eos"  # the model produced one of the EOS ids (it is the reply's last token)
    LENGTH = "length"  # params.max_new_tokens tokens were produced
    CONTEXT = "context"  # the KV cache is full: prompt plus reply reached max_context
    STOPPED = "stopped"  # should_stop() returned True


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    token_ids: tuple[int, ...]  # the reply, in order; ends with the EOS id when finish_reason is EOS
    finish_reason: FinishReason
    prompt_tokens: int  # len(prompt_ids)
    prefill_tokens: int  # prompt tokens run through the model (fewer than prompt_tokens when the cache held a prefix)
    prefill_passes: int  # forward passes the prefill took: ceil(prefill_tokens / prefill_chunk)
    prefill_seconds: float  # from the first prefill forward to the first reply token chosen
    decode_tokens: int  # tokens produced by decode forward passes (the first reply token comes from prefill)
    decode_seconds: float  # time spent in those forward passes, their sampling and any drafting
    decode_passes: int  # decode forward passes of the model (= decode_tokens without speculation)
    speculation: SpeculationStats | None = None  # what speculative decode did; None without a drafter

    @property
    def forward_passes(self) -> int:
        """Forward passes of the whole reply: each one reads every weight once (streamed units cross the bus)."""
        return self.prefill_passes + self.decode_passes

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def eos_token_ids(checkpoint: QuantizedCheckpoint) -> frozenset[int]:
    """Every id that ends a reply: ``eos_token_id`` of generation_config.json and of config.json (int or list)."""
    sources = [checkpoint.config]
    generation_config = checkpoint.path / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()))
    ids: set[int] = set()
    for source in sources:
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def reply_end_ids(checkpoint: QuantizedCheckpoint, tokenizer) -> frozenset[int]:
    """The ids an engine ends replies at: ``eos_token_ids(checkpoint)``, else the tokenizer's EOS; a warning when
    neither names one (replies then end only at max_new_tokens or a full context)."""
    ids = eos_token_ids(checkpoint)
    if not ids and tokenizer.eos_token_id is not None:
        ids = frozenset({tokenizer.eos_token_id})
    if not ids:
        log.warning("%s names no EOS token: replies end only at max_new_tokens or a full context", checkpoint.path)
    return ids


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` in recent transformers 5.x,
    ``past_key_values`` in earlier ones (5.17, on the GPU machine, knows only that)."""
    return keyword_of(model, "cache") or "past_key_values"


class Engine:
    """Model, tokenizer and KV cache for one conversation; see the module docstring for the contract."""

    def __init__(
        self,
        checkpoint: QuantizedCheckpoint,
        weights: UnitWeights,
        *,
        device: torch.device | str,
        max_context: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        host_embedding: bool | None = None,
        drafter: Drafter | None = None,
        draft_tokens: int | None = None,
    ):
        if max_context < 1:
            raise ValueError(f"max_context must be at least 1 token, got {max_context}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        if draft_tokens is not None and draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1 token, got {draft_tokens}")
        self.device = torch.device(device)
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.cuda_graphs = cuda_graphs  # capture the decode step (its resident segments) as CUDA graphs on CUDA
        self.weights = weights
        self.drafter = drafter
        self.draft_tokens = draft_tokens  # nodes per drafted tree; None = sized from the measured pass cost
        self._pass_cost = PassCost()  # decode passes' seconds against their rows, for sizing draft trees
        self.governor = SpeculationGovernor()  # whether drafting pays, from the passes' own timings
        self.model = build_model(checkpoint, weights, self.device, dtype, host_embedding=host_embedding)
        self.config: PretrainedConfig = self.model.config
        self.vocab_size: int = self.config.vocab_size
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        self.eos_token_ids = reply_end_ids(checkpoint, self.tokenizer)  # a frozenset; a caller may replace it
        if max_context > self.config.max_position_embeddings:
            log.warning(
                "max_context %d exceeds the model's max_position_embeddings %d: output past that length may degrade",
                max_context,
                self.config.max_position_embeddings,
            )
        self.kv_cache_bytes = kv_cache_nbytes(self.config, max_context, dtype.itemsize)
        self.cache = StaticCache(config=self.config, max_cache_len=max_context)
        # Allocate now, not at the first forward: the budget is counted up front, and the addresses stay fixed
        # for the engine's lifetime (what a captured decode graph needs).
        self.cache.early_initialization(
            batch_size=1,
            num_heads=self.config.num_key_value_heads,
            head_dim=head_dim(self.config),
            dtype=dtype,
            device=self.device,
        )
        if not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in self.cache.layers):
            raise RuntimeError(
                f"transformers {transformers.__version__}: its StaticCache layers keep no cumulative_length, "
                "which the engine moves to reuse a conversation's cache; install the version pyproject.toml names"
            )
        self._cache_keyword = cache_keyword(self.model)
        # Prompt ids go where the embedding looks them up: to the host for a HostEmbedding (no device round trip).
        host_embedding = isinstance(self.model.get_input_embeddings(), HostEmbedding)
        self._ids_device = torch.device("cpu") if host_embedding else self.device
        # The decode step over static buffers (one token at one position, rewritten in place every step).
        step = DecodeStep(self.model, self.cache, self.device, max_context)
        # steps of several rows too: a speculative pass of up to 16 rows runs the decode step's kernels
        # (Decoder.rows), each bucket's step made (and captured) at its first use
        def make_step(rows: int) -> DecodeStep:
            return DecodeStep(self.model, self.cache, self.device, max_context, rows=rows)

        self._decoder = Decoder(step, self.model.unit_binder, weights, self.device, make_step=make_step)
        self._cached_ids: list[int] = []  # the ids whose keys/values the cache holds, in position order
        log.info("KV cache: %d tokens, %.1f MiB", max_context, self.kv_cache_bytes / 2**20)

    @property
    def decode_mode(self) -> str:
        """How decode runs, in one line: "graph" (the whole step one CUDA graph), "piecewise (N graphs, M eager
        units)" (resident segments replayed, streamed units eager), or "eager: <reason>"; "undecided …" before the
        first decode step under the plan in force."""
        return self._decoder.mode

    def reset(self) -> None:
        """Forget the conversation: the next ``generate`` prefills its whole prompt."""
        self._rewind_cache(0)
        self._cached_ids = []
        if self.drafter is not None:
            self.drafter.reset()

    def _rewind_cache(self, length: int) -> None:
        """Make the cache hold its first ``length`` positions: the next write goes to position ``length``.

        A static cache layer writes at its cumulative_length, and the causal mask hides every position past the one
        being computed: moving the counter back is the whole rewind, and stale keys/values beyond it are never
        read. It is moved in place, never replaced (``Cache.reset`` in some 5.x releases rebinds it to an int),
        because a captured decode graph reads and advances that very tensor. (``Cache.crop`` would do the same in
        recent transformers, but 5.17's static layers have no crop.)
        """
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Reply to ``prompt_ids`` (the whole conversation so far); see the module docstring for the contract."""
        prompt = self._check_prompt(prompt_ids)
        try:
            return self._generate(prompt, params, on_token, should_stop)
        except BaseException:
            # What the cache holds is unknown after a failure: start from scratch next time.
            self._cached_ids = []
            self._rewind_cache(0)
            self._abandon_forward()
            if self.drafter is not None:
                self.drafter.reset()
            raise

    @torch.inference_mode()
    def logits_of(self, ids: Sequence[int], chunk: int) -> Iterator[torch.Tensor]:
        """The logits of every position of ``ids`` run from an empty cache: float32 ``[rows, vocab]`` pieces of at
        most ``chunk`` rows, in order. A smaller ``chunk`` than the prefill's bounds the logits' memory."""
        ids = self._check_prompt(ids)
        self.reset()
        try:
            for begin in range(0, len(ids), chunk):
                piece = torch.tensor([ids[begin : begin + chunk]], dtype=torch.long, device=self._ids_device)  # (B, T)
                positions = torch.arange(begin, begin + piece.shape[1], device=self.device).unsqueeze(0)  # (B, T)
                with sdpa_kernel(PREFILL_ATTENTION_BACKENDS):
                    out = self.model(
                        input_ids=piece, position_ids=positions, use_cache=True, **{self._cache_keyword: self.cache}
                    )
                self._cached_ids.extend(ids[begin : begin + chunk])
                yield out.logits[0].float()  # (T, vocab)
        except BaseException:
            self.reset()
            self._abandon_forward()
            raise

    def _abandon_forward(self) -> None:
        """After a forward interrupted half-way, walk the rest of its units so the loader's ring stays in step."""
        binder = self.model.unit_binder
        if not binder.in_pass:
            return
        try:
            binder.abandon_pass()
        except Exception as e:  # the loader is gone, most likely: the original error says more
            log.warning("could not finish the interrupted forward pass with the loader: %s", e)

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) > self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but max_context is {self.max_context}: "
                "raise --max-context (the KV cache grows with it) or shorten the prompt or conversation"
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {self.vocab_size})")
        return prompt

    def _generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_token: Callable[[int], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> GenerationResult:
        stop_requested = should_stop or (lambda: False)
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        # Every id seen so far, for the repetition penalty; preallocated so a step writes one element.
        history = torch.empty(len(prompt) + params.max_new_tokens, dtype=torch.long, device=self.device)
        history[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)

        start = time.perf_counter()
        reused = self._reuse_prefix(prompt)
        for begin in range(reused, len(prompt), self.prefill_chunk):
            if begin > reused and stop_requested():
                return self._stopped_in_prefill(prompt, begin, reused, time.perf_counter() - start)
            logits = self._prefill_chunk(prompt[begin : begin + self.prefill_chunk], begin)
            self._cached_ids.extend(prompt[begin : begin + self.prefill_chunk])
        token = sample_next(logits, params, generator, history[: len(prompt)])
        prefill_seconds = time.perf_counter() - start

        reply: list[int] = []
        chosen = [token]  # tokens chosen by the last pass, not yet in the reply
        decode_seconds = 0.0
        decode_passes = 0
        stats = SpeculationStats(drafter=self.drafter.name) if self.drafter is not None else None
        while True:
            for token in chosen:
                reply.append(token)
                history[len(prompt) + len(reply) - 1] = token
                if on_token is not None:
                    on_token(token)
                finish = self._finish_reason(token, len(prompt) + len(reply) - 1, len(reply), params, stop_requested)
                if finish is not None:
                    break
            if finish is not None:
                break
            step_start = time.perf_counter()
            seen = history[: len(prompt) + len(reply)]
            if stats is None:
                logits = self._decode_step(token, len(self._cached_ids))
                self._cached_ids.append(token)
                chosen = [sample_next(logits, params, generator, seen)]
            else:
                room = params.max_new_tokens - len(reply)  # tokens the reply may still take
                chosen = speculative_step(self, token, params, generator, seen, room, stats)
            decode_passes += 1
            decode_seconds += time.perf_counter() - step_start
        # A speculative pass may have cached tokens past the one that ended the reply; the cache must hold exactly the
        # conversation before the reply's last token (which is never fed), as after one-token passes.
        if len(self._cached_ids) > len(prompt) + len(reply) - 1:
            del self._cached_ids[len(prompt) + len(reply) - 1 :]
            self._rewind_cache(len(self._cached_ids))
        return GenerationResult(
            token_ids=tuple(reply),
            finish_reason=finish,
            prompt_tokens=len(prompt),
            prefill_tokens=len(prompt) - reused,
            prefill_passes=math.ceil((len(prompt) - reused) / self.prefill_chunk),
            prefill_seconds=prefill_seconds,
            decode_tokens=len(reply) - 1,
            decode_seconds=decode_seconds,
            decode_passes=decode_passes,
            speculation=stats,
        )

    def _finish_reason(
        self, token: int, position: int, produced: int, params: SamplingParams, stop_requested: Callable[[], bool]
    ) -> FinishReason | None:
        """Why the reply ends after ``token`` (its ``produced``-th token, to be fed at ``position``), or None."""
        if token in self.eos_token_ids:
            return FinishReason.EOS
        if produced >= params.max_new_tokens:
            return FinishReason.LENGTH
        if position >= self.max_context:  # no position left for feeding ``token`` back
            return FinishReason.CONTEXT
        if stop_requested():
            return FinishReason.STOPPED
        return None

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the cached keys/values the prompt starts with; return how many prompt tokens need no prefill."""
        shared = 0
        for cached, new in zip(self._cached_ids, prompt):
            if cached != new:
                break
            shared += 1
        # At least the prompt's last token must run: its logits choose the first reply token.
        keep = min(shared, len(prompt) - 1)
        if keep < len(self._cached_ids):
            self._rewind_cache(keep)
            del self._cached_ids[keep:]
        if keep:
            log.debug("reusing %d cached tokens of a %d-token prompt", keep, len(prompt))
        return keep

    def _stopped_in_prefill(self, prompt: list[int], done: int, reused: int, seconds: float) -> GenerationResult:
        return GenerationResult(
            token_ids=(),
            finish_reason=FinishReason.STOPPED,
            prompt_tokens=len(prompt),
            prefill_tokens=done - reused,
            prefill_passes=math.ceil((done - reused) / self.prefill_chunk),
            prefill_seconds=seconds,
            decode_tokens=0,
            decode_seconds=0.0,
            decode_passes=0,
        )

    def _prefill_chunk(self, chunk: list[int], position: int) -> torch.Tensor:
        """Run ``chunk`` at positions ``position …``; return the logits of its last token ([vocab])."""
        ids = torch.tensor([chunk], dtype=torch.long, device=self._ids_device)  # (B, T)
        positions = torch.arange(position, position + len(chunk), device=self.device).unsqueeze(0)  # (B, T)
        with sdpa_kernel(PREFILL_ATTENTION_BACKENDS):
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_keyword: self.cache},
            )
        return out.logits[0, -1]

    def _decode_step(self, token: int, position: int) -> torch.Tensor:
        """One token at ``position`` through the model, its keys/values into the cache; its logits ([vocab]).

        ``compute.decoder.Decoder`` runs it: replayed from CUDA graphs where the plan in force allows, eagerly
        otherwise. The logits of a replay live in the graph's memory: they are valid until the next step.
        """
        return self._decoder(token, position, cuda_graphs=self.cuda_graphs)

    @property
    def step_rows(self) -> int:
        """How many rows ``step_rows_forward`` takes at most (1: none beyond the decode step's one). Only while the
        plan streams nothing: when layers stream, a pass costs the bus's time whatever runs it, and a step per row
        bucket would only add graphs (and their memory, which the plan does not count) to a tight budget."""
        return 1 if self.streams else self._decoder.max_rows

    @property
    def streams(self) -> bool:
        """Whether the plan in force streams any unit (a pass then costs the bus's time, whatever its rows)."""
        return bool(streamed_units(self.weights.plan))

    def step_rows_forward(self, ids: list[int], positions: list[int], ancestors: list[int]) -> torch.Tensor:
        """``forward_rows`` for at most ``step_rows`` rows, through the decode step's fused kernels (replayed from
        CUDA graphs where the decode step is): row t attends the cache and the rows whose bits are set in
        ``ancestors[t]``. Every row's logits (T, vocab), valid until the next pass; the cache's length afterwards
        is for ``_rewind_cache`` (``keep_rows``) to set."""
        prefix = len(self._cached_ids)
        return self._decoder.rows(ids, positions, prefix, ancestors, cuda_graphs=self.cuda_graphs)

    def forward_rows(self, ids: list[int], positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One forward over the rows ``ids`` at ``positions`` ((T,) int64), each attending where ``mask`` ((T,
        max_context) bool) is True; their keys/values are written after what the cache holds, in row order, and
        the cache's length grows by T (``_rewind_cache`` takes them back). Every row's logits, (T, vocab)."""
        ids = torch.tensor([ids], dtype=torch.long, device=self._ids_device)  # (B, T)
        positions = positions.to(self.device).unsqueeze(0)  # (B, T)
        mask = mask.to(self.device)[None, None]  # (B, 1, T, KV)
        with sdpa_kernel(PREFILL_ATTENTION_BACKENDS):
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=0,
                **{self._cache_keyword: self.cache},
            )
        return out.logits[0]

    def keep_rows(self, prefix: int, rows: list[int]) -> None:
        """After a verification pass: move the keys/values of ``rows`` (increasing; row r sits at ``prefix + r``) to
        positions ``prefix …`` in order, and make the cache end there (the other rows' are dropped)."""
        if rows != list(range(len(rows))):
            source = torch.tensor([prefix + r for r in rows], device=self.device)
            target = torch.arange(prefix, prefix + len(rows), device=self.device)
            for layer in self.cache.layers:
                layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, target, layer.values.index_select(2, source))
        self._rewind_cache(prefix + len(rows))
