"""Per-layer widths in the evicting cache: each layer stores its own number of a prompt's slots.

A per-head eviction (:mod:`kvcondense.heads`) whose heads keep equally many keys within a layer but a different
number in each layer (``scored --allocate layer``: one ranking over the whole cache decides how many each layer
keeps, Ada-KV / PyramidKV's point that layers need different budgets) leaves layer ``l`` of row ``b`` with
``kept[b, l]`` slots of that *old region*; whatever is fed later is stored by every layer. The cache's one slot
list (the metadata the masks are built from) is as wide as the widest layer, ``W = kept.max()``; layer ``l``
physically stores only the columns ``[0, w_l)`` and ``[W, S)`` of it, ``w_l = kept[:, l].max()`` (a row keeping
fewer is padded, hidden). So memory is freed per layer, and every layer's attention sees exactly its own keys:

- a registered attention wrapper (:func:`layer_attention`) narrows the shared mask to the layer's columns and hides
  a row's padding, then calls the step's own attention (packed sdpa or eager);
- the old region's slots must be alike for every later query (:func:`kvcondense.heads.head_order` checks it): a slot
  position of the old region holds a different token in each layer, so only its expiry, shared by all, is kept.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from .merge import hiding_attention, wrapped_attention

LAYER_WIDTHS = "kvcondense_layer_widths"
"""The registered attention implementation of a step through a cache whose layers store different widths."""


def widths(kept: torch.Tensor) -> torch.Tensor:
    """The old-region width each layer stores, (layers,): the most any row keeps there. ``kept``: (B, layers)."""
    return kept.amax(0)


def present(kept: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, layers, slots) bool: which of the shared slot list's columns a row of each layer really holds."""
    col = torch.arange(slots)
    return (col[None, None] < kept[..., None]) | (col >= int(kept.max()))[None, None]


def to_physical(order: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Shared-list slots (B, layers, ..., S') as each layer's own stored positions (a slot past the old region sits
    ``W - w_l`` earlier in layer ``l``). Slots inside ``[w_l, W)`` do not exist in layer ``l``; the caller never
    asks for them (:func:`present`)."""
    shift = (int(kept.max()) - widths(kept)).view(1, -1, *([1] * (order.dim() - 2)))
    return torch.where(order >= int(kept.max()), order - shift, order)


def _layer_attention(
    module, query, key, value, attention_mask, kvc_kept=None, kvc_widths=(), kvc_base="sdpa", kvc_calls=None, **kw
):
    kept = kvc_kept[:, module.layer_idx]  # (B,), on the model's device
    old, width = max(kvc_widths), kvc_widths[module.layer_idx]  # ints, read once per step (no device sync)
    total = attention_mask.shape[-1]  # the shared slot list and the new tokens
    if key.shape[2] != width + total - old:
        raise RuntimeError(f"layer {module.layer_idx} stores {key.shape[2]} keys, its widths say {width + total - old}")
    device = attention_mask.device
    cols = torch.cat([torch.arange(width, device=device), torch.arange(old, total, device=device)])
    mask = attention_mask.index_select(-1, cols)
    padding = torch.arange(len(cols), device=device)[None] >= kept[:, None]
    padding[:, width:] = False  # (B, keys): a row's slots past its own count in this layer
    return hiding_attention(module, query, key, value, mask, padding[:, None, None], kvc_base, kvc_calls, **kw)


AttentionInterface.register(LAYER_WIDTHS, _layer_attention)


@contextmanager
def layer_attention(model, kept: torch.Tensor | None, n_layers: int):
    """Within the block (inside the step's own attention implementation), a forward through a cache whose layers
    store ``kept`` (B, layers) old-region slots sees each layer's own keys; nothing changes when ``kept`` is None.
    Checks on exit that every layer applied it."""
    if kept is None:
        yield {}
        return
    base = model.config._attn_implementation or "eager"
    kwargs = {"kvc_kept": kept.to(model.device), "kvc_widths": widths(kept).tolist(), "kvc_base": base}
    with wrapped_attention(model, LAYER_WIDTHS, kwargs, n_layers, "per-layer widths applied") as got:
        yield got
