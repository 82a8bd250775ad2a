"""The multi-sequence engine: one forward pass over rows of many sequences, their keys/values in a paged pool.

``BatchEngine(checkpoint, weights, device=..., max_context=N, kv_tokens=M, max_batch=B)`` builds the model as
``compute.engine.Engine`` does (``compute.model.build_model``: INT4 Linears bound unit by unit through
``weights``), with a ``compute.kv_pages.KVPagePool`` of ``kv_tokens`` positions (at least ``max_context``: one
sequence can always reach the full context) instead of one static cache.

``forward(chunks)`` runs one pass. Each ``Chunk`` is consecutive tokens of one sequence at positions
``start .. start + n - 1`` (its pages for them reserved in ``kv_pool`` beforehand): a decode row is a chunk of
one token, a prefill chunk has many. All chunks' tokens are the rows of one pass, so every unit is acquired
once and each weight read once for the whole batch (streamed units cross the bus once per pass, as for one
sequence). The pass writes every chunk's keys/values into its pages, attends each chunk's queries over its own
sequence's positions ``0 .. start + i`` only (causal, nothing of another sequence), and returns the logits of the
last token of each chunk that asks for them, ``[chunks asking, vocab]`` in the model's dtype, in chunk order.

What a row computes does not depend on the other rows: the norms, rotary embedding, activation and attention
are per row or per sequence. Only the INT4 matmuls see every row at once, and the result of a row is the same
function of that row whatever the batch, up to the reduction order a kernel picks for its row count (the CPU's
GEMM; on CUDA the GEMV up to ``GEMV_MAX_ROWS`` rows, dequantize + cuBLAS above). So a request's greedy reply is
the one it gets alone, except where such rounding tips a near-tie between two tokens (the rule the tests state).

Attention: on CUDA the decode rows (chunks of one token) of a pass go through one launch of
``compute.kernels.paged_attention`` per layer; prefill chunks, and everything on CPU, gather their sequence's
keys/values from the pages and run torch's SDPA (HF's arithmetic: bf16, ``repeat_kv``'s head grouping).

A layer on CUDA bf16 (where ``compute.decode.fused_decode_unsupported`` finds nothing against the model) runs in
nine launches for a decode pass of up to 16 rows, where HF's modules take forty, as the one-row decode step
(``compute.decode``) does: q|k|v as one GEMV on the input norm's operand, its split-K partial sums added up (with
the bias) by the rotary kernel, which writes the keys and values into their pages
(``compute.kernels.paged_attention.rotary_pool_write``); the paged attention, writing the o projection's operand
(where a KV head's G * D outputs are whole 128-element groups, ``paged_operand_supported``; else the GEMV makes it,
one launch more); the o projection's partial sums added by the residual add that also applies the post-attention
norm (``compute.kernels.norm.add_partials``); gate|up as one GEMV; the fused SiLU·up writing the down projection's
operand; and its partial sums added by the last residual add, which also applies the next layer's input norm when
that layer runs right after (in one ``run_pass``, or in one segment of ``compute.batch_decode``); the first layer of
a pass or segment norms its own input (one launch more). The arithmetic, rounding for rounding, is the modules'
(the GEMVs' sums aside, which are the kernels' for a stacked weight); a longer pass (prefill) takes the same kernels
where they apply, dequantize-then-cuBLAS for its products; elsewhere (CPU) the layer runs HF's modules.

A pass interrupted by an exception walks the rest of its units (``UnitBinder.abandon_pass``) before re-raising,
so the loader's ring stays in step; the keys/values the pass wrote are then not to be trusted (the caller
drops those sequences). A ``protocol.client.LoaderError`` means the engine cannot go on.

The engine knows nothing about requests, sampling or tokenizing (it loads the tokenizer for its callers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from transformers import AutoTokenizer, PretrainedConfig
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from compute.batch_decode import BatchDecoder
from compute.decode import fused_decode_unsupported, stacked, stacked_bias
from compute.engine import PREFILL_ATTENTION_BACKENDS, reply_end_ids
from compute.kernels import int4_matmul
from compute.kernels.activation import silu_mul
from compute.kernels.embedding import embedding_rows
from compute.kernels.gemv import RowOperand, int4_gemv
from compute.kernels.gemv_mma import MAX_ROWS
from compute.kernels.norm import add_partials, add_partials_workspace, rms_norm
from compute.kernels.paged_attention import (
    paged_attention_supported,
    paged_decode_attention,
    paged_operand_supported,
    rotary_pool_write,
)
from compute.kv_pages import KVPagePool
from compute.model import HostEmbedding, UnitWeights, build_model
from compute.segments import LM_HEAD_UNIT
from protocol.defaults import DEFAULT_PREFILL_CHUNK
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.model_spec import head_dim

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Consecutive tokens of one sequence, fed in one pass."""

    seq: Hashable  # the sequence: its pages in the engine's kv_pool
    token_ids: tuple[int, ...]  # the tokens, at positions start .. start + len - 1
    start: int  # position of the first token (the sequence's earlier positions are in its pages)
    logits: bool  # return the logits of the last token


