"""Compressed Context Memory: each chunk of an online interaction is folded into ``<COMP>`` memory.

Kim, Yeom, Yun, Song. "Compressed Context Memory for Online Language Model Interaction", ICLR 2024
(arXiv 2312.03414). See SPEC section 3 for the masks, the positions and the training this file implements.

A layout is ``c(1) COMP.. [SUM..] c(2) COMP.. [SUM..] ... tail``: the tail is the query and answer of an episode
(loss on the answer only) or the last, still uncompressed, chunk of a plain text (loss on every text token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UsageError
from ..layout import IGNORE, NEVER, Kind, Layout, concat, next_text_targets
from ..merge import MixRules, merge_rates, merge_weights
from .base import Method, TokenizedText, param
from .episode import EpisodeTokens

MAX_COMP_TOKENS = 8


def comp_token_names(n: int) -> tuple[str, ...]:
    return tuple(f"<COMP_{i}>" for i in range(n))


@dataclass
class CCMConcat(Method):
    """Compressed Context Memory, concatenation (Kim et al. 2024): ``Mem(t) = [Mem(t-1); h(t)]``, n slots per chunk.

    Attributes:
        comp_tokens: n, the ``<COMP>`` tokens after each chunk, 1..8.
        recurrent: chunks (and their ``<COMP>`` tokens) see the memory; False is Gisting-online (each chunk
            compressed on its own).
        chunk_tokens: plain text is cut into chunks of this many tokens (episodes come with their own chunks).
        window: streaming (plain text): text tokens stay visible for this many later text tokens after their chunk
            is compressed, so a query sees the sinks, the memory and the most recent ``window`` tokens.
        sinks: streaming: the first text tokens that are never evicted (attention sinks).
    """

    name: ClassVar[str] = "ccm-concat"
    lora_on: ClassVar[tuple[Kind, ...] | None] = (Kind.COMP, Kind.SUM)
    inference_params: ClassVar[tuple[str, ...]] = ("window", "sinks")  # streaming is chosen at inference
    merge: ClassVar[bool] = False
    comp_tokens: int = param(4, "<COMP> tokens per chunk, 1..8")
    recurrent: bool = param(
        True, "compress each chunk without seeing the memory (Gisting-online)", flag="--no-recurrent"
    )
    chunk_tokens: int = param(64, "plain text is cut into chunks of N tokens")
    window: int = param(0, "streaming: recent text tokens kept visible")
    sinks: int = param(0, "initial tokens never evicted")

    def memory_writer(self, token_ids: dict[str, int]) -> MemoryWriter:
        """CCM's compressed chat memory: each turn folded into ``<COMP>`` slots (merge: averaged into n)."""
        return MemoryWriter([token_ids[t] for t in self.special_tokens], self.merge, self.recurrent, self.ema())

    def __post_init__(self) -> None:
        if not 1 <= self.comp_tokens <= MAX_COMP_TOKENS:
            raise UsageError(
                f"comp tokens must be in 1..{MAX_COMP_TOKENS}, got {self.comp_tokens}; pass --comp-tokens 8"
            )
        if self.chunk_tokens < 1:
            raise UsageError(f"chunk tokens must be >= 1, got {self.chunk_tokens}")
        if self.window < 0 or self.sinks < 0:
            raise UsageError(f"window and sinks must be >= 0, got {self.window}, {self.sinks}")

    @property
    def special_tokens(self) -> tuple[str, ...]:  # type: ignore[override]
        return comp_token_names(self.comp_tokens)

    def ema(self) -> float | None:
        return None

    def memory_slots(self, steps: int) -> int:
        """KV slots of the memory after ``steps`` chunks (concat: n per chunk; merge: n)."""
        return self.comp_tokens * (1 if self.merge else steps)

    def episode_layout(self, episode: EpisodeTokens, token_ids: dict[str, int]) -> Layout:
        """The episode's chunks compressed, only the answer scored."""
        comp_ids = [token_ids[t] for t in self.special_tokens]
        tail = torch.cat([episode.query, episode.answer])
        targets = torch.full_like(tail, IGNORE)
        targets[len(episode.query) - 1 : -1] = episode.answer
        return ccm_layout(episode.chunks, tail, targets, comp_ids, self.merge, self.recurrent, self.ema())

    def layout(self, text: TokenizedText, token_ids: dict[str, int], seed: int = 0) -> Layout:
        """Plain text: every full chunk but the last is compressed, every text token is scored."""
        comp_ids = [token_ids[t] for t in self.special_tokens]
        n = self.chunk_tokens
        cut = max(0, (len(text) - 1) // n) * n  # the tail keeps at least one token and is never compressed
        chunks = [text.ids[lo : lo + n] for lo in range(0, cut, n)]
        lay = ccm_layout(chunks, text.ids[cut:], None, comp_ids, self.merge, self.recurrent, self.ema())
        lay.targets = next_text_targets(lay.input_ids, lay.kinds)
        if self.window or self.sinks:
            stream_expiry(lay, self.window, self.sinks)
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
    ema_rate: float | None = param(None, "a constant memory update rate instead of 1/t", flag="--ema")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ema_rate is not None and not 0 < self.ema_rate < 1:
            raise UsageError(f"the EMA rate must be in (0, 1), got {self.ema_rate}")

    def ema(self) -> float | None:
        return self.ema_rate


@dataclass
class Piece:
    """One chunk folded into memory by :class:`MemoryWriter`, with absolute (logical) indices.

    Attributes:
        layout: the chunk's tokens, its COMP tokens and (merge) its SUM placeholders; ``layout.mix_online`` holds
            the recursive memory update that :func:`kvcondense.forward.feed` applies to the cache.
        first: logical index of the piece's first token.
        retire: logical indices of earlier slots (the previous memory, merge) that now expire at ``retire_at``.
        retire_at: the new expiry of ``retire``.
    """

    layout: Layout
    first: int
    retire: list[int]
    retire_at: int


class MemoryWriter:
    """The one place of CCM's layout rules (SPEC section 3): lays out chunks one at a time, then a tail.

    - chunk t's tokens and its COMP tokens see the memory (``recurrent``) and their own chunk; chunk tokens expire
      at the chunk's last COMP token;
    - concat: COMP tokens never expire; merge: COMP tokens and the previous SUM group expire at the end of this
      chunk's SUM group, whose keys/values are replaced by the merged memory (recursive rules on the cache; the
      closed form for the parallel forward when ``closed_form``);
    - positions skip: text counts text tokens only, the i-th COMP (and SUM) token of a group takes the position
      of the last text token + i;
    - the tail sees the whole memory and nothing else of the chunks.

    The online session keeps one writer for its whole life; its state is a few integers (and, for merge, the
    current memory's indices), so a turn costs the same at t = 1 and t = 100.
    """

    def __init__(self, comp_ids: list[int], merge: bool, recurrent: bool = True, ema: float | None = None):
        self.comp_ids, self.merge, self.recurrent, self.ema = list(comp_ids), merge, recurrent, ema
        self.next = 0  # logical index of the next token
        self.text_pos = 0  # text tokens so far: the position of the next text token
        self.steps = 0  # chunks compressed so far (t)
        self.memory: list[int] = []  # logical indices of the current merged memory (merge)
        self.closed: list[tuple[list[int], list[float]]] = []  # per step: COMP indices, kept only for closed form

    def state(self) -> dict:
        return {"next": self.next, "text_pos": self.text_pos, "steps": self.steps, "memory": self.memory}

    def restore(self, state: dict) -> None:
        self.next, self.text_pos, self.steps = state["next"], state["text_pos"], state["steps"]
        self.memory = list(state["memory"])

    def _tokens(self, ids: list[int], kind: Kind, first_pos: int, q_start: int, expire: int) -> dict[str, list]:
        n = len(ids)
        return {
            "input_ids": ids,
            "kinds": [int(kind)] * n,
            "position_ids": list(range(first_pos, first_pos + n)),
            "expire": [expire] * n,
            "start": [q_start] * n,
        }

    def chunk(self, ids: torch.Tensor, closed_form: bool = False) -> Piece:
        """Lay out one chunk. With ``closed_form`` the piece's layout also holds the closed-form merge rules."""
        n, first = len(self.comp_ids), self.next
        q_start = 0 if self.recurrent else first
        comp_idx = first + len(ids)
        last_comp = comp_idx + n - 1
        last_sum = last_comp + n if self.merge else NEVER
        parts = [self._tokens(ids.tolist(), Kind.TEXT, self.text_pos, q_start, last_comp)]
        self.text_pos += len(ids)
        parts.append(self._tokens(self.comp_ids, Kind.COMP, self.text_pos, q_start, last_sum))
        comp = list(range(comp_idx, comp_idx + n))
        rules, retire = {}, []
        self.steps += 1
        if self.merge:
            sums = list(range(last_comp + 1, last_comp + 1 + n))
            parts.append(self._tokens(self.comp_ids, Kind.SUM, self.text_pos, q_start, NEVER))
            rate = merge_rates(self.steps, self.ema)[-1]  # recursive: SUM_t = (1 - a_t) SUM_{t-1} + a_t COMP_t
            online = ([], [], [])
            _add(online, sums, comp, rate)
            if self.memory:
                _add(online, sums, self.memory, 1.0 - rate)
            rules = {"mix_online": _rules(online), "cuts": (last_sum + 1,)}
            if closed_form:  # SUM_t = sum_j w[t, j] COMP_j
                self.closed.append(comp)
                weights, mix = merge_weights(self.steps, self.ema)[self.steps - 1], ([], [], [])
                for j, group in enumerate(self.closed):
                    _add(mix, sums, group, float(weights[j]))
                rules["mix"] = _rules(mix)
            retire, self.memory = self.memory, sums
        self.next = first + sum(len(p["input_ids"]) for p in parts)
        return Piece(_layout(parts, rules), first, retire, last_sum)

    def tail(self, ids: torch.Tensor) -> Layout:
        """Text after the memory (a query and its answer, or the live end of a text): kept, sees all memory."""
        lay = _layout([self._tokens(ids.tolist(), Kind.TEXT, self.text_pos, 0, NEVER)], {})
        self.text_pos += len(ids)
        self.next += len(ids)
        return lay


def _layout(parts: list[dict[str, list]], rules: dict) -> Layout:
    cols = {k: torch.tensor([v for p in parts for v in p[k]], dtype=torch.long) for k in parts[0]}
    n = cols["input_ids"].shape[0]
    return Layout(
        **cols,
        closer_only=torch.zeros(n, dtype=torch.bool),
        targets=torch.full((n,), IGNORE, dtype=torch.long),
        **rules,
    )


def ccm_layout(
    chunks: list[torch.Tensor],
    tail: torch.Tensor,
    tail_targets: torch.Tensor | None,
    comp_ids: list[int],
    merge: bool,
    recurrent: bool = True,
    ema: float | None = None,
) -> Layout:
    """Lay out a whole episode ``c(1) COMP.. [SUM..] ... c(T) COMP.. [SUM..] tail`` for the parallel forward
    (see :class:`MemoryWriter`). Merge layouts carry ``mix`` (closed form, parallel forward),
    ``mix_online`` (recursive, cache) and ``cuts`` (incremental chunks end after each update)."""
    writer = MemoryWriter(comp_ids, merge, recurrent, ema)
    pieces = [writer.chunk(c, closed_form=True) for c in chunks]
    lay = concat([p.layout for p in pieces] + [writer.tail(tail)])  # concat adds up the rules and the cuts
    for p in pieces:
        lay.expire[p.retire] = p.retire_at
    if tail_targets is not None and len(tail):
        lay.targets[len(lay) - len(tail) :] = tail_targets
    return lay


def stream_expiry(lay: Layout, window: int, sinks: int) -> None:
    """Streaming: keep the first ``sinks`` text tokens forever and every text token visible until ``window`` more
    text tokens have come (on top of its chunk's compression). Text at rank r expires at the index of the text
    token of rank r + window."""
    text = torch.nonzero(lay.kinds == Kind.TEXT).flatten()
    later = torch.full_like(text, NEVER)
    if window < len(text):
        later[: len(text) - window] = text[window:]
    later[:sinks] = NEVER
    lay.expire[text] = torch.maximum(lay.expire[text], later)


def _add(rules: tuple[list, list, list], dst: list[int], src: list[int], weight: float) -> None:
    rules[0].extend(dst), rules[1].extend(src), rules[2].extend([weight] * len(dst))


def _rules(rules: tuple[list, list, list]) -> MixRules:
    return MixRules(
        torch.tensor(rules[0], dtype=torch.long),
        torch.tensor(rules[1], dtype=torch.long),
        torch.tensor(rules[2], dtype=torch.float32),
    )
