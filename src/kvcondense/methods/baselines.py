"""Baselines through the same interface as the methods: full, local, scattered attention, StreamingLLM, no context
and a sliding window (scored eviction, the scoring pass alone, is in :mod:`kvcondense.methods.scored`).

All of them keep plain text with contiguous positions and differ only in key expiry, so the evicting cache serves
them exactly as it serves the learned methods.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch

from ..errors import UsageError
from ..layout import IGNORE, NEVER, Layout, text_layout
from .base import Method, TextPolicy, TokenizedText, param
from .memory import TextWriter


def check_ratio(ratio: float) -> None:
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
        check_ratio(self.ratio)
        if Fraction(self.ratio).limit_denominator(10_000) == 0:
            raise UsageError(f"ratio {self.ratio} is below 1/10000, the precision of local attention's window")

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
        check_ratio(self.ratio)

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
        check_ratio(self.ratio)
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
