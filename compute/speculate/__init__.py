"""Speculative decoding as pure functions: drafting, draft trees, and the rules that accept drafted tokens.

A target pass over one token per forward reads every weight once per token; when weights stream over the bus
that pass costs nearly the same for one token as for a few hundred (on an H100 at an 8 GiB budget, 32B shapes:
233 ms for 1 token, 297 ms for 256). Speculation spends that slack: something cheap proposes continuations, the
target checks all of them in one pass, and every proposal the target agrees with is a token gained.

* ``ngram``: prompt lookup, proposals copied from earlier text (the prompt and the reply so far).
* ``tree``: ``DraftTree`` (nodes with a token, a parent and a cumulative draft log-probability), the chain as its
  degenerate case, SpecExec-style best-first growth under a token budget, and the verification layout: every
  row's position and the tree attention mask over the cached prefix.
* ``accept``: walking a verified tree (greedy: the target's argmax at each row; sampling: a draw from the
  target's distribution at each row, followed down the tree while it names a child), speculative sampling for a
  chain drafted by sampling, and the multi-draft rule of SpecInfer for children drawn from the draft. Each rule
  emits tokens with exactly the target's distribution.
* ``sizing``: how many draft tokens a pass should check, from the measured cost of a pass against its length
  and the draft's own estimate of how many tokens it will get accepted.

Nothing here runs a model, owns a KV cache or knows about the loader: callers pass probabilities, callbacks and
``torch.Generator``s in, and get token ids and node indices out.
"""
