"""Scored eviction: a scoring pass reads the prompt, then only the sinks, a recent window and the older tokens it
ranks highest stay; the rest is dropped, not condensed (SnapKV, Li et al. 2024; H2O, Zhang et al. 2023;
ExpectedAttention's value weighting; KVzip's replay, Kim et al. 2025), once for the whole cache or per layer and KV
head. ``scored-heads`` is the recipe that keeps most on the prefix task (README, "Against training-free eviction").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UsageError
from ..layout import NEVER, Layout, text_layout
from .base import Method, Scoring, TextPolicy, TokenizedText, param
from .baselines import check_ratio
from .placements import scored_window

EVERY_TOKEN = 1 << 40
"""A score window longer than any prompt: every token of the prompt scores."""
ALLOCATIONS = ("head", "layer")


def layer_budgets(scores: torch.Tensor, per_head: int) -> torch.Tensor:
    """How many tokens each head of each layer keeps when ``per_head`` x heads x layers entries are shared out by
    one ranking of ``scores`` (layers, KV heads, T): a layer gets its heads' mean number of the best entries, the
    remainders rounded by the largest fractions so that the total is exact. Returns (layers,) counts."""
    layers, heads, _ = scores.shape
    total = per_head * layers
    best = torch.zeros(scores.numel(), dtype=torch.bool)
    best[scores.flatten().topk(total * heads).indices] = True
    share = best.view(layers, -1).sum(1).double() / heads
    counts = share.floor().long()
    counts[(share - counts).argsort(descending=True, stable=True)[: total - int(counts.sum())]] += 1
    return counts


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
        recent: keep this many recent tokens raw instead of the window share's count, but never more than the
            window share of the kept slots after the sinks (on a short prompt the scored older tokens keep the rest
            of the budget).
        per_head: choose the older tokens per layer and KV head (SnapKV's own rule), each head keeping as many:
            the cache then holds a different set in every head (:mod:`kvcondense.heads`), the same memory.
        score_mean: a token's score is the mean, not the sum, of the attention of the scoring queries that see it
            (with ``score_window`` the whole prompt: H2O's accumulated attention, normalised).
        score_pool: each score averaged over this many neighbouring tokens (SnapKV's 5; 1: none).
        value_norm: each score weighed by the norm of the token's value (ExpectedAttention's weighting).
        replay: the weight of KVzip's replay score (the prompt read twice; the largest attention of the second
            reading): 1 alone, between 0 and 1 mixed with the attention score, each head's scores as shares
            (``score_window``, ``score_mean`` and ``value_norm`` shape the attention score only).
        allocate: with ``per_head``, how the older tokens' budget is shared out: ``head``, as many in every head;
            ``layer``, each layer's share taken from one ranking of every (layer, head, token) score, then every
            head of the layer keeping its own best that many (layers need different budgets: PyramidKV, Ada-KV).
            The same total; the cache then stores a different width in each layer (:mod:`kvcondense.layer_widths`).
    """

    name: ClassVar[str] = "scored"
    exact_budget: ClassVar[bool] = True  # floor((1 - ratio) x n) tokens, whatever the scores
    inference_params: ClassVar[tuple[str, ...]] = ("allocate",)  # how a budget is shared out, not what was learned
    ratio: float = param(0.5, "compression ratio in (0, 1)")
    sinks: int = param(4, "initial tokens never evicted")
    window_share: float = param(0.5, "share of the kept slots (after the sinks) given to the raw recent window")
    score_window: int = param(32, "the last tokens, kept, whose attention scores the others (0: every token)")
    recent: int | None = param(None, "recent tokens kept raw (at most the window share of the kept slots)")
    per_head: bool = param(False, "choose the kept older tokens per (layer, KV head), not once for every head")
    score_mean: bool = param(False, "score a token by the mean attention of the scoring queries that see it")
    score_pool: int = param(5, "average each score over this many neighbouring tokens (odd; 1: no pooling)")
    value_norm: bool = param(False, "weigh each score by the norm of the token's value (ExpectedAttention)")
    replay: float = param(0.0, "weight of KVzip's replay score (the prompt read twice; 1: it alone)")
    allocate: str = param("head", "per_head's budget: as many in every head (head), or each layer's share (layer)")

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.sinks < 0 or self.score_window < 0 or not 0 < self.window_share < 1 or (self.recent or 0) < 0:
            raise UsageError("scored needs sinks, score_window and recent >= 0 and window_share in (0, 1)")
        if not 0 <= self.replay <= 1:
            raise UsageError(f"replay is a weight in [0, 1], got {self.replay}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise UsageError(f"score_pool must be an odd width >= 1, got {self.score_pool}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown allocate {self.allocate!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocate == "layer" and not self.per_head:
            raise UsageError("allocate layer shares the budget out among the heads of each layer: add per_head")

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
            cap = int((kept * n - sinks) * self.window_share)  # a short prompt: the recent tokens get their share
            window = scored_window(n, kept, sinks, 0.0, min(self.recent, cap))
        keep[n - max(1, window) :] = True
        rest = min(budget - int(keep.sum()), int((~keep).sum()))
        older = torch.nonzero(~keep).flatten()
        scores = text.head_scores if self.per_head else text.scores[None, None]  # (layers, heads, T)
        keep = keep.repeat(*scores.shape[:2], 1)
        if rest > 0:
            ranked = scores[..., older].float()
            counts = layer_budgets(ranked, rest).tolist() if self.allocate == "layer" else [rest] * len(ranked)
            for layer, count in enumerate(counts):  # every head of a layer keeps its own best ``count``
                keep[layer].scatter_(-1, older[ranked[layer].topk(count, dim=-1).indices], True)
        layout = text_layout(text.ids, torch.where(keep.any((0, 1)), NEVER, n - 1))
        if self.per_head:  # each head hides, after the prompt, what it did not keep; chunks end with the prompt
            layout = dataclasses.replace(layout, head_expire=torch.where(keep, NEVER, n - 1), cuts=(n,))
        return layout

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> TextPolicy:
        return TextPolicy.after(prompt)  # only the prompt is compressed, as a press does


@dataclass
class ScoredHeads(ScoredEviction):
    """Scored eviction with the settings that keep most on the prefix and recall tasks: a choice per layer and KV
    head, by the mean attention every prompt token puts on a token (unpooled, weighed by its value norm) mixed with
    KVzip's replay score at weight 0.75 (the scoring pass reads the prompt and its copy once; the prefill then keeps
    that read of the prompt), each layer's share of the budget from one ranking of the whole cache, 4 sinks and the
    32 most recent tokens kept, but never more than a quarter of the kept slots (a short prompt keeps most of its
    budget for the scored tokens). The same fields as ``scored``, other defaults."""

    name: ClassVar[str] = "scored-heads"
    window_share: float = param(0.25, "share of the kept slots (after the sinks) given to the raw recent window")
    recent: int | None = param(32, "recent tokens kept raw (at most the window share of the kept slots)")
    score_window: int = param(0, "the last tokens whose attention scores the others (0: every token)")
    per_head: bool = param(True, "choose the kept older tokens per (layer, KV head), not once for every head")
    score_mean: bool = param(True, "score a token by the mean attention of the scoring queries that see it")
    score_pool: int = param(1, "average each score over this many neighbouring tokens (odd; 1: no pooling)")
    value_norm: bool = param(True, "weigh each score by the norm of the token's value (ExpectedAttention)")
    replay: float = param(0.75, "weight of KVzip's replay score (the prompt read twice; 1: it alone)")
    allocate: str = param(
        "layer", "per_head's budget: as many in every head (head), or each layer's share (layer)", before="head"
    )
