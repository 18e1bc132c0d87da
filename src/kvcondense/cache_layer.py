"""One layer of the evicting cache (:class:`EvictingLayer`): growable key/value buffers on transformers'
``DynamicLayer``, compacted in place when :class:`kvcondense.cache.EvictingCache` frees slots."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class EvictingLayer(DynamicLayer):
    """A dynamic layer with room to grow, whose mask sizes are physical (it stores fewer slots than the logical
    length).

    Keys and values live in buffers with ``spare`` free slots at the end: a decode step writes its token into them
    instead of copying the whole cache (``torch.cat``) as transformers' own layer does, and a compaction gathers
    the kept slots into a fresh buffer with new room. ``keys``/``values`` are views of the used slots; assigning
    them replaces the buffer (no room: the next append makes some). Memory held beyond the used slots is at most
    ``spare`` slots per row (see :meth:`reserved_bytes`).
    """

    spare = 64

    def __init__(self, **kwargs):
        self._used = 0
        super().__init__(**kwargs)

    # the used slots, as views of the buffers
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self._used]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value
        self._used = 0 if value is None or value.dim() < 3 else value.shape[2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, : self._used]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.keys = key_states.new_empty(b, h, 0, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used, n = self._used, key_states.shape[2]
        if used + n > self._keys.shape[2]:  # out of room: a new buffer with ``spare`` free slots after the new ones
            self._keys, self._values = self._grown(self._keys, used, n), self._grown(self._values, used, n)
        self._keys[:, :, used : used + n] = key_states
        self._values[:, :, used : used + n] = value_states
        self._used = used + n
        return self.keys, self.values

    def _grown(self, buf: torch.Tensor, used: int, n: int) -> torch.Tensor:
        b, h, _, d = buf.shape
        out = buf.new_empty(b, h, used + n + self.spare, d)
        out[:, :, :used] = buf[:, :, :used]
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reserved_bytes(self) -> int:
        """Bytes of the key and value buffers, free room included."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values))

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the slots in ``index`` of every row, in that order, in fresh buffers with room to grow (the old
        buffers, and the memory of what was dropped, are freed). ``index``: (B, S'), or (B, KV heads, S') when each
        head keeps its own slots."""
        if not self.is_initialized or self._used == 0:
            return
        b, h, _, d = self._keys.shape
        width = index.shape[-1]
        # gather straight into a buffer with room: the spare slots read slot 0 and are overwritten before use
        padded = torch.nn.functional.pad(index, (0, self.spare))
        per_head = padded if padded.dim() == 3 else padded[:, None]
        gather = per_head[..., None].expand(b, h, width + self.spare, d)
        self._keys = torch.gather(self._keys, 2, gather)
        self._values = torch.gather(self._values, 2, gather)
        self._used = width