class BatchEngine:
    """Model, tokenizer and paged KV pool for many sequences; see the module docstring for the contract."""

    def __init__(
        self,
        checkpoint: QuantizedCheckpoint,
        weights: UnitWeights,
        *,
        device: torch.device | str,
        max_context: int,
        kv_tokens: int | None = None,
        max_batch: int = 16,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        dtype: torch.dtype = torch.bfloat16,
        host_embedding: bool | None = None,
        cuda_graphs: bool = True,
        fused: bool | None = None,
    ):
        kv_tokens = max_context if kv_tokens is None else kv_tokens
        if max_context < 1 or max_batch < 1 or prefill_chunk < 1:
            raise ValueError(
                f"max_context ({max_context}), max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) "
                "must be positive"
            )
        if kv_tokens < max_context:
            raise ValueError(f"kv_tokens ({kv_tokens}) must be at least max_context ({max_context})")
        self.device = torch.device(device)
        self.max_context = max_context
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # tokens one pass feeds at most (decode rows and prefill chunks)
        self.weights = weights
        self.model = build_model(checkpoint, weights, self.device, dtype, host_embedding=host_embedding)
        self.config: PretrainedConfig = self.model.config
        self.vocab_size: int = self.config.vocab_size
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        self.eos_token_ids = reply_end_ids(checkpoint, self.tokenizer)  # a frozenset; a caller may replace it
        inner = self.model.model
        self.layers = inner.layers[: self.config.num_hidden_layers]
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.head_dim = head_dim(self.config)
        self.kv_pool = KVPagePool(
            num_layers=len(self.layers),
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            capacity_tokens=kv_tokens,
            device=self.device,
            dtype=dtype,
        )
        self.max_pages = self.kv_pool.pages_for(max_context)  # the page table's width: a shape, never data
        self._ids_device = torch.device("cpu") if isinstance(inner.embed_tokens, HostEmbedding) else self.device
        binder = self.model.unit_binder
        self._binder = binder
        self._head_unit = next((i for i, (name, _) in enumerate(binder.units) if name == LM_HEAD_UNIT), None)
        self.paged_kernel = paged_attention_supported(self.device, dtype, self.head_dim)
        # where the paged kernel runs, whether it can write the o projection's operand (the heads' shapes only)
        self.attention_operand = paged_operand_supported(self.num_heads, self.num_kv_heads, self.head_dim)
        # the fused layer (module docstring): on CUDA where the model allows; True forces it (on CPU, the Triton
        # interpreter runs its kernels: tests)
        reason = fused_decode_unsupported(self.config, dtype)
        if fused and reason is not None:
            raise ValueError(f"fused=True, but {reason}")
        self.fused = (self.device.type == "cuda" and reason is None) if fused is None else fused
        attentions = [layer.self_attn for layer in self.layers] if self.fused else []
        self._qkv_bias = [stacked_bias((a.q_proj, a.k_proj, a.v_proj)) for a in attentions]
        # one-row residual adds with the norm meet here (one call at a time); made before any graph captures them
        self._norm_workspace = add_partials_workspace(self.device) if self.fused else None
        self.decoder = BatchDecoder(self, cuda_graphs=cuda_graphs)
        self.device_ids = self._device_ids_work()
        log.info(
            "paged KV pool: %d tokens in %d pages of %d, %.1f MiB; attention for decode rows: %s",
            self.kv_pool.total_tokens,
            self.kv_pool.num_pages,
            self.kv_pool.page_tokens,
            self.kv_pool.nbytes / 2**20,
            "paged Triton kernel" if self.paged_kernel else "torch SDPA per sequence",
        )

    def _device_ids_work(self) -> bool:
        """Whether a pass can take its token ids on the device (``forward(ids=...)``): with the embedding in host
        memory on CUDA, only if the device reads the pinned table (``compute.kernels.embedding``), tried here once
        on one row."""
        embedding = self.model.model.embed_tokens
        if not isinstance(embedding, HostEmbedding) or self.device.type != "cuda":
            return True
        try:
            with torch.inference_mode():
                row = embedding_rows(embedding.weight, torch.ones(1, dtype=torch.long, device=self.device),
                                     torch.empty((1, embedding.weight.shape[1]), dtype=embedding.weight.dtype,
                                                 device=self.device))  # fmt: skip
                if torch.equal(row.cpu()[0], embedding.weight[1]):
                    return True
            log.warning("the device read a wrong row of the host embedding: passes wait for their tokens")
        except Exception as e:  # noqa: BLE001 - any failure means only that passes are not launched ahead
            log.warning("the device cannot read the host embedding (%s): passes wait for their tokens", e)
        return False

    @classmethod
    def for_plan(cls, checkpoint: QuantizedCheckpoint, client, *, device: torch.device | str, **options) -> BatchEngine:
        """The engine the loader's plan counted: its max_context, prefill chunk, max_batch and KV pool."""
        plan = client.plan
        return cls(
            checkpoint, client, device=device, max_context=plan.max_context,
            kv_tokens=plan.kv_tokens or plan.max_context, max_batch=plan.max_batch, prefill_chunk=plan.prefill_chunk,
            **options,
        )  # fmt: skip

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], *, ids: torch.Tensor | None = None) -> torch.Tensor:
        """One pass over every chunk's tokens; the logits of the chunks that ask, [asking, vocab].

        ``ids`` (a pass of decode rows only, where ``device_ids`` holds): the rows' tokens as the device has them,
        int64 [rows] (the argmax of the pass before, not read back yet), used instead of the chunks' token ids, so
        that a pass can be launched before the host knows its tokens."""
        if not chunks:
            raise ValueError("a forward pass needs at least one chunk")
        if ids is not None and not (
            self.device_ids and all(len(chunk.token_ids) == 1 and chunk.logits for chunk in chunks)
        ):
            raise ValueError("token ids on the device are for passes of decode rows, where device_ids holds")
        try:
            return self._forward(chunks, ids)
        except BaseException:
            if self._binder.in_pass:
                try:
                    self._binder.abandon_pass()
                except Exception as e:  # the loader is gone, most likely: the original error says more
                    log.warning("could not finish the interrupted forward pass with the loader: %s", e)
            raise

    def _forward(self, chunks: Sequence[Chunk], ids: torch.Tensor | None) -> torch.Tensor:
        if all(len(chunk.token_ids) == 1 and chunk.logits for chunk in chunks):
            return self.decoder.run(chunks, ids)  # decode rows only: static buffers, CUDA graphs where the plan allows
        batch = _Batch.build(chunks, self.kv_pool, self.device, self.max_pages)
        tokens = torch.tensor(batch.token_ids, dtype=torch.long, device=self._ids_device).unsqueeze(0)  # (1, T)
        hidden = self.model.model.embed_tokens(tokens)  # (1, T, hidden)
        return self.run_pass(hidden, batch.positions, batch.slots, batch, batch.logit_rows)

    def run_pass(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attention,
        logit_rows: list[int] | None,
    ) -> torch.Tensor:
        """The pass over embedded rows ``hidden`` (1, T, hidden) at ``positions`` [T], their keys/values stored at
        ``slots`` [T]; ``attention.attend(engine, layer, q, scale, operand=...)`` attends each row over its own
        sequence. The logits of ``logit_rows`` ([len, vocab]; None: of every row). Every unit is visited once, in
        order; nothing here reads a value back from the device, so with static inputs it can be captured in a CUDA
        graph."""
        inner = self.model.model
        cos, sin = inner.rotary_emb(hidden, positions.unsqueeze(0))  # (1, T, D) each
        rotary = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))  # (T, 1, D): one row per token, every head
        normed = None  # the next layer's input norm, made by the layer before it (the fused decode layer)
        for index, layer in enumerate(self.layers):
            next_norm = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else None
            with self._binder.bound(index):  # layer i is unit i: the binder checks the order
                hidden, normed = self._layer(index, layer, hidden, rotary, slots, attention, normed=normed,
                                             next_norm=next_norm)  # fmt: skip
        if logit_rows is not None and not logit_rows:
            if self._head_unit is not None:
                with self._binder.bound(self._head_unit):  # the ring expects the head every pass
                    pass
            return hidden.new_empty((0, self.vocab_size))
        rows = hidden if logit_rows is None else hidden[:, logit_rows]  # (1, asking, hidden)
        return self.model.lm_head(inner.norm(rows))[0]  # (asking, vocab); an untied head's hooks bind its unit

    def _layer(
        self, index: int, layer, hidden: torch.Tensor, rotary, slots: torch.Tensor, attention, *,
        normed: RowOperand | None = None, next_norm=None,
    ) -> tuple[torch.Tensor, RowOperand | None]:  # fmt: skip
        """Layer ``index`` over ``hidden`` (1, T, hidden) -> (its output, ``next_norm`` of the output as the next
        layer's q|k|v operand, or None). ``normed`` is this layer's input norm of ``hidden`` as that operand when the
        layer before made it; ``next_norm`` the next layer's input_layernorm when it runs right after this one. Only
        the fused layer's decode passes (``_fused_layer``, up to ``MAX_ROWS`` rows) take them; else the norm is the
        next layer's own, and None is returned."""
        if self.fused:
            return self._fused_layer(index, layer, hidden, rotary, slots, attention, normed, next_norm)
        attn = layer.self_attn
        tokens = hidden.shape[1]
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(tokens, self.num_heads, self.head_dim)  # (T, H, D)
        k = attn.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)  # (T, KVH, D)
        v = attn.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        cos, sin = rotary
        q = (q * cos) + (rotate_half(q) * sin)  # HF's apply_rotary_pos_emb, row by row
        k = (k * cos) + (rotate_half(k) * sin)
        self.kv_pool.write(index, slots, k, v)
        out = attention.attend(self, index, q, attn.scaling)  # (T, H, D)
        hidden = hidden + attn.o_proj(out.reshape(1, tokens, -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), None

    def _fused_layer(
        self, index: int, layer, hidden: torch.Tensor, rotary, slots: torch.Tensor, attention,
        normed: RowOperand | None, next_norm,
    ) -> tuple[torch.Tensor, RowOperand | None]:  # fmt: skip
        """``_layer`` in the fused kernels (module docstring); ``hidden`` (1, T, hidden) bf16 on CUDA. Up to
        ``MAX_ROWS`` rows, the q|k|v, o and down GEMVs leave their split-K partial sums to the kernel after them
        (rotary, and the residual adds, the first with the post-attention norm, the last with ``next_norm``), the
        paged attention writes the o projection's operand where it can, and ``normed`` (the layer before's last add
        made it) stands for the input norm, as in the one-row decode step. A longer pass (prefill) leaves
        ``next_norm`` to the next layer and returns None (so its layers never get a ``normed``)."""
        attn, mlp = layer.self_attn, layer.mlp
        tokens, size = hidden.shape[1], hidden.shape[2]
        cos, sin = rotary
        pool = self.kv_pool
        intermediate = mlp.gate_proj.out_features
        o_proj, down = attn.o_proj, mlp.down_proj
        norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
        qkv_weight, qkv_scales = stacked((attn.q_proj, attn.k_proj, attn.v_proj))
        gate_up_weight, gate_up_scales = stacked((mlp.gate_proj, mlp.up_proj))
        if tokens > MAX_ROWS:  # a prefill pass: the product by dequantize-then-cuBLAS, the bias inside it
            x = rms_norm(hidden.view(tokens, size), norm.weight, norm.variance_epsilon)
            qkv = int4_matmul(x, qkv_weight, qkv_scales, self._qkv_bias[index])
            q = rotary_pool_write(qkv, cos, sin, slots, pool.flat_keys(index), pool.flat_values(index),
                                  num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)  # fmt: skip
            out = attention.attend(self, index, q, attn.scaling)  # (T, H, D)
            hidden = hidden + o_proj(out.reshape(1, tokens, -1))
            x = rms_norm(hidden.view(tokens, size), post_norm.weight, post_norm.variance_epsilon)
            gate_up = int4_matmul(x, gate_up_weight, gate_up_scales)
            act = silu_mul(gate_up[:, :intermediate], gate_up[:, intermediate:])
            return hidden + down(act.view(1, tokens, intermediate)), None
        if normed is None:
            normed = rms_norm(hidden.view(tokens, size), norm.weight, norm.variance_epsilon, operand=True)
        qkv = int4_gemv(normed, qkv_weight, qkv_scales, partials=True)
        q = rotary_pool_write(qkv, cos, sin, slots, pool.flat_keys(index), pool.flat_values(index),
                              num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                              bias=self._qkv_bias[index])  # fmt: skip
        # the o projection's operand where the paged kernel writes it, else (T, H, D) (the GEMV makes the operand)
        out = attention.attend(self, index, q, attn.scaling, operand=True)
        if not isinstance(out, RowOperand):
            out = out.view(tokens, -1)
        partials = int4_gemv(out, o_proj.qweight, o_proj.scales, partials=True)
        hidden, x = add_partials(hidden, partials, o_proj.bias, post_norm.weight, post_norm.variance_epsilon,
                                 operand=True, workspace=self._norm_workspace)  # fmt: skip
        gate_up = int4_gemv(x, gate_up_weight, gate_up_scales)  # [T, 2 I] bf16
        act = silu_mul(gate_up[:, :intermediate], gate_up[:, intermediate:], operand=True)
        partials = int4_gemv(act, down.qweight, down.scales, partials=True)
        if next_norm is None:
            return add_partials(hidden, partials, down.bias)[0], None
        return add_partials(hidden, partials, down.bias, next_norm.weight, next_norm.variance_epsilon, operand=True,
                            workspace=self._norm_workspace)  # fmt: skip

    def paged_attention(
        self, index: int, q: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor, scale: float, *,
        operand: bool = False,
    ) -> torch.Tensor | RowOperand:  # fmt: skip
        """One decode row per sequence over its pages in one launch (``compute.kernels.paged_attention``; only where
        ``paged_kernel`` holds): [rows, H, D], or with ``operand`` (only where ``attention_operand`` holds too) the
        o projection's ``RowOperand`` of the rows, the same values."""
        return paged_decode_attention(
            q, self.kv_pool.keys[index], self.kv_pool.values[index], page_table, lengths, scale=scale, operand=operand
        )

    def sequence_attention(self, index: int, q: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of ``q`` [n, H, D], the last n positions of a sequence whose positions' slots are
        ``slots``, over that sequence's keys/values: [n, H, D]. HF's SDPA path, its repeat_kv included."""
        n, length = q.shape[0], slots.shape[0]
        keys, values = self.kv_pool.gather(index, slots)  # (length, KVH, D)
        groups = self.num_heads // self.num_kv_heads
        keys = keys.transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)  # (1, H, length, D)
        values = values.transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
        mask = None
        if n > 1:  # query i sits at position length - n + i and sees keys up to there
            mask = torch.ones((n, length), dtype=torch.bool, device=q.device).tril(diagonal=length - n)
        with sdpa_kernel(PREFILL_ATTENTION_BACKENDS):  # not cuDNN: it plans anew for every shape it has not seen
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, scale=scale
            )
        return out[0].transpose(0, 1)  # (n, H, D)


@dataclasses.dataclass
class _Batch:
    """A pass's chunks laid out as rows: token ids, positions, KV slots, and where each chunk's rows are."""

    token_ids: list[int]
    positions: torch.Tensor  # int64 [T], on the device
    slots: torch.Tensor  # int64 [T]: where each row's keys/values go
    logit_rows: list[int]  # the rows whose logits are returned, in chunk order
    all_chunks: list[tuple[int, int, torch.Tensor]]  # (first row, rows, slots of positions 0 .. last) per chunk
    prefill_chunks: list[tuple[int, int, torch.Tensor]]  # the same for chunks of more than one token
    decode_index: torch.Tensor | None  # rows of one-token chunks, int64 on the device
    page_table: torch.Tensor | None  # int32 [decode rows, max pages]: each one's sequence's pages
    decode_lengths: torch.Tensor | None  # int32 [decode rows]: positions each attends over (its own included)

    def attend(
        self, engine: BatchEngine, index: int, q: torch.Tensor, scale: float, *, operand: bool = False
    ) -> torch.Tensor | RowOperand:
        """Each chunk's rows over its own sequence: decode rows in one paged launch on CUDA, the rest by SDPA;
        (T, H, D). With ``operand``, when every row is a decode row (the paged launch's rows are the pass's, in
        order) and the kernel can write it (``engine.attention_operand``), the o projection's ``RowOperand`` of the
        rows instead; else still (T, H, D)."""
        if operand and engine.paged_kernel and engine.attention_operand and not self.prefill_chunks:
            return engine.paged_attention(index, q, self.page_table, self.decode_lengths, scale, operand=True)
        out = torch.empty_like(q)  # (T, H, D)
        chunks = self.all_chunks
        if engine.paged_kernel and self.decode_index is not None:
            rows = self.decode_index
            out[rows] = engine.paged_attention(index, q[rows], self.page_table, self.decode_lengths, scale)
            chunks = self.prefill_chunks
        for offset, n, slots in chunks:
            out[offset : offset + n] = engine.sequence_attention(index, q[offset : offset + n], slots, scale)
        return out

    @classmethod
    def build(cls, chunks: Sequence[Chunk], pool: KVPagePool, device: torch.device, width: int) -> _Batch:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        logit_rows: list[int] = []
        all_chunks, prefill_chunks, decode_rows, decode_seqs, decode_lengths = [], [], [], [], []
        for chunk in chunks:
            n = len(chunk.token_ids)
            if n == 0:
                raise ValueError(f"a chunk of sequence {chunk.seq!r} has no tokens")
            offset = len(token_ids)
            stop = chunk.start + n
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, stop))
            history = pool.slots(chunk.seq, 0, stop)  # raises when the positions are not reserved
            slots.append(history[chunk.start :])
            all_chunks.append((offset, n, history))
            if n == 1:
                decode_rows.append(offset)
                decode_seqs.append(chunk.seq)
                decode_lengths.append(stop)
            else:
                prefill_chunks.append((offset, n, history))
            if chunk.logits:
                logit_rows.append(offset + n - 1)
        decode = bool(decode_rows)
        return cls(
            token_ids=token_ids,
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slots=torch.cat(slots),
            logit_rows=logit_rows,
            all_chunks=all_chunks,
            prefill_chunks=prefill_chunks,
            decode_index=torch.tensor(decode_rows, dtype=torch.long, device=device) if decode else None,
            page_table=pool.page_table(decode_seqs, width) if decode else None,
            decode_lengths=torch.tensor(decode_lengths, dtype=torch.int32, device=device) if decode else None,
        )
