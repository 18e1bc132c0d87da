"""Decode-time layout policies: how a method lays out the tokens it generates, one text token at a time.

A policy returns, for each generated text token, a small :class:`~kvcondense.layout.Layout` piece (the token plus
any special tokens placed around it, with absolute indices) and expiry updates for keys already in the cache
(a sentinel span closing frees tokens generated earlier). Feeding these pieces through the evicting cache gives
exactly what the parallel forward over the final layout gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layout import IGNORE, NEVER, Kind, Layout


@dataclass
class Piece:
    """One decode step: the layout piece to feed, the row whose logits predict the next token, and expiry
    updates ``(logical indices, expire)`` for keys already stored."""

    layout: Layout
    next_row: int
    updates: list[tuple[torch.Tensor, int]]


def piece(rows: list[dict]) -> Layout:
    """A layout from row dicts with keys id, kind, pos, expire, start, closer."""
    return Layout(
        input_ids=torch.tensor([r["id"] for r in rows], dtype=torch.long),
        kinds=torch.tensor([int(r["kind"]) for r in rows], dtype=torch.long),
        position_ids=torch.tensor([r["pos"] for r in rows], dtype=torch.long),
        expire=torch.tensor([r["expire"] for r in rows], dtype=torch.long),
        start=torch.tensor([r["start"] for r in rows], dtype=torch.long),
        closer_only=torch.tensor([r["closer"] for r in rows], dtype=torch.bool),
        targets=torch.full((len(rows),), IGNORE, dtype=torch.long),
    )


class TextPolicy:
    """Plain text tokens whose expiry is a function of their logical index (all the baselines)."""

    def __init__(self, prompt: Layout, expiry: Callable[[int], int]):
        self.index = len(prompt)
        self.n_text = prompt.n_text
        self.expiry = expiry

    def step(self, token: int) -> Piece:
        row = {
            "id": token,
            "kind": Kind.TEXT,
            "pos": self.n_text,
            "expire": self.expiry(self.index),
            "start": 0,
            "closer": False,
        }
        self.index += 1
        self.n_text += 1
        return Piece(piece([row]), 0, [])


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

    def step(self, token: int) -> Piece:
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
        return Piece(piece(rows), next_row, updates)


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

    def step(self, token: int) -> Piece:
        if token in self.gist_ids:  # the model closed the sentence: force the whole block
            updates = self._block(rows := [])
            return Piece(piece(rows), len(rows) - 1, updates)
        rows = [{"id": token, "kind": Kind.TEXT, "pos": self.index, "expire": NEVER, "start": 0, "closer": False}]
        self.sentence.append(self.index)
        self.index += 1
        self.run += 1
        updates = self._block(rows) if self.run == self.max_sentence_tokens else []
        return Piece(piece(rows), len(rows) - 1, updates)
