"""Sentinel tokens: a span wrapped in ``<CL> ... <CR>`` collapses into its ``<CR>``.

Ren, Jia, Zhu. "Context Compression for Auto-regressive Transformers with Sentinel Tokens", EMNLP 2023
(arXiv 2310.08152). See SPEC section 1 for the mask, positions and loss this file implements.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UsageError
from ..layout import NEVER, Kind, Layout, next_text_targets
from .base import Method, Scoring, StepPiece, TokenizedText, param, piece_layout
from .placements import PLACEMENTS, recent_spans, scored_spans, scored_window, select_spans, word_spans_to_tokens

OPEN, CLOSE = "<CL>", "<CR>"
LORA_SCOPES = ("all", "special")
EVICTS = ("close", "end")


def sentinel_layout(
    ids: torch.Tensor,
    spans: list[tuple[int, int]],
    open_id: int,
    close_id: int,
    cr_sees_prefix: bool = False,
    evict_at_end: bool = False,
) -> Layout:
    """Insert ``<CL>``/``<CR>`` around token spans and derive positions, expiry and targets.

    Args:
        ids: text token ids. (T,)
        spans: sorted, non-overlapping (first_token, last_token) pairs, both inclusive.
        open_id, close_id: ids of ``<CL>`` and ``<CR>``.
        cr_sees_prefix: let ``<CR>`` also see the uncompressed prefix (default: only its own span, as the authors).
        evict_at_end: a span's text stays visible to the rest of the text and leaves the cache when the text ends,
            not when its ``<CR>`` closes it (the text is a prompt read whole, then compressed, as a KV press does).
    """
    opens = {s: e for s, e in spans}
    closes = {e for _, e in spans}
    out_ids, kinds, pos, expire, start, closer = [], [], [], [], [], []
    n_text = 0
    span_open = -1  # index of the open <CL>, -1 outside a span
    members: list[int] = []
    for t, tok in enumerate(ids.tolist()):
        if t in opens:
            span_open = len(out_ids)
            members = [span_open]
            out_ids.append(open_id), kinds.append(Kind.OPEN), pos.append(max(n_text - 1, 0))
            expire.append(NEVER), start.append(span_open), closer.append(True)
        if span_open >= 0:
            members.append(len(out_ids))
        out_ids.append(tok), kinds.append(Kind.TEXT), pos.append(n_text)
        expire.append(NEVER), start.append(0), closer.append(False)
        n_text += 1
        if t in closes:
            cr = len(out_ids)
            for m in members:
                expire[m] = cr
            out_ids.append(close_id), kinds.append(Kind.CLOSE), pos.append(n_text - 1)
            expire.append(NEVER), start.append(0 if cr_sees_prefix else span_open), closer.append(False)
            span_open, members = -1, []
    if evict_at_end:  # span text (not the <CL>s: only their <CR> reads them) is seen up to the last row
        expire = [len(out_ids) - 1 if k == Kind.TEXT and e != NEVER else e for k, e in zip(kinds, expire, strict=True)]
    input_ids = torch.tensor(out_ids, dtype=torch.long)
    kinds_t = torch.tensor([int(k) for k in kinds], dtype=torch.long)
    return Layout(
        input_ids=input_ids,
        kinds=kinds_t,
        position_ids=torch.tensor(pos, dtype=torch.long),
        expire=torch.tensor(expire, dtype=torch.long),
        start=torch.tensor(start, dtype=torch.long),
        closer_only=torch.tensor(closer, dtype=torch.bool),
        targets=next_text_targets(input_ids, kinds_t),
    )


class SentinelPolicy:
    """Generated text is compressed in a fixed pattern: ``gap`` plain tokens, then a span of ``span`` tokens
    wrapped in ``<CL> ... <CR>``. With ``gap = ((1 - r) * span - 1) / r`` the kept fraction is ``1 - r``."""

    def __init__(
        self, prompt: Layout, open_id: int, close_id: int, ratio: float, span: int = 8, cr_sees_prefix: bool = False
    ):
        self.index, self.n_text = len(prompt), prompt.n_text
        self.open_id, self.close_id, self.span, self.cr_sees_prefix = open_id, close_id, span, cr_sees_prefix
        self.gap = max(0, round(((1 - ratio) * span - 1) / ratio))
        self.phase = 0  # position inside the current gap + span period
        self.open_at = -1
        self.members: list[int] = []

    def step(self, token: int) -> StepPiece:
        rows, updates, next_row = [], [], 0
        in_span = self.phase >= self.gap
        if self.phase == self.gap:  # open a span before this token
            self.open_at = self.index
            self.members = [self.index]
            rows.append(
                {
                    "id": self.open_id,
                    "kind": Kind.OPEN,
                    "pos": max(self.n_text - 1, 0),
                    "expire": NEVER,
                    "start": self.index,
                    "closer": True,
                }
            )
            self.index += 1
        next_row = len(rows)
        rows.append({"id": token, "kind": Kind.TEXT, "pos": self.n_text, "expire": NEVER, "start": 0, "closer": False})
        if in_span:
            self.members.append(self.index)
        self.index += 1
        self.n_text += 1
        self.phase += 1
        if self.phase == self.gap + self.span:  # close the span after this token
            cr = self.index
            rows.append(
                {
                    "id": self.close_id,
                    "kind": Kind.CLOSE,
                    "pos": self.n_text - 1,
                    "expire": NEVER,
                    "start": 0 if self.cr_sees_prefix else self.open_at,
                    "closer": False,
                }
            )
            first_new = cr - len(rows) + 1
            for r, idx in zip(rows, range(first_new, cr + 1), strict=True):
                if idx in self.members:
                    r["expire"] = cr
            stored = [m for m in self.members if m < first_new]
            if stored:
                updates.append((torch.tensor(stored), cr))
            self.index += 1
            self.phase, self.members = 0, []
        return StepPiece(piece_layout(rows), next_row, updates)


@dataclass
class Sentinel(Method):
    """Sentinel-token compression (Ren et al., EMNLP 2023): each span of the context collapses into its ``<CR>``.

    Attributes:
        ratio: target fraction of context KV to drop, in (0, 1). The measured ratio is reported separately.
        max_span_words: longest span, in whitespace words (spans are 2..max_span_words words).
        min_line_words: lines shorter than this get no spans (the authors use 30).
        cr_sees_prefix: let ``<CR>`` attend to the uncompressed prefix too (default off, as the authors).
        decode_span: span length, in tokens, used to compress generated text.
        placement: ``lines`` (the paper's: random word spans inside lines of ``min_line_words``+ words) or
            ``recent`` (Activation Beacon's layout, Zhang et al. 2024: the first ``sinks`` tokens and the most recent
            tokens stay raw, everything older is tiled with token spans, each condensed into its ``<CR>``), which
            reaches any budget on any text: half of the kept slots go to the recent window, half to the ``<CR>``s;
            or ``scored``: the sinks and the recent window (``window_share`` of the budget, at least ``score_window``
            tokens) stay raw, a scoring pass (:mod:`kvcondense.scoring`) keeps the older tokens the last
            ``score_window`` tokens attend to most raw too, and every run of the others is condensed into ``<CR>``s
            of at most ``span_tokens`` tokens (RestoreKV's pairing of score-based
            pruning with learned tokens, in one budget).
        sinks: ``recent`` placement: initial tokens that stay raw (attention sinks).
        score_window, span_tokens: the ``scored`` placement's observation window and longest span (see above).
        evict: when the text of a prompt span leaves the cache: ``close`` (at its ``<CR>``, the paper's: the rest
            of the prompt reads the ``<CR>`` only) or ``end`` (at the end of the prompt, which is read whole first,
            as a KV press compresses after the prefill: every kept token was computed reading the whole prompt
            (and the ``<CR>``s before it); the peak memory is the whole prompt's). Generated text is always
            condensed at its ``<CR>``.
        lora_scope: where the LoRA update acts: ``all`` tokens (the paper's) or only the ``special`` ones
            (``<CL>``/``<CR>``, a conditional LoRA as in CCM): text then runs the base model exactly, so with nothing
            compressed the checkpoint *is* the base model, and only the condensing tokens are learned.
    """

    name: ClassVar[str] = "sentinel"
    special_tokens: ClassVar[tuple[str, ...]] = (OPEN, CLOSE)
    # where the budget goes is chosen at inference: the same <CL>/<CR> rows condense a span wherever it lies
    inference_params: ClassVar[tuple[str, ...]] = ("window_share", "placement", "score_window", "span_tokens", "evict")

    ratio: float = param(0.5, "compression ratio in (0, 1)")
    max_span_words: int = param(25, "longest span, in words (lines placement)")
    min_line_words: int = param(30, "lines shorter than this get no spans (lines placement)")
    cr_sees_prefix: bool = param(False, "<CR> also attends to the uncompressed prefix")
    decode_span: int = param(8, "span length, in tokens, for compressing generated text")
    placement: str = param(
        "lines",
        "spans inside long lines (lines, the paper's) or sinks + recent window raw and all older text condensed "
        "(recent, Activation Beacon's layout: reaches any budget) or the tokens a scoring pass ranks highest raw and "
        "the rest condensed (scored)",
        choices=PLACEMENTS,
    )
    sinks: int = param(4, "initial tokens never evicted (recent placement; streaming; window; ccm streaming)")
    window_share: float = param(
        0.5,
        "recent and scored placements: share of the kept slots (after the sinks) given to the raw recent window "
        "(scored: at least --score-window tokens)",
    )
    score_window: int = param(32, "scored placement: the last tokens, kept raw, whose attention scores the others")
    span_tokens: int = param(32, "scored placement: longest span condensed into one <CR>, in tokens")
    evict: str = param(
        "close",
        "when a prompt span's text leaves the cache: when its <CR> closes it (close, the paper's) or when the prompt "
        "ends (end: the rest of the prompt still reads it, as a KV press compresses after the prefill)",
        choices=EVICTS,
    )
    lora_scope: str = param(
        "all", "LoRA on every token (all, the paper's) or only on <CL>/<CR> (special)", choices=LORA_SCOPES
    )

    @property
    def lora_on(self) -> tuple[Kind, ...] | None:  # type: ignore[override]
        return (Kind.OPEN, Kind.CLOSE) if self.lora_scope == "special" else None

    def __post_init__(self) -> None:
        if not 0 < self.window_share < 1:
            raise UsageError(f"window_share must be in (0, 1), got {self.window_share}")
        if self.lora_scope not in LORA_SCOPES:
            raise UsageError(f"unknown lora_scope {self.lora_scope!r}; choose one of {', '.join(LORA_SCOPES)}")
        if self.placement not in PLACEMENTS:
            raise UsageError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.sinks < 0:
            raise UsageError(f"sinks must be >= 0, got {self.sinks}")
        if not 0 < self.ratio < 1:
            raise UsageError(f"ratio must be in (0, 1), got {self.ratio}; pass e.g. --ratio 0.5")
        if self.evict not in EVICTS:
            raise UsageError(f"unknown evict {self.evict!r}; choose one of {', '.join(EVICTS)}")
        if self.score_window < 1 or self.span_tokens < 2:
            raise UsageError(
                f"score_window must be >= 1 and span_tokens >= 2, got {self.score_window} and {self.span_tokens}"
            )
        if self.max_span_words < 2:
            raise UsageError(f"max_span_words must be >= 2, got {self.max_span_words}")
        if self.decode_span < 1:
            raise UsageError(f"decode_span must be >= 1, got {self.decode_span}")

    def scoring(self) -> Scoring | None:
        return Scoring(self.score_window) if self.placement == "scored" else None

    def compresses_at_prompt_end(self) -> bool:
        return self.evict == "end"

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        if self.placement in ("recent", "scored"):
            if self.placement == "recent":
                spans = recent_spans(len(text), 1 - self.ratio, self.sinks, self.window_share)
            elif text.scores is None:
                raise UsageError(
                    "the scored placement reads token scores: lay the text out with "
                    "kvcondense.scoring.method_layout(model, method, text, token_ids), which runs the scoring pass"
                )
            else:
                n, kept = len(text), 1 - self.ratio
                sinks = min(self.sinks, max(0, math.floor(kept * n) - 2))  # room for a <CR> and the last token
                window = scored_window(n, kept, sinks, self.window_share, self.score_window)
                spans = scored_spans(text.scores, kept, sinks, window, self.span_tokens)
            return sentinel_layout(
                text.ids, spans, token_ids[OPEN], token_ids[CLOSE], self.cr_sees_prefix, self.evict == "end"
            )
        rng = random.Random(seed)
        word_spans = []
        lines: dict[int, list[int]] = {}
        for w, line in zip(text.word_ids.tolist(), text.line_ids.tolist(), strict=True):
            if w >= 0 and (not lines.get(line) or lines[line][-1] != w):
                lines.setdefault(line, []).append(w)
        for words in lines.values():
            if len(words) < self.min_line_words:
                continue
            for a, b in select_spans(len(words), self.ratio, self.max_span_words, rng):
                word_spans.append((words[a], words[b]))
        spans = word_spans_to_tokens(text, sorted(word_spans))
        return sentinel_layout(
            text.ids, spans, token_ids[OPEN], token_ids[CLOSE], self.cr_sees_prefix, self.evict == "end"
        )

    def decode_policy(self, prompt: Layout, token_ids: dict[str, int], seed: int = 0) -> SentinelPolicy:
        """Generated text is compressed as it is produced: spans of ``decode_span`` tokens at this ratio."""
        return SentinelPolicy(
            prompt, token_ids[OPEN], token_ids[CLOSE], self.ratio, self.decode_span, self.cr_sees_prefix
        )
