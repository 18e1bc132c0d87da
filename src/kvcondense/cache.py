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
from .cache_state import CacheState
from .errors import UsageError
from .heads import head_order
from .layout import NEVER
from .masks import visibility
from .merge import MixRules, mix_slots


class EvictingCache(CacheState, Cache):
    """KV cache that frees expired keys (copied, stacked and saved by its base
    :class:`~kvcondense.cache_state.CacheState`).

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

    def own_widths(self, num_layers: int) -> torch.Tensor:
        """(B, layers): the slots each layer stores of each row (:attr:`layer_kept`, or every slot)."""
        if self.layer_kept is not None:
            return self.layer_kept
        return torch.full((self.rows, num_layers), self.physical_length, dtype=torch.long)

    @property
    def rows(self) -> int:
        """Number of rows (batch size)."""
        return self.slot_idx.shape[0]

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
        if k_heads is not None and self.slot_heads is None and bool((k_heads == k_expire[:, None, None]).all()):
            k_heads = None  # every head follows the per-slot expiry: nothing per head to apply later
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
