"""Compressed Context Memory: each chunk of an online interaction is folded into ``<COMP>`` memory.

Kim, Yeom, Yun, Song. "Compressed Context Memory for Online Language Model Interaction", ICLR 2024
(arXiv 2312.03414). See SPEC section 3 for the masks, the positions and the training this file implements.

A layout is ``c(1) COMP.. [SUM..] c(2) COMP.. [SUM..] ... tail``: the tail is the query and answer of an episode
(loss on the answer only) or the last, still uncompressed, chunk of a plain text (loss on every text token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..layout import IGNORE, NEVER, Kind, Layout, next_text_targets
from ..merge import MixRules, merge_rates, merge_weights
from .base import Method, TokenizedText

MAX_COMP_TOKENS = 8


def comp_token_names(n: int) -> tuple[str, ...]:
    return tuple(f"<COMP_{i}>" for i in range(n))


@dataclass
class EpisodeTokens:
    """A tokenized episode (see :class:`kvcondense.data.Episode`): chunks, then a query and its answer.

    Attributes:
        chunks: token ids of each context chunk, in order. Each (T_i,) int64.
        query: token ids of the input I(T). (Q,) int64, non-empty: its last token predicts the answer.
        answer: token ids of the output O(T) that is scored. (A,) int64.
        options: token ids of each answer option (classification tasks), empty otherwise.
    """

    chunks: list[torch.Tensor]
    query: torch.Tensor
    answer: torch.Tensor
    options: list[torch.Tensor] = field(default_factory=list)

    def truncated(self, t: int) -> EpisodeTokens:
        """The same episode with only its last ``t`` chunks (t = 0: no context)."""
        return EpisodeTokens(self.chunks[len(self.chunks) - t :] if t else [], self.query, self.answer, self.options)

    def with_answer(self, answer: torch.Tensor) -> EpisodeTokens:
        return EpisodeTokens(self.chunks, self.query, answer, self.options)


def tokenize_episode(episode, tokenizer) -> EpisodeTokens:
    """Tokenize a :class:`kvcondense.data.Episode` piece by piece (no special tokens)."""

    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    if not episode.query:
        raise ValueError("an episode needs a non-empty query: its last token predicts the answer")
    return EpisodeTokens(
        [ids(c) for c in episode.chunks], ids(episode.query), ids(episode.answer), [ids(o) for o in episode.options]
    )


@dataclass
class CCMConcat(Method):
    """Compressed Context Memory, concatenation (Kim et al. 2024): ``Mem(t) = [Mem(t-1); h(t)]``, n slots per chunk.

    Attributes:
        comp_tokens: n, the ``<COMP>`` tokens after each chunk, 1..8.
        recurrent: chunks (and their ``<COMP>`` tokens) see the memory; False is Gisting-online (each chunk
            compressed on its own).
        chunk_tokens: plain text is cut into chunks of this many tokens (episodes come with their own chunks).
    """

    name: ClassVar[str] = "ccm-concat"
    lora_on: ClassVar[tuple[Kind, ...] | None] = (Kind.COMP, Kind.SUM)
    episodic: ClassVar[bool] = True
    merge: ClassVar[bool] = False
    comp_tokens: int = 4
    recurrent: bool = True
    chunk_tokens: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.comp_tokens <= MAX_COMP_TOKENS:
            raise ValueError(
                f"comp tokens must be in 1..{MAX_COMP_TOKENS}, got {self.comp_tokens}; pass --comp-tokens 8"
            )
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk tokens must be >= 1, got {self.chunk_tokens}")

    @property
    def special_tokens(self) -> tuple[str, ...]:  # type: ignore[override]
        return comp_token_names(self.comp_tokens)

    def ema(self) -> float | None:
        return None

    def layout(self, text: TokenizedText | EpisodeTokens, token_ids: dict[str, int], seed: int = 0) -> Layout:
        """Plain text: every full chunk but the last is compressed, every text token is scored. An episode: its
        chunks are compressed, only the answer is scored."""
        comp_ids = [token_ids[t] for t in self.special_tokens]
        if isinstance(text, EpisodeTokens):
            tail = torch.cat([text.query, text.answer])
            targets = torch.full_like(tail, IGNORE)
            targets[len(text.query) - 1 : -1] = text.answer
            return ccm_layout(text.chunks, tail, targets, comp_ids, self.merge, self.recurrent, self.ema())
        n = self.chunk_tokens
        cut = max(0, (len(text) - 1) // n) * n  # the tail keeps at least one token and is never compressed
        chunks = [text.ids[lo : lo + n] for lo in range(0, cut, n)]
        lay = ccm_layout(chunks, text.ids[cut:], None, comp_ids, self.merge, self.recurrent, self.ema())
        lay.targets = next_text_targets(lay.input_ids, lay.kinds)
        return lay


@dataclass
class CCMMerge(CCMConcat):
    """Compressed Context Memory, merge (Kim et al. 2024): ``Mem(t) = (1 - a_t) Mem(t-1) + a_t h(t)``, a constant
    n slots, averaged over post-RoPE keys and values.

    Attributes:
        ema_rate: None for the running mean (a_t = 1/t); a constant rate in (0, 1) for an exponential moving average
            (a_1 = 1 either way).
    """

    name: ClassVar[str] = "ccm-merge"
    merge: ClassVar[bool] = True
    ema_rate: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ema_rate is not None and not 0 < self.ema_rate < 1:
            raise ValueError(f"the EMA rate must be in (0, 1), got {self.ema_rate}")

    def ema(self) -> float | None:
        return self.ema_rate


def ccm_layout(
    chunks: list[torch.Tensor],
    tail: torch.Tensor,
    tail_targets: torch.Tensor | None,
    comp_ids: list[int],
    merge: bool,
    recurrent: bool = True,
    ema: float | None = None,
) -> Layout:
    """Lay out ``c(1) COMP.. [SUM..] ... c(T) COMP.. [SUM..] tail`` (SPEC section 3).

    - chunk t's tokens and its COMP tokens see the memory (``recurrent``) and their own chunk; chunk tokens expire
      at the chunk's last COMP token;
    - concat: COMP tokens never expire; merge: COMP tokens and the previous SUM group expire at the end of this
      chunk's SUM group, whose keys/values are replaced by the merged memory (``meta["mix"]`` in the parallel
      forward, ``meta["mix_online"]`` on the cache, ``meta["cuts"]`` so incremental chunks end after each update);
    - positions skip: text counts text tokens only, the i-th COMP (and SUM) token of a group takes the position
      of the last text token + i;
    - the tail sees the whole memory.
    """
    ids, kinds, pos, expire, start = [], [], [], [], []
    mix, online, cuts, groups = ([], [], []), ([], [], []), [], []
    text_pos, prev_sum = 0, None

    def put(tokens, kind, first_pos, q_start) -> list[int]:
        at = len(ids)
        ids.extend(tokens)
        kinds.extend([int(kind)] * len(tokens))
        pos.extend(range(first_pos, first_pos + len(tokens)))
        expire.extend([NEVER] * len(tokens))
        start.extend([q_start] * len(tokens))
        return list(range(at, len(ids)))

    for t, chunk in enumerate(chunks, 1):
        q_start = 0 if recurrent else len(ids)
        text = put(chunk.tolist(), Kind.TEXT, text_pos, q_start)
        text_pos += len(chunk)
        comp = put(comp_ids, Kind.COMP, text_pos, q_start)
        for k in text:
            expire[k] = comp[-1]
        if not merge:
            continue
        sums = put(comp_ids, Kind.SUM, text_pos, q_start)
        for k in comp + (prev_sum or []):
            expire[k] = sums[-1]
        groups.append(comp)
        weights = merge_weights(t, ema)[t - 1]
        for j, group in enumerate(groups):  # closed form: SUM_t = sum_j w[t, j] COMP_j
            _add(mix, sums, group, float(weights[j]))
        rate = merge_rates(t, ema)[-1]  # recursive form: SUM_t = (1 - a_t) SUM_{t-1} + a_t COMP_t
        _add(online, sums, comp, rate)
        if prev_sum is not None:
            _add(online, sums, prev_sum, 1.0 - rate)
        cuts.append(sums[-1] + 1)
        prev_sum = sums
    put(tail.tolist(), Kind.TEXT, text_pos, 0)
    input_ids = torch.tensor(ids, dtype=torch.long)
    targets = torch.full((len(ids),), IGNORE, dtype=torch.long)
    if tail_targets is not None and len(tail):
        targets[len(ids) - len(tail) :] = tail_targets
    meta = {"mix": _rules(mix), "mix_online": _rules(online), "cuts": cuts} if merge else {}
    return Layout(
        input_ids=input_ids,
        kinds=torch.tensor(kinds, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        expire=torch.tensor(expire, dtype=torch.long),
        start=torch.tensor(start, dtype=torch.long),
        closer_only=torch.zeros(len(ids), dtype=torch.bool),
        targets=targets,
        meta=meta,
    )


def _add(rules: tuple[list, list, list], dst: list[int], src: list[int], weight: float) -> None:
    rules[0].extend(dst), rules[1].extend(src), rules[2].extend([weight] * len(dst))


def _rules(rules: tuple[list, list, list]) -> MixRules:
    return MixRules(
        torch.tensor(rules[0], dtype=torch.long),
        torch.tensor(rules[1], dtype=torch.long),
        torch.tensor(rules[2], dtype=torch.float32),
    )
