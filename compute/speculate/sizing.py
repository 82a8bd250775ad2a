"""How many drafted tokens one target pass should check, from what passes measurably cost.

A pass over r rows costs about ``fixed + per_row × r`` seconds: ``fixed`` is reading every weight once (over the
bus for streamed layers: hundreds of ms for a 32B model at 8 GiB), ``per_row`` the arithmetic and attention of one
more row. ``PassCost`` fits that line, by least squares, to the passes the engine actually timed (the most recent
``window``); until it has seen two different lengths it has no estimate and ``tree_size`` probes (the whole tree,
then a quarter of it).

``tree_size(expected, pass_cost, draft_seconds)`` picks the k (0 … len(tree)) that maximizes tokens per second:
``(1 + expected[k]) / (draft_seconds + pass_seconds(1 + k))``, where ``expected[k]`` is the number of draft tokens
the draft expects accepted from the tree's first k nodes (``DraftTree.expected_accepted``) and the one is the
token every pass gains. When layers stream, ``fixed`` dwarfs ``per_row`` and the answer is the whole tree; when
everything is resident, a few tokens. Pure arithmetic: no clock is read here.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

PROBE_FRACTION = 4  # the second probing pass checks a quarter of the tree


class PassCost:
    """Seconds of a target pass against its row count, fitted to the last ``window`` measurements."""

    def __init__(self, window: int = 32):
        self._samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def record(self, rows: int, seconds: float) -> None:
        self._samples.append((rows, seconds))

    @property
    def lengths_seen(self) -> int:
        return len({rows for rows, _ in self._samples})

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per row), both >= 0; None before two different lengths were measured."""
        if self.lengths_seen < 2:
            return None
        n = len(self._samples)
        mean_r = sum(r for r, _ in self._samples) / n
        mean_s = sum(s for _, s in self._samples) / n
        var = sum((r - mean_r) ** 2 for r, _ in self._samples)
        slope = max(0.0, sum((r - mean_r) * (s - mean_s) for r, s in self._samples) / var)
        return max(0.0, mean_s - slope * mean_r), slope

    def seconds(self, rows: int) -> float | None:
        line = self.line()
        return None if line is None else line[0] + line[1] * rows


def tree_size(expected: Sequence[float], pass_cost: PassCost, draft_seconds: float = 0.0) -> int:
    """The number of the tree's nodes (a prefix) the next pass should check; see the module docstring."""
    full = len(expected) - 1
    if pass_cost.line() is None:
        return full if pass_cost.lengths_seen == 0 else max(1, full // PROBE_FRACTION)
    fixed, per_row = pass_cost.line()

    def rate(k: int) -> float:
        return (1 + expected[k]) / max(draft_seconds + fixed + per_row * (1 + k), 1e-12)

    return max(range(full + 1), key=rate)
