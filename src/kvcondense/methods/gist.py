"""Sentence-anchored gist tokens: every sentence collapses into N gist tokens.

Tarasov, Goncharova, Kuznetsov. "Sentence-Anchored Gist Compression for Long-Context LLMs", 2025
(arXiv 2511.08128). See SPEC section 2 for the insertion rule, the mask and the training this file implements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UsageError
from ..layout import IGNORE, NEVER, Kind, Layout
from .base import Method, StepPiece, TokenizedText, param, piece_layout

MAX_GIST_TOKENS = 8


def gist_token_names(n: int) -> tuple[str, ...]:
    return tuple(f"<GIST_{i}>" for i in range(n))


@dataclass
class Gist(Method):
    """Sentence-anchored gist tokens (Tarasov et al. 2025): each sentence is followed by ``n_gist`` gist tokens;
    later tokens see earlier gist tokens and their own sentence only, so a finished sentence's KV is freed.

    Attributes:
        n_gist: gist tokens per sentence, 1..8.
        max_sentence_tokens: K, force a gist block after this many regular tokens without a sentence end (text
            without punctuation: code, lists, transcripts). Default 128, about 4-5 typical English sentences,
            so that prose is unaffected.
        bos_sink: keep the first token of the sequence visible to every later token (an attention sink).
        min_sentence_tokens: M, a sentence end closes a block only once M regular tokens have gathered since the
            last block (0, the paper: every sentence). Several short sentences then share one block, which is how a
            KV budget is met: about ``n_gist / M`` of the text is kept (``eval --kv-budget`` sets M, or a smaller K
            when whole sentences keep less than the budget).
    """

    name: ClassVar[str] = "gist"
    predict_from: ClassVar[tuple[Kind, ...]] = (Kind.TEXT, Kind.GIST)
    inference_params: ClassVar[tuple[str, ...]] = ("min_sentence_tokens", "max_sentence_tokens")  # block lengths
    n_gist: int = param(4, "gist tokens per sentence, 1..8", flag="--gist-tokens")
    max_sentence_tokens: int = param(128, "force a gist block after this many regular tokens without a sentence end")
    bos_sink: bool = param(False, "keep the first token visible as an attention sink")
    min_sentence_tokens: int = param(0, "a sentence end closes a gist block only after this many tokens (0: every)")

    def __post_init__(self) -> None:
        if not 1 <= self.n_gist <= MAX_GIST_TOKENS:
            raise UsageError(f"gist tokens must be in 1..{MAX_GIST_TOKENS}, got {self.n_gist}; pass --gist-tokens 4")
        if self.max_sentence_tokens < 1:
            raise UsageError(f"max sentence tokens (K) must be >= 1, got {self.max_sentence_tokens}")
        if not 0 <= self.min_sentence_tokens <= self.max_sentence_tokens:
            raise UsageError(
                f"min sentence tokens must be in 0..{self.max_sentence_tokens} (--max-sentence-tokens), got "
                f"{self.min_sentence_tokens}"
            )

    def params_for_budget(self, kv_budget: float, texts: Sequence[TokenizedText] = ()) -> dict:
        """The block lengths that keep the most of ``texts`` without passing ``kv_budget``: blocks forced inside
        long sentences every K tokens (whole sentences keep less than the budget), or short sentences sharing a
        block of at least M tokens (they keep more). Neither is monotone (a longer block also leaves a longer raw
        tail), so a grid of lengths is laid out and the best kept; when none fits, the one keeping least (which
        the budget check then refuses). Without texts, blocks of at least ``n_gist / kv_budget`` tokens."""
        if not texts:
            least = math.ceil(self.n_gist / kv_budget)
            return {**self.params(), "min_sentence_tokens": least, "max_sentence_tokens": 2 * least}
        ids = {t: i for i, t in enumerate(self.special_tokens)}
        total = sum(len(t) for t in texts)
        longest = max(len(t) for t in texts)
        grid = sorted({max(1, round(1.2**i)) for i in range(64) if 1.2**i <= longest} | {longest})
        candidates = [(0, k) for k in grid if k <= self.max_sentence_tokens] + [(m, longest) for m in grid]

        def kept(m: int, k: int) -> float:
            lengths = dataclasses.replace(self, min_sentence_tokens=m, max_sentence_tokens=k)
            return sum(lengths.layout(t, ids).kept_slots() for t in texts) / total

        scored = [(kept(m, k), m, k) for m, k in candidates]
        fitting = [c for c in scored if c[0] <= kv_budget]
        _, m, k = max(fitting) if fitting else min(scored)
        return {**self.params(), "min_sentence_tokens": m, "max_sentence_tokens": k}

    @property
    def special_tokens(self) -> tuple[str, ...]:  # type: ignore[override]
        return gist_token_names(self.n_gist)

    def block_after(self, text: TokenizedText) -> list[int]:
        """Token indices followed by a gist block: sentence ends, plus forced blocks after long runs."""
        ends = set(torch.nonzero(text.sentence_end).flatten().tolist())
        out, run = [], 0
        for t in range(len(text)):
            run += 1
            if (t in ends and run >= self.min_sentence_tokens) or run == self.max_sentence_tokens:
                out.append(t)
                run = 0
        return out

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        gist_ids = [token_ids[t] for t in self.special_tokens]
        return gist_layout(text.ids, self.block_after(text), gist_ids, self.bos_sink)

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> GistPolicy:
        return GistPolicy(prompt, [token_ids[t] for t in self.special_tokens], self.max_sentence_tokens, self.bos_sink)


def gist_layout(ids: torch.Tensor, after: list[int], gist_ids: list[int], bos_sink: bool = False) -> Layout:
    """Insert a block of gist tokens after each token index in ``after``.

    Regular tokens expire at the last gist token of their sentence's block; gist tokens never expire. Positions
    are contiguous (gist tokens take positions). Targets are the plain next token, gist tokens included (the
    model learns to emit ``g_1`` after a sentence); perplexity is reported on regular targets separately.
    """
    after_set = set(after)
    out_ids, kinds, expire, sentence = [], [], [], []
    for t, tok in enumerate(ids.tolist()):
        if not (bos_sink and t == 0):
            sentence.append(len(out_ids))
        out_ids.append(tok), kinds.append(Kind.TEXT), expire.append(NEVER)
        if t in after_set:
            last = len(out_ids) + len(gist_ids) - 1
            for idx in sentence:
                expire[idx] = last
            out_ids.extend(gist_ids), kinds.extend([Kind.GIST] * len(gist_ids)), expire.extend([NEVER] * len(gist_ids))
            sentence = []
    n = len(out_ids)
    input_ids = torch.tensor(out_ids, dtype=torch.long)
    targets = torch.full((n,), IGNORE, dtype=torch.long)
    targets[:-1] = input_ids[1:]
    return Layout(
        input_ids=input_ids,
        kinds=torch.tensor([int(k) for k in kinds], dtype=torch.long),
        position_ids=torch.arange(n),
        expire=torch.tensor(expire, dtype=torch.long),
        start=torch.zeros(n, dtype=torch.long),
        closer_only=torch.zeros(n, dtype=torch.bool),
        targets=targets,
    )


class GistPolicy:
    """Gist tokens during generation: when the model emits ``g_1`` the rest of the block is forced, and the
    finished sentence's regular tokens are freed at once (the paper's code keeps them until the end). A block is
    also forced after ``max_sentence_tokens`` regular tokens."""

    def __init__(self, prompt: Layout, gist_ids: list[int], max_sentence_tokens: int = 0, bos_sink: bool = False):
        self.index = len(prompt)
        self.gist_ids = gist_ids
        self.max_sentence_tokens = max_sentence_tokens
        # regular tokens of the prompt's unfinished sentence are still stored: they are freed with its block
        tail = [i for i in range(len(prompt)) if prompt.expire[i] == NEVER and prompt.kinds[i] == Kind.TEXT]
        self.sentence = [i for i in tail if not (bos_sink and i == 0)]
        self.run = len(self.sentence)

    def _block(self, rows: list[dict]) -> list[tuple[torch.Tensor, int]]:
        first = self.index - len(rows)
        for g in self.gist_ids:
            rows.append({"id": g, "kind": Kind.GIST, "pos": self.index, "expire": NEVER, "start": 0, "closer": False})
            self.index += 1
        last = self.index - 1
        for r, idx in zip(rows, range(first, last + 1), strict=False):
            if idx in self.sentence:
                r["expire"] = last
        stored = [i for i in self.sentence if i < first]
        self.sentence, self.run = [], 0
        return [(torch.tensor(stored), last)] if stored else []

    def step(self, token: int) -> StepPiece:
        if token in self.gist_ids:  # the model closed the sentence: force the whole block
            updates = self._block(rows := [])
            return StepPiece(piece_layout(rows), len(rows) - 1, updates)
        rows = [{"id": token, "kind": Kind.TEXT, "pos": self.index, "expire": NEVER, "start": 0, "closer": False}]
        self.sentence.append(self.index)
        self.index += 1
        self.run += 1
        updates = self._block(rows) if self.run == self.max_sentence_tokens else []
        return StepPiece(piece_layout(rows), len(rows) - 1, updates)
