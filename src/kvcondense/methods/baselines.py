"""Baselines through the same interface as the methods: full, local, scattered attention, StreamingLLM and a
scored eviction (the scoring pass alone, nothing condensed).

All of them keep plain text with contiguous positions and differ only in key expiry, so the evicting cache serves
them exactly as it serves the learned methods.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch

from ..errors import UsageError
from ..layout import IGNORE, NEVER, Layout, text_layout
from .base import Method, Scoring, TextPolicy, TokenizedText, param
from .memory import TextWriter
from .placements import scored_window

EVERY_TOKEN = 1 << 40
"""A score window longer than any prompt: every token of the prompt scores."""


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise UsageError(f"ratio must be in (0, 1), got {ratio}; pass e.g. --ratio 0.5")


def episode_layout(ep, keep_context: int | None = None, sinks: int = 0) -> Layout:
    """An online episode as plain text: its chunks, query and answer in one sequence, the answer scored.

    With ``keep_context`` the context is read through a sliding window of that many slots (``sinks`` first tokens
    plus the most recent ones), which stops moving when the query starts: the query and the answer see the
    sinks and the last ``keep_context - sinks`` context tokens, the same KV budget as a memory of that many slots.
    """
    context = torch.cat(ep.chunks) if ep.chunks else torch.zeros(0, dtype=torch.long)
    ids = torch.cat([context, ep.query, ep.answer])
    n_ctx = len(context)
    expire = torch.full((len(ids),), NEVER)
    if keep_context is not None and n_ctx > keep_context:
        window = keep_context - sinks
        k = torch.arange(n_ctx)
        early = (k >= sinks) & (k < n_ctx - window)  # leaves the window before the query starts
        expire[:n_ctx] = torch.where(early, torch.minimum(k + window, torch.tensor(n_ctx - 1)), NEVER)
    lay = text_layout(ids, expire)
    lay.targets[:] = IGNORE
    lay.targets[n_ctx + len(ep.query) - 1 : -1] = ep.answer
    return lay


@dataclass
class FullAttention(Method):
    """Full causal attention, nothing evicted: the upper bound every method is compared to."""

    name: ClassVar[str] = "full"

    def memory_writer(self, token_ids: dict[str, int]) -> TextWriter:
        """Every turn kept as plain text."""
        return TextWriter()

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        return text_layout(text.ids)

    def episode_layout(self, episode, token_ids: dict[str, int]) -> Layout:
        """The whole context kept."""
        return episode_layout(episode)


@dataclass
class NoContext(Method):
    """No context at all: an online episode's query and answer alone (the lower bound of CCM's table); on plain
    text, every token sees only itself (the lower bound of the prefix and QA tasks)."""

    name: ClassVar[str] = "no-context"
    trainable: ClassVar[bool] = False

    def memory_writer(self, token_ids: dict[str, int]) -> TextWriter:
        """Nothing kept: every turn is forgotten at once."""
        return TextWriter(keep=False)

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        """Plain text where every token sees itself only: nothing of a context is kept for what follows it (the
        lower bound of the prefix and QA tasks)."""
        return text_layout(text.ids, torch.arange(len(text)))

    def episode_layout(self, episode, token_ids: dict[str, int]) -> Layout:
        """The query and the answer alone."""
        return episode_layout(type(episode)([], episode.query, episode.answer, episode.options))


@dataclass
class SlidingWindow(Method):
    """A sliding window with attention sinks over an online episode's context, at a fixed KV budget (``slots``):
    the training-free baseline of CCM at the same memory.

    Attributes:
        slots: KV slots kept for the context (sinks included).
        sinks: initial tokens always kept.
    """

    name: ClassVar[str] = "window"
    trainable: ClassVar[bool] = False
    slots: int = param(32, "a fixed KV budget in slots")
    sinks: int = param(4, "initial tokens never evicted")

    def memory_writer(self, token_ids: dict[str, int]) -> TextWriter:
        """The first ``sinks`` tokens and a sliding window of the rest."""
        return TextWriter(window=self.slots - self.sinks, sinks=self.sinks)

    def __post_init__(self) -> None:
        if self.slots < 1 or not 0 <= self.sinks <= self.slots:
            raise UsageError(f"window needs slots >= 1 and 0 <= sinks <= slots, got {self.slots}, {self.sinks}")

    def episode_layout(self, episode, token_ids: dict[str, int]) -> Layout:
        """The sinks and the most recent context tokens, ``slots`` in all (plain text: ``--method streaming``)."""
        return episode_layout(episode, self.slots, self.sinks)


def local_expiry(n: int, ratio: float) -> torch.Tensor:
    """Expiry for the proportional window: query ``q`` sees keys ``k >= floor(q * ratio)``.

    Key ``k`` is visible while ``floor(q * r) <= k``, i.e. up to ``q = ceil((k + 1) / r) - 1``; exact rational
    arithmetic avoids float off-by-ones.
    """
    r = Fraction(ratio).limit_denominator(10_000)
    k = torch.arange(n)
    return ((k + 1) * r.denominator + r.numerator - 1) // r.numerator - 1


@dataclass
class LocalAttention(Method):
    """Local attention (the sentinel paper's baseline): each query keeps the most recent (1 - ratio) of its prefix.

    Attributes:
        ratio: fraction of the prefix hidden from each query, in (0, 1).
    """

    name: ClassVar[str] = "local"
    ratio: float = param(0.5, "compression ratio in (0, 1)")

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        return text_layout(text.ids, local_expiry(len(text), self.ratio))

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> TextPolicy:
        return TextPolicy.after(prompt, lambda index: int(local_expiry(index + 1, self.ratio)[index]))


@dataclass
class ScatteredAttention(Method):
    """Scattered attention (the sentinel paper's baseline): one Bernoulli(1 - ratio) keep draw per key, shared by
    all queries; every query sees the kept earlier keys and itself.

    Attributes:
        ratio: probability that a key is dropped, in (0, 1).
    """

    name: ClassVar[str] = "scattered"
    ratio: float = param(0.5, "compression ratio in (0, 1)")

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        rng = random.Random(seed)
        n = len(text)
        drop = torch.tensor([rng.random() < self.ratio for _ in range(n)], dtype=torch.bool)
        expire = torch.where(drop, torch.arange(n), torch.full((n,), NEVER))
        return text_layout(text.ids, expire)

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> TextPolicy:
        rng = random.Random(seed + 1)
        return TextPolicy.after(prompt, lambda index: index if rng.random() < self.ratio else NEVER)


@dataclass
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., ICLR 2024): ``sinks`` first tokens plus a recent window, training-free.

    The window is sized so that the KV kept at the end of a sequence matches ``1 - ratio`` of it, the same budget
    as the other methods at that ratio.

    Attributes:
        ratio: fraction of the KV to drop at the end of the sequence, in (0, 1).
        sinks: number of initial tokens that are always kept.
        slots: a fixed KV budget (sinks + window) instead of the ratio (to match a compressed memory's budget).
    """

    name: ClassVar[str] = "streaming"
    trainable: ClassVar[bool] = False
    ratio: float = param(0.5, "compression ratio in (0, 1)")
    sinks: int = param(4, "initial tokens never evicted")
    slots: int | None = param(None, "a fixed KV budget in slots instead of the ratio")

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        if self.sinks < 0:
            raise UsageError(f"sinks must be >= 0, got {self.sinks}")
        if self.slots is not None and self.slots <= self.sinks:
            raise UsageError(f"streaming slots must exceed the sinks ({self.sinks}), got {self.slots}")

    def window(self, n: int) -> int:
        """Recent keys kept in the cache for a sequence of ``n`` tokens (each query also sees itself); a fixed
        ``slots`` budget overrides the ratio."""
        if self.slots is not None:
            return self.slots - self.sinks
        return max(1, round((1 - self.ratio) * n) - self.sinks)

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        n = len(text)
        k = torch.arange(n)
        expire = torch.where(k < self.sinks, torch.full((n,), NEVER), k + self.window(n))
        return text_layout(text.ids, expire)

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> TextPolicy:
        window = self.window(len(prompt))  # the budget is fixed by the prompt
        return TextPolicy.after(prompt, lambda index: NEVER if index < self.sinks else index + window)


@dataclass
class ScoredEviction(Method):
    """The sentinel ``scored`` placement without the learned tokens: the prompt is read whole, then only the sinks,
    the recent window and the older tokens the scoring pass ranks highest stay (SnapKV's rule, Li et al. 2024, with
    one choice for every head and layer: a kvcondense cache keeps or frees a token everywhere); the rest is dropped,
    not condensed. Training-free as it stands (what ``sentinel --placement scored`` must beat to show its ``<CR>``s
    help); ``kvcondense train --method scored`` fits a LoRA that reads the pruned cache (as local and scattered
    attention do: the model learns to do without the dropped tokens).

    Attributes:
        ratio: fraction of the prompt's KV to drop, in (0, 1).
        sinks: initial tokens that are always kept.
        window_share: share of the kept slots (after the sinks) given to the recent window.
        score_window: the last tokens whose attention scores the others (kept, at least, unless ``recent`` is set);
            0: every token of the prompt scores.
        recent: keep exactly this many recent tokens raw (within the budget) instead of the window share.
        per_head: choose the older tokens per layer and KV head (SnapKV's own rule), each head keeping as many:
            the cache then holds a different set in every head (:mod:`kvcondense.heads`), the same memory.
        score_mean: a token's score is the mean, not the sum, of the attention of the scoring queries that see it
            (with ``score_window`` the whole prompt: H2O's accumulated attention, normalised).
        score_pool: each score averaged over this many neighbouring tokens (SnapKV's 5; 1: none).
        value_norm: each score weighed by the norm of the token's value (ExpectedAttention's weighting).
        replay: the weight of KVzip's replay score (the prompt read twice; the largest attention of the second
            reading): 1 alone, between 0 and 1 mixed with the attention score, each head's scores as shares.
    """

    name: ClassVar[str] = "scored"
    ratio: float = param(0.5, "compression ratio in (0, 1)")
    sinks: int = param(4, "initial tokens never evicted")
    window_share: float = param(0.5, "share of the kept slots (after the sinks) given to the raw recent window")
    score_window: int = param(32, "the last tokens, kept, whose attention scores the others (0: every token)")
    recent: int | None = param(None, "recent tokens kept raw, instead of the window share and the score window")
    per_head: bool = param(False, "choose the kept older tokens per (layer, KV head), not once for every head")
    score_mean: bool = param(False, "score a token by the mean attention of the scoring queries that see it")
    score_pool: int = param(5, "average each score over this many neighbouring tokens (odd; 1: no pooling)")
    value_norm: bool = param(False, "weigh each score by the norm of the token's value (ExpectedAttention)")
    replay: float = param(0.0, "weight of KVzip's replay score (the prompt read twice; 1: it alone)")

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        if self.sinks < 0 or self.score_window < 0 or not 0 < self.window_share < 1 or (self.recent or 0) < 0:
            raise UsageError("scored needs sinks, score_window and recent >= 0 and window_share in (0, 1)")
        if not 0 <= self.replay <= 1:
            raise UsageError(f"replay is a weight in [0, 1], got {self.replay}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise UsageError(f"score_pool must be an odd width >= 1, got {self.score_pool}")

    def scoring(self) -> Scoring | None:
        window = self.score_window or EVERY_TOKEN
        return Scoring(window, self.per_head, self.score_mean, self.score_pool, self.value_norm, self.replay)

    def compresses_at_prompt_end(self) -> bool:
        return True

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        if text.scores is None or (self.per_head and text.head_scores is None):
            raise UsageError(
                "the scored method reads token scores: lay the text out with "
                "kvcondense.scoring.method_layout(model, method, text, token_ids), which runs the scoring pass"
            )
        n, kept = len(text), 1 - self.ratio
        budget = max(1, int(kept * n))
        sinks = min(self.sinks, budget - 1)  # the last prompt token stays, however short the prompt
        keep = torch.zeros(n, dtype=torch.bool)
        keep[:sinks] = True
        if self.recent is None:
            window = scored_window(n, kept, sinks, self.window_share, self.score_window)
        else:
            window = scored_window(n, kept, sinks, 0.0, self.recent)
        keep[n - max(1, window) :] = True
        rest = min(budget - int(keep.sum()), int((~keep).sum()))
        older = torch.nonzero(~keep).flatten()
        scores = text.head_scores if self.per_head else text.scores[None, None]  # (layers, heads, T)
        keep = keep.repeat(*scores.shape[:2], 1)
        if rest > 0:
            top = torch.topk(scores[..., older].float(), rest, dim=-1).indices
            keep.scatter_(-1, older[top], True)
        layout = text_layout(text.ids, torch.where(keep.any((0, 1)), NEVER, n - 1))
        if self.per_head:  # each head hides, after the prompt, what it did not keep; chunks end with the prompt
            layout = dataclasses.replace(layout, head_expire=torch.where(keep, NEVER, n - 1), cuts=(n,))
        return layout

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> TextPolicy:
        return TextPolicy.after(prompt)  # only the prompt is compressed, as a press does
