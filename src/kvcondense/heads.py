"""Per-(layer, KV head) expiry: each head of a layer may keep its own keys (SnapKV's per-head choice, Li et al. 2024).

A :class:`~kvcondense.layout.Layout` with ``head_expire`` hides key ``k`` from query ``q`` in head ``(l, h)`` once
``q > head_expire[l, h, k]``, on top of the per-token rule. Both forwards honour it:

- the parallel forward (:func:`head_attention`): the model's attention implementation is switched to a registered
  wrapper that narrows the shared (B, 1, L, L) mask per query head of each layer, then calls sdpa or eager;
- the evicting cache (:func:`head_order`): when the heads of a row let different keys go, each layer gathers, per
  KV head, the slots that head keeps, so a cache row holds the same number of slots in every head and memory is
  really freed. The heads must keep equally many, and what they keep must then be alike for every later query
  (same expiry, not closer-only): a slot position holds a different token in each head.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from .errors import UsageError
from .layer_widths import present, to_physical
from .layout import NEVER, Layout, head_shape
from .merge import hiding_attention, wrapped_attention

HEADS = "kvcondense_heads"
"""The registered attention implementation of a parallel forward whose layouts expire keys per head."""


def _head_attention(module, query, key, value, attention_mask, kvc_heads=None, kvc_base="sdpa", kvc_calls=None, **kw):
    expire = kvc_heads[:, module.layer_idx]  # (B, KV heads, L)
    groups = query.shape[1] // expire.shape[1]
    q_idx = torch.arange(query.shape[2], device=query.device)
    hidden = q_idx[None, None, :, None] > expire.repeat_interleave(groups, 1)[:, :, None, : key.shape[2]]
    return hiding_attention(module, query, key, value, attention_mask, hidden, kvc_base, kvc_calls, **kw)


AttentionInterface.register(HEADS, _head_attention)


def batch_head_expire(layouts: list[Layout], length: int) -> torch.Tensor | None:
    """Right-padded (B, layers, KV heads, L) per-head expiry (pads: NEVER, hidden by the shared mask anyway), or
    None when no layout has one."""
    shape = head_shape(layouts)
    if shape is None:
        return None
    out = torch.full((len(layouts), *shape, length), NEVER, dtype=torch.long)
    for b, lay in enumerate(layouts):
        out[b, ..., : len(lay)] = lay.heads_or_tokens(*shape)
    return out


@contextmanager
def head_attention(model, layouts: list[Layout], length: int, impl: str, n_layers: int):
    """Within the block, a forward called with the yielded kwargs hides keys per head as the layouts' ``head_expire``
    says (nothing changes when no layout has one). ``impl``: the attention to compute with (sdpa or eager). Checks
    on exit that every layer applied it (a family that drops attention kwargs fails loudly)."""
    expire = batch_head_expire(layouts, length)
    if expire is None:
        yield {}
        return
    if impl not in ("sdpa", "eager"):
        raise UsageError(f"per-head expiry runs on sdpa or eager attention, not {impl}; load the model with sdpa")
    kwargs = {"kvc_heads": expire.to(model.device), "kvc_base": impl}
    with wrapped_attention(model, HEADS, kwargs, n_layers, "per-head expiry applied") as got:
        yield got


def head_order(
    slot_idx: torch.Tensor,
    slot_expire: torch.Tensor,
    slot_closer: torch.Tensor,
    head_expire: torch.Tensor,
    nq,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-head compaction of a cache whose heads keep different slots from query ``nq`` (int or (B, 1)) on.

    The heads of a layer must keep equally many slots; layers may keep different numbers (each then stores its own
    width: :mod:`kvcondense.layer_widths`).

    Args:
        slot_idx, slot_expire, slot_closer: (B, S) the cache's slot metadata (logical index -1: invalid).
        head_expire: (B, layers, KV heads, S) each slot's expiry per head.
        kept: (B, layers) the old-region slots each layer stores when the cache has per-layer widths already.

    Returns:
        ``order`` (B, layers, KV heads, S') the stored positions each head keeps, in their order (padding: any
        slot, hidden), the new per-layer counts (B, layers) (None when each row keeps as many in every layer: the
        cache is plain again), and the new (B, S') metadata: logical index (that of a layer keeping the most; -1
        past a row's count), expiry and closer flag, alike in every head.
    """
    limit = nq if isinstance(nq, int) else nq[:, :, None, None]
    keep = (slot_idx >= 0)[:, None, None] & (head_expire >= limit)
    if kept is not None:
        keep &= present(kept, slot_idx.shape[1])[:, :, None]
    count = keep.sum(-1)  # (B, layers, heads)
    if not bool((count == count[..., :1]).all()):
        raise ValueError("per-head eviction needs every head of a layer to keep the same number of keys")
    count = count[..., 0]
    most = count.max(1)
    width = int(most.values.max())
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    rows = torch.arange(order.shape[0])
    ref = order[rows, most.indices, 0]  # (B, S'): the slots of a layer that keeps the most
    valid = torch.arange(width)[None, :] < most.values[:, None]  # (B, S')
    expire, closer = torch.gather(slot_expire, 1, ref), torch.gather(slot_closer, 1, ref)
    flat = order.flatten(1, 2)  # (B, layers * heads, S')
    mine = (torch.arange(width) < count[..., None]).repeat_interleave(order.shape[2], 1)  # each head's own slots
    alike = (
        (torch.gather(slot_expire[:, None].expand(-1, flat.shape[1], -1), 2, flat) == expire[:, None])
        & (torch.gather(slot_closer[:, None].expand(-1, flat.shape[1], -1), 2, flat) == closer[:, None])
        & (torch.gather(head_expire.flatten(1, 2), 2, flat) == expire[:, None])
    )
    if not bool((alike | ~mine).all()):
        raise ValueError("after a per-head eviction the heads' kept keys must share one expiry and not be closer-only")
    mine = mine.view(order.shape)  # padding past a head's own count reads slot 0 (it may not exist in that layer)
    order = torch.where(mine, order, 0)
    if kept is not None:
        order = to_physical(order, kept)
    idx = torch.where(valid, torch.gather(slot_idx, 1, ref), -1)
    plain = bool((count == count[:, :1]).all())
    return order, None if plain else count, idx, torch.where(valid, expire, NEVER), closer & valid


def check_chunk(slot_heads: torch.Tensor | None, slot_expire: torch.Tensor, chunk: Layout, first: int) -> None:
    """Refuse a chunk (logical indices ``first..``) whose queries would go past a per-head expiry that the cache
    has not applied: inside a chunk every head of the cache sees the same slots (the layout's ``cuts`` must end a
    chunk there, as :class:`~kvcondense.methods.scored.ScoredEviction`'s do)."""
    last = first + len(chunk) - 1
    parts = [] if slot_heads is None else [(slot_heads, slot_expire[:, None, None])]
    if chunk.head_expire is not None:
        parts.append((chunk.head_expire, chunk.expire))
    for heads, expire in parts:
        if bool(((heads < expire) & (heads < last)).any()):
            raise ValueError(
                f"a chunk ending at {last} runs past a per-head expiry the cache has not applied: end the chunk "
                "there (Layout.cuts) and evict before feeding on"
            )
