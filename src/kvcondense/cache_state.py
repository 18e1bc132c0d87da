"""Copying, batching and saving an :class:`~kvcondense.cache.EvictingCache` (the methods of its
:class:`CacheState` base): one compressed context continued several ways (:meth:`~CacheState.clone`,
:meth:`~CacheState.snapshot`), one-row caches stacked into a batch, and the whole state as tensors
(:meth:`~CacheState.state_dict` / :meth:`~CacheState.from_state`, what ``kvcondense chat --save`` writes)."""

from __future__ import annotations

from typing import TypeVar

import torch

from .layout import NEVER

C = TypeVar("C", bound="CacheState")  # the class itself (Python 3.10 has no typing.Self)


class CacheState:
    """The state-handling half of :class:`~kvcondense.cache.EvictingCache`: everything here reads or replaces the
    cache's layers and slot metadata as a whole (``slot_idx``, ``slot_expire``, ``slot_closer``, ``slot_heads``,
    ``layer_kept``, ``seen``), never one forward's worth of it."""

    @classmethod
    def stack(cls: type[C], caches: list[C]) -> C:
        """One batched cache from one-row caches of different lengths (shorter rows padded with invalid slots)."""
        width = max(c.physical_length for c in caches)
        out = cls(len(caches[0].layers), batch_size=len(caches))

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)

        out.slot_idx = torch.cat([pad(c.slot_idx, -1) for c in caches])
        out.slot_expire = torch.cat([pad(c.slot_expire, NEVER) for c in caches])
        out.slot_closer = torch.cat([pad(c.slot_closer, False) for c in caches])
        out.seen = max(c.seen for c in caches)
        if any(c.slot_heads is not None for c in caches):
            raise ValueError("stack caches after their prompts: a per-head expiry is still pending in one of them")
        if any(c.layer_kept is not None for c in caches):  # each layer as wide as its widest row
            if any(c.layer_kept is not None and c.physical_length != int(c.layer_kept.max()) for c in caches):
                raise ValueError("stack caches with per-layer widths right after their prompts, before decoding")
            n = len(out.layers)
            out.layer_kept = torch.cat([c.layer_kept if c.layer_kept is not None else c.own_widths(n) for c in caches])
        for i, layer in enumerate(out.layers):
            parts = [c.layers[i] for c in caches]
            w = width if out.layer_kept is None else int(out.layer_kept[:, i].max())
            keys = [torch.nn.functional.pad(p.keys, (0, 0, 0, w - p.keys.shape[2])) for p in parts]
            values = [torch.nn.functional.pad(p.values, (0, 0, 0, w - p.values.shape[2])) for p in parts]
            layer.lazy_initialization(keys[0], values[0])
            layer.keys, layer.values = torch.cat(keys), torch.cat(values)
        return out

    def repeat_rows(self, times: int) -> None:
        """Turn a one-row cache into ``times`` identical rows (benchmarks: a batch with one stored history)."""
        if self.rows != 1:
            raise ValueError("repeat_rows needs a one-row cache")
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.repeat(times, 1, 1, 1)
                layer.values = layer.values.repeat(times, 1, 1, 1)
        self.slot_idx, self.slot_expire = self.slot_idx.repeat(times, 1), self.slot_expire.repeat(times, 1)
        self.slot_closer = self.slot_closer.repeat(times, 1)
        if self.slot_heads is not None:
            self.slot_heads = self.slot_heads.repeat(times, 1, 1, 1)
        if self.layer_kept is not None:
            self.layer_kept = self.layer_kept.repeat(times, 1)

    def clone(self: C) -> C:
        """An independent copy (keys, values and slot metadata): one compressed context, several continuations."""
        copy = type(self)(len(self.layers), self.rows)
        for dst, src in zip(copy.layers, self.layers, strict=True):
            if src.is_initialized:
                dst.lazy_initialization(src.keys, src.values)
                dst.keys, dst.values = src.keys.clone(), src.values.clone()
        copy.seen = self.seen
        copy.slot_idx, copy.slot_expire = self.slot_idx.clone(), self.slot_expire.clone()
        copy.slot_closer = self.slot_closer.clone()
        copy.slot_heads = None if self.slot_heads is None else self.slot_heads.clone()
        copy.layer_kept = None if self.layer_kept is None else self.layer_kept.clone()
        return copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored keys/values (``keys.<layer>``, ``values.<layer>``: (B, H, S, D)) and slot metadata
        (``slot_idx``, ``slot_expire``, ``slot_closer``: (B, S); ``slot_heads``, ``layer_kept`` when set) as tensors;
        ``seen`` is :attr:`seen`."""
        state = {"slot_idx": self.slot_idx, "slot_expire": self.slot_expire, "slot_closer": self.slot_closer}
        if self.slot_heads is not None:
            state["slot_heads"] = self.slot_heads
        if self.layer_kept is not None:
            state["layer_kept"] = self.layer_kept
        for i, layer in enumerate(self.layers):
            if layer.is_initialized:
                state[f"keys.{i}"], state[f"values.{i}"] = layer.keys, layer.values
        return state

    @classmethod
    def from_state(
        cls: type[C], state: dict[str, torch.Tensor], num_layers: int, seen: int, device=None, dtype=None
    ) -> C:
        """A cache holding ``state`` (see :meth:`state_dict`), keys/values moved to ``device`` and ``dtype``."""
        rows = state["slot_idx"].shape[0]
        cache = cls(num_layers, rows)
        cache.slot_idx, cache.slot_expire = state["slot_idx"].long(), state["slot_expire"].long()
        closer = state.get("slot_closer")
        cache.slot_closer = torch.zeros_like(cache.slot_idx, dtype=torch.bool) if closer is None else closer.bool()
        cache.seen = seen
        cache.slot_heads = state["slot_heads"].long() if "slot_heads" in state else None
        cache.layer_kept = state["layer_kept"].long() if "layer_kept" in state else None
        for i, layer in enumerate(cache.layers):
            if f"keys.{i}" in state and cache.physical_length:
                keys, values = state[f"keys.{i}"].to(device, dtype), state[f"values.{i}"].to(device, dtype)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        return cache

    def snapshot(self) -> tuple:
        """A cheap handle to put this cache back later with :meth:`restore`: the key/value buffers are shared,
        not copied (a layer only writes past its used slots or into a fresh buffer), the slot metadata copied."""
        layers = [(la.is_initialized, la._keys, la._values, la._used) for la in self.layers]
        heads = None if self.slot_heads is None else self.slot_heads.clone()
        kept = None if self.layer_kept is None else self.layer_kept.clone()
        slots = (self.slot_idx.clone(), self.slot_expire.clone(), self.slot_closer.clone())
        return layers, slots, heads, kept, self.seen

    def restore(self, snapshot: tuple) -> None:
        """Put the cache back exactly as it was at :meth:`snapshot`."""
        layers, slots, heads, kept, seen = snapshot
        for layer, (initialized, keys, values, used) in zip(self.layers, layers, strict=True):
            layer.is_initialized, layer._keys, layer._values, layer._used = initialized, keys, values, used
        self.slot_idx, self.slot_expire, self.slot_closer = (t.clone() for t in slots)
        self.slot_heads = None if heads is None else heads.clone()
        self.layer_kept = None if kept is None else kept.clone()
        self.seen = seen
