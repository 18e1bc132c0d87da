"""The plain-text chat memory of the baselines (full, window, no-context), beside CCM's compressed one.

Both writers lay out one turn at a time with the same interface (``chunk``, ``tail``, ``state``, ``restore``):
:class:`~kvcondense.methods.ccm.MemoryWriter` for CCM, :class:`TextWriter` here. A method hands out its writer
through :meth:`~kvcondense.methods.base.Method.memory_writer`.
"""

from __future__ import annotations

import torch

from ..layout import IGNORE, NEVER, Layout, text_layout
from .ccm import Piece


class TextWriter:
    """The memory of the plain-text baselines, with :class:`~kvcondense.methods.ccm.MemoryWriter`'s interface.

    - ``full``: every turn is kept as plain text;
    - ``window``: a sliding window of ``window`` tokens plus ``sinks`` first tokens: token ``k`` expires at
      ``k + window``, and the window stops while an answer is written (what
      :func:`kvcondense.methods.baselines.episode_layout` does);
    - ``no-context`` (``keep=False``): nothing is kept, every turn is forgotten at once; an answer sees only its
      own input.

    Positions and logical indices are the count of kept tokens, so the state is the same four numbers as CCM's.
    """

    def __init__(self, keep: bool = True, window: int | None = None, sinks: int = 0):
        self.keep, self.window, self.sinks = keep, window, sinks
        self.next = self.text_pos = self.steps = 0
        self.memory: list[int] = []

    def state(self) -> dict:
        return {"next": self.next, "text_pos": self.text_pos, "steps": self.steps, "memory": []}

    def restore(self, state: dict) -> None:
        self.next, self.text_pos, self.steps = state["next"], state["text_pos"], state["steps"]

    def expiry(self, k: int) -> int:
        return NEVER if self.window is None or k < self.sinks else k + self.window

    def kept(self, next_index: int) -> list[int]:
        """Logical indices stored after ``next_index`` tokens were kept (each chunk evicted what expired)."""
        if not self.keep:
            return []
        if self.window is None:
            return list(range(next_index))
        sinks = min(self.sinks, next_index)
        return list(range(sinks)) + list(range(max(sinks, next_index - self.window), next_index))

    def _text(self, ids: torch.Tensor, expire: torch.Tensor | None) -> Layout:
        lay = text_layout(ids, expire)
        lay.position_ids += self.text_pos
        lay.targets[:] = IGNORE
        self.next += len(ids)
        self.text_pos += len(ids)
        return lay

    def chunk(self, ids: torch.Tensor) -> Piece | None:
        """Lay out one turn (None: nothing is kept)."""
        self.steps += 1
        if not self.keep:
            return None
        first = self.next
        expire = torch.tensor([self.expiry(k) for k in range(first, first + len(ids))], dtype=torch.long)
        return Piece(self._text(ids, expire), first, [], NEVER)

    def tail(self, ids: torch.Tensor) -> Layout:
        return self._text(ids, None)
