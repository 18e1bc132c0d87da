"""An evicting KV cache on the transformers 5.x Cache API.

Keys that no future query may see (their ``expire`` has passed) are physically removed from every layer. The cache
keeps the **logical** length (tokens processed so far, which drives positions and mask indices) apart from the
**physical** number of stored slots, and stores per slot the metadata the mask needs: logical index, expiry and the
closer-only flag. Rows of a batch may evict different amounts; freed slots at a row's end are marked invalid
(logical index -1) and are never visible. A layout that expires keys per (layer, KV head) adds each slot's expiry
per head until the heads' choices are applied (:mod:`kvcondense.heads`); when the layers keep different numbers,
each layer stores its own width of the prompt (:mod:`kvcondense.layer_widths`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from .cache_layer import EvictingLayer
from .errors import UsageError
from .heads import head_order
from .layout import NEVER
from .masks import visibility
from .merge import MixRules, mix_slots


class EvictingCache(Cache):
    """KV cache that frees expired keys.

    Args:
        num_layers: number of attention layers of the model.
        batch_size: number of rows.
    """

    def __init__(self, num_layers: int, batch_size: int = 1):
        super().__init__(layers=[EvictingLayer() for _ in range(num_layers)])
        self.seen = 0  # logical length: tokens processed so far
        empty = torch.zeros(batch_size, 0, dtype=torch.long)
        self.slot_idx = empty.clone()  # (B, S) logical index of each stored slot, -1 for an invalid slot
        self.slot_expire = empty.clone()  # (B, S)
        self.slot_closer = empty.clone().bool()  # (B, S)
        self.slot_heads: torch.Tensor | None = None  # (B, layers, KV heads, S) per-head expiry, while one differs
        self.layer_kept: torch.Tensor | None = None  # (B, layers) old-region slots per layer, when layers differ
        self._feeding = False  # True only while kvcondense's feed runs the model over this cache

    @contextmanager
    def feeding(self):
        """The model may write into this cache inside this block (kvcondense's feed): the caller records the
        slots' metadata and evicts. Outside it, :meth:`update` refuses."""
        self._feeding = True
        try:
            yield self
        finally:
            self._feeding = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self._feeding:
            raise UsageError(
                "an EvictingCache evicts only when kvcondense feeds it: model.generate or model(...) with it would "
                "store every token and free nothing; generate with kvcondense.generate.generate or the engine "
                "(kvcondense.engine.Stream), which lay the tokens out and free what the method condenses"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- lengths ----------------------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length, so that default positions continue the original count after eviction."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.physical_length + query_length, 0

    @classmethod
    def stack(cls, caches: list[EvictingCache]) -> EvictingCache:
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

    def own_widths(self, num_layers: int) -> torch.Tensor:
        """(B, layers): the slots each layer stores of each row (:attr:`layer_kept`, or every slot)."""
        if self.layer_kept is not None:
            return self.layer_kept
        return torch.full((self.rows, num_layers), self.physical_length, dtype=torch.long)

    @property
    def rows(self) -> int:
        """Number of rows (batch size)."""
        return self.slot_idx.shape[0]

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

    @property
    def physical_length(self) -> int:
        """Number of stored slots per row (including invalid padding slots of ragged rows)."""
        return self.slot_idx.shape[1]

    def stored_slots(self) -> torch.Tensor:
        """Valid stored slots per row, (B,); with per-layer widths the mean over layers, rounded (a per-layer
        allocation of a whole budget gives an integer; a later per-head eviction may not)."""
        valid = (self.slot_idx >= 0).sum(1)
        if self.layer_kept is None:
            return valid
        old = int(self.layer_kept.max())
        tail = (self.slot_idx[:, old:] >= 0).sum(1)
        return (self.layer_kept.double().mean(1) + tail).round().long()

    def kv_bytes(self) -> int:
        """Bytes of the stored keys and values (every stored slot, padding slots of ragged rows included), all
        layers together. The buffers hold up to :attr:`EvictingLayer.spare` more slots per row of free room
        (:meth:`reserved_bytes`)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in self.layers
            if layer.is_initialized
        )

    def reserved_bytes(self) -> int:
        """Bytes of the key and value buffers of all layers, their free room included."""
        return sum(layer.reserved_bytes() for layer in self.layers)

    # -- masks and eviction ----------------------------------------------------------------------------------------
    def visibility(
        self, q_idx: torch.Tensor, q_start: torch.Tensor, k_expire: torch.Tensor, k_closer: torch.Tensor
    ) -> torch.Tensor:
        """Visibility of the new queries against stored slots followed by the new tokens themselves.

        Args:
            q_idx, q_start: (B, n) logical index and first visible key of each new token.
            k_expire, k_closer: (B, n) expiry and closer-only flag of each new token as a key.

        Returns:
            (B, n, S + n) bool.
        """
        k_idx = torch.cat([self.slot_idx, q_idx], 1)
        vis = visibility(
            q_idx,
            q_start,
            k_idx,
            torch.cat([self.slot_expire, k_expire], 1),
            torch.cat([self.slot_closer, k_closer], 1),
        )
        vis = vis & (k_idx >= 0).unsqueeze(1)
        pad = q_idx < 0  # padding of a ragged batch: sees only itself (never a row of nothing: sdpa would NaN)
        if bool(pad.any()):
            vis[:, :, self.physical_length :] |= torch.diag_embed(pad)
        return vis

    def append(
        self, q_idx: torch.Tensor, k_expire: torch.Tensor, k_closer: torch.Tensor, k_heads: torch.Tensor | None = None
    ) -> None:
        """Record the metadata of the tokens a forward pass has just added to every layer (``k_heads``: their expiry
        per layer and KV head, (B, layers, KV heads, n), if it differs from ``k_expire``)."""
        if k_heads is not None or self.slot_heads is not None:
            shape = (k_heads if k_heads is not None else self.slot_heads).shape[1:3]
            old = self.slot_expire[:, None, None].expand(-1, *shape, -1) if self.slot_heads is None else self.slot_heads
            new = k_expire[:, None, None].expand(-1, *shape, -1) if k_heads is None else k_heads
            self.slot_heads = torch.cat([old, new], -1)
        self.slot_idx = torch.cat([self.slot_idx, q_idx], 1)
        self.slot_expire = torch.cat([self.slot_expire, k_expire], 1)
        self.slot_closer = torch.cat([self.slot_closer, k_closer], 1)
        self.seen = int(q_idx.max()) + 1

    def set_expire(self, row: int, logical: torch.Tensor, expire: int) -> None:
        """Give already stored keys an expiry (used when a span closes during generation)."""
        hit = torch.isin(self.slot_idx[row], logical)
        if self.layer_kept is not None:  # the region holds other tokens in each layer, not all named in slot_idx
            after = self.slot_idx[row, int(self.layer_kept.max()) :]
            first = int(after[after >= 0].min()) if bool((after >= 0).any()) else self.seen
            if bool((logical < first).any()):
                raise ValueError("a per-layer region (a prompt each layer kept its own part of) has a fixed expiry")
        self.slot_expire[row, hit] = expire
        if self.slot_heads is not None:
            self.slot_heads[row, ..., hit] = expire

    def clone(self) -> EvictingCache:
        """An independent copy (keys, values and slot metadata): one compressed context, several continuations."""
        copy = EvictingCache(len(self.layers), self.rows)
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
    def from_state(cls, state: dict[str, torch.Tensor], num_layers: int, seen: int, device=None, dtype=None):
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

    def freeze(self) -> None:
        """Keep every stored key for every later query: a compressed context then queried with no further
        compression (the prefix and QA tasks; kvpress's setting). Without this a window's keys would go on
        expiring while the question is read."""
        self.slot_expire = torch.where(self.slot_idx >= 0, torch.full_like(self.slot_expire, NEVER), self.slot_expire)
        if self.slot_heads is not None:
            raise ValueError("freeze a cache after its prompt: a per-head expiry is still pending")

    def mix(self, rules: MixRules) -> None:
        """Apply merge rules (logical indices, the same for every row) to the stored keys and values of every layer:
        CCM-merge's recursive memory update, on post-RoPE keys exactly as stored."""
        if not len(rules):
            return
        if self.layer_kept is not None:
            raise ValueError("merge rules need a cache whose layers store the same slots (no per-layer widths)")

        def slots(logical: torch.Tensor) -> torch.Tensor:  # (B, P) physical slot of each logical index
            hit = self.slot_idx.unsqueeze(-1) == logical.view(1, 1, -1)
            if not bool(hit.any(1).all()):
                raise ValueError("a merge rule refers to a slot that is not stored; feed the whole chunk first")
            return hit.to(torch.int8).argmax(1)

        dst, src = slots(rules.dst), slots(rules.src)
        weight = rules.weight.expand(self.rows, -1)
        for layer in self.layers:
            dev = layer.keys.device
            args = (dst.to(dev), src.to(dev), weight.to(dev))
            layer.keys, layer.values = mix_slots(layer.keys, *args), mix_slots(layer.values, *args)

    def evict(self, next_query: int | torch.Tensor | None = None, slack: int = 0) -> int:
        """Physically free every slot that no query from ``next_query`` on may see. Returns slots freed.

        Freeing copies every layer's K/V, so during decoding (where a window baseline expires a key at nearly
        every step) ``slack`` lets up to that many dead slots per row wait for the next compaction: they are
        already invisible (their expiry has passed), they only occupy memory a little longer.
        """
        nq = self.seen if next_query is None else next_query
        if isinstance(nq, torch.Tensor):  # one next query per row (ragged batches)
            nq = nq.view(-1, 1)
        if self.slot_heads is not None:  # a head lets a stored key go: the heads' own choices apply now
            limit = nq if isinstance(nq, int) else nq[:, :, None, None]
            if bool(((self.slot_heads < limit) & (self.slot_idx >= 0)[:, None, None]).any()):
                return self._evict_heads(nq)
        keep = (self.slot_idx >= 0) & (self.slot_expire >= nq)
        dead = ((self.slot_idx >= 0) & ~keep).sum(1)
        if bool(keep.all()) or int(dead.max()) <= slack:
            return 0
        before = int((self.slot_idx >= 0).sum())
        old = 0 if self.layer_kept is None else int(self.layer_kept.max())
        if bool(((self.slot_idx[:, :old] >= 0) & ~keep[:, :old]).any()):
            raise ValueError("the per-layer region of a cache (a prompt each layer kept its own part of) cannot expire")
        stays = keep.clone()
        stays[:, :old] = True  # the per-layer region keeps its place (padding included), whatever follows
        width = int(stays.sum(1).max())
        # stable order: kept slots first (in their original order), then the rest; cut to the widest row
        order = torch.argsort((~stays).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.gather(keep, 1, order) & (torch.gather(self.slot_idx, 1, order) >= 0)
        self.slot_idx = torch.where(valid, torch.gather(self.slot_idx, 1, order), -1)
        self.slot_expire = torch.where(valid, torch.gather(self.slot_expire, 1, order), NEVER)
        self.slot_closer = torch.gather(self.slot_closer, 1, order) & valid
        if self.slot_heads is not None:
            shape = (-1, *self.slot_heads.shape[1:3], -1)
            self.slot_heads = torch.gather(self.slot_heads, 3, order[:, None, None].expand(shape))
        for i, layer in enumerate(self.layers):
            index = order if self.layer_kept is None else self._layer_index(order, old, i)
            layer.keep(index.to(layer.keys.device) if layer.is_initialized else index)
        return before - int(valid.sum())

    def _layer_index(self, order: torch.Tensor, old: int, layer: int) -> torch.Tensor:
        """A compaction ``order`` of the shared list (its per-layer region kept in place) as layer ``layer``'s own
        stored positions: that layer's width of the region, then the kept slots after it."""
        width = int(self.layer_kept[:, layer].max())
        head = torch.arange(width).expand(order.shape[0], -1)
        return torch.cat([head, order[:, old:] - old + width], 1)

    def _evict_heads(self, nq) -> int:
        """Apply the heads' own choices (see :func:`kvcondense.heads.head_order`): each layer keeps, per KV head,
        the slots that head still needs; afterwards every head follows the per-slot expiry again."""
        before = self.stored_slots().sum()
        order, kept, self.slot_idx, self.slot_expire, self.slot_closer = head_order(
            self.slot_idx, self.slot_expire, self.slot_closer, self.slot_heads, nq, self.layer_kept
        )
        self.slot_heads, self.layer_kept = None, kept
        for i, layer in enumerate(self.layers):
            index = order[:, i] if kept is None else order[:, i, :, : int(kept[:, i].max())]
            layer.keep(index.to(layer.keys.device) if layer.is_initialized else index)
        return int(before - self.stored_slots().sum())
