"""Prompt-lookup drafting: propose the tokens that followed the last time the context's tail appeared.

``propose_ngram(context, num_tokens, max_ngram=3, min_ngram=1)``: the longest suffix of ``context`` (from
``max_ngram`` tokens down to ``min_ngram``) that also occurs earlier in ``context``; the tokens that followed its
most recent earlier occurrence, at most ``num_tokens`` of them, are the proposal. Empty when no suffix recurs.
Editing, summarising and code refactoring copy long spans of the prompt, which is where this pays; it costs no
model at all. Pure: lists of ints in, a list of ints out.
"""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(context: Sequence[int], num_tokens: int, *, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to ``num_tokens`` ids that followed the most recent earlier occurrence of the context's longest recurring
    suffix (``max_ngram`` … ``min_ngram`` tokens long); [] when none recurs."""
    if num_tokens < 1 or not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need num_tokens >= 1 and 1 <= min_ngram <= max_ngram, got {num_tokens}, {min_ngram}, {max_ngram}")
    tokens = list(context)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = tokens[-n:]
        # latest start first; a match must end before the suffix itself starts being the suffix
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + num_tokens]
                if follow:
                    return follow
    return []
