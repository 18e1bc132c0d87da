"""Where sentinel spans go (SPEC section 1): the paper's random word spans inside long lines (``lines``), Activation
Beacon's tiling of everything older than a raw recent window (``recent``), and a scoring pass's choice of what stays
raw (``scored``). Each returns sorted, non-overlapping (first, last) pairs, both inclusive, for
:func:`kvcondense.methods.sentinel.sentinel_layout`.
"""

from __future__ import annotations

import bisect
import math
import random

import torch

from .base import TokenizedText

PLACEMENTS = ("lines", "recent", "scored")


def select_spans(n_words: int, ratio: float, max_words: int, rng: random.Random) -> list[tuple[int, int]]:
    """Non-overlapping random word spans covering about ``ratio`` of the KV of ``n_words`` words.

    Each span keeps one ``<CR>`` slot, so the covered fraction is inflated by avg/(avg-1) (as the authors do).
    Spans are 2..``max_words`` words long and placed uniformly; adjacent spans are allowed. The attempt cap means
    the reached ratio can fall below the target at high ratios: callers report the measured ratio.

    Returns:
        Sorted (first_word, last_word) pairs, both inclusive.
    """
    hi = min(max_words, n_words)
    if hi < 2 or ratio <= 0:
        return []
    avg = (2 + hi) / 2
    target = min(n_words, ratio * n_words * avg / (avg - 1))
    taken = [False] * n_words
    spans, covered = [], 0
    for _ in range(20 * n_words + 100):
        if covered >= target:
            break
        length = rng.randint(2, hi)
        first = rng.randint(0, n_words - length)
        if any(taken[first : first + length]):
            continue
        taken[first : first + length] = [True] * length
        spans.append((first, first + length - 1))
        covered += length
    return sorted(spans)


def recent_spans(n: int, kept: float, sinks: int, window_share: float = 0.5) -> list[tuple[int, int]]:
    """Token spans for the ``recent`` placement: ``sinks`` raw, then the older tokens split evenly into spans (2+
    tokens each), then a raw recent window, so that sinks + window + one ``<CR>`` per span is about ``kept * n``;
    the window takes ``window_share`` of the kept slots after the sinks, the ``<CR>``s the rest."""
    budget = max(1.0, kept * n - sinks)
    window = int(budget * window_share)
    older = n - sinks - window
    n_spans = min(max(1, round(budget - window)), older // 2)
    if n_spans < 1:
        return []
    cuts = [sinks + round(i * older / n_spans) for i in range(n_spans + 1)]
    return [(a, b - 1) for a, b in zip(cuts, cuts[1:], strict=False)]


def word_spans_to_tokens(text: TokenizedText, word_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Map (first_word, last_word) spans to contiguous (first_token, last_token) spans."""
    first, last = {}, {}
    for t, w in enumerate(text.word_ids.tolist()):
        if w >= 0:
            first.setdefault(w, t)
            last[w] = t
    return [(first[a], last[b]) for a, b in word_spans if a in first and b in last and first[a] <= last[b]]


def scored_window(n: int, kept: float, sinks: int, window_share: float, score_window: int) -> int:
    """The raw recent window of a scored layout of ``n`` tokens keeping ``kept`` of them: ``window_share`` of the
    slots after the sinks, and at least the ``score_window`` tokens that scored the rest, within the budget; when
    older tokens remain between the sinks and the window, one slot is left for them (a ``<CR>`` or a raw token)."""
    room = math.floor(kept * n) - sinks
    if n - sinks - room >= 2:
        room -= 1
    return max(0, min(max(score_window, int((kept * n - sinks) * window_share)), room))


def scored_spans(scores: torch.Tensor, kept: float, sinks: int, window: int, span_tokens: int) -> list[tuple[int, int]]:
    """Token spans for the ``scored`` placement: the first ``sinks`` and the last ``window`` tokens stay raw; of the
    tokens between, the highest-scoring stay raw too and every run of the others is tiled with spans of at most
    ``span_tokens`` tokens (longer when the budget needs it), each condensed into its ``<CR>``, so that the raw
    tokens plus one ``<CR>`` per span are about ``kept * n``.

    Greedy, in decreasing score: a token is made raw when the total still fits (it costs its own slot, and it may
    split a run into two that need one more ``<CR>``, or shorten one that then needs one fewer). A run of one token
    stays raw: its ``<CR>`` would take the same slot.
    """
    n = int(scores.shape[0])
    lo = min(sinks, n)
    hi = max(lo, n - window)
    older = hi - lo
    budget = math.floor(kept * n) - lo - (n - hi)  # slots for the raw older tokens and the <CR>s
    if older < 2 or budget >= older:
        return []
    budget = max(1, budget)
    longest = max(2, span_tokens, math.ceil(older / budget))

    def cost(run: int) -> int:
        return run if run < 2 else math.ceil(run / longest)

    raw = [lo - 1, hi]  # raw positions around the older region, kept sorted
    total = cost(older)
    order = torch.argsort(scores[lo:hi].float(), descending=True, stable=True).tolist()
    for p in (lo + i for i in order):
        i = bisect.bisect(raw, p)
        a, b = raw[i - 1], raw[i]
        new = total - cost(b - a - 1) + cost(p - a - 1) + cost(b - p - 1) + 1
        if new <= budget:
            raw.insert(i, p)
            total = new
    spans = []
    for a, b in zip(raw, raw[1:], strict=False):
        run = b - a - 1
        if run < 2:
            continue
        pieces = cost(run)
        cuts = [a + 1 + round(k * run / pieces) for k in range(pieces + 1)]
        spans.extend((x, y - 1) for x, y in zip(cuts, cuts[1:], strict=False))
    return spans
