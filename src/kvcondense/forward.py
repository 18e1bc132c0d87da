"""The two ways to run a layout through a model, which must agree:

- :func:`parallel_forward`: one pass over the whole sequence with the dense mask built from key expiry
  (training and fast evaluation);
- :func:`feed`: one chunk through an :class:`~kvcondense.cache.EvictingCache` that frees expired keys after it
  (inference; :mod:`kvcondense.engine` runs prompts and decoding on it, ``incremental_forward`` included).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import EvictingCache
from .errors import UsageError
from .heads import check_chunk, head_attention
from .layer_widths import layer_attention
from .layout import Kind, Layout, text_layout
from .lora import lora_gate
from .masks import batch_visibility, block_mask, to_attention_mask
from .merge import batch_rules, merging_attention
from .models import attention_window


def attn_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def num_layers(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.num_hidden_layers


def pad_layouts(layouts: list[Layout], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ids, positions and kinds of several layouts (pads are text). Returns three (B, L) tensors."""
    length = max(len(x) for x in layouts)
    ids = torch.full((len(layouts), length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(layouts), length), dtype=torch.long)
    kinds = torch.full((len(layouts), length), int(Kind.TEXT), dtype=torch.long)
    for b, lay in enumerate(layouts):
        ids[b, : len(lay)] = lay.input_ids
        pos[b, : len(lay)] = lay.position_ids
        kinds[b, : len(lay)] = lay.kinds
    return ids, pos, kinds


FLEX_MIN_TOKENS = 2048
"""From this length on, ``attention="auto"`` uses flex_attention with a block-sparse mask on CUDA."""
ATTENTION = ("auto", "sdpa", "flex")


def choose_attention(model, length: int, requested: str = "auto") -> str:
    """The attention implementation of one parallel forward.

    ``auto``: the model's own (sdpa or eager), except on CUDA from :data:`FLEX_MIN_TOKENS` tokens on, where an
    sdpa model switches to flex_attention with a ``BlockMask`` that skips hidden blocks. ``flex`` forces it; on
    CPU it has no backward in torch 2.13, so a training forward falls back to sdpa with a warning.
    """
    if requested not in ATTENTION:
        raise UsageError(f"unknown attention {requested!r}; choose one of {ATTENTION}")
    current = attn_implementation(model)
    on_cuda = model.device.type == "cuda"
    if requested == "flex" and not on_cuda and torch.is_grad_enabled():
        warnings.warn("flex_attention has no CPU backward (torch 2.13); training with sdpa instead", stacklevel=3)
        return current
    if requested == "flex" or (requested == "auto" and on_cuda and current == "sdpa" and length >= FLEX_MIN_TOKENS):
        return "flex_attention"
    return current


@contextmanager
def attention_implementation(model, name: str):
    """Temporarily run ``model`` with another registered attention implementation (restored in ``finally``)."""
    before = attn_implementation(model)
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


PACKED_SDPA = "kvcondense_sdpa"
"""The registered attention implementation of incremental steps on an sdpa model (see :func:`_packed_gqa_sdpa`)."""
PACK_MAX_QUERY = 16


def _packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa for a few new tokens against a long cache, without copying the cache.

    transformers' sdpa repeats every key/value head for its query heads (``repeat_kv``, a copy of the whole cache
    per layer) whenever a bool mask is given and more than one token is new; it avoids it only for one token.
    Here the query heads that share a key/value head are stacked along the query axis instead (``g * q`` rows,
    each with its token's mask row), so the cache is read once per key/value head: the same attention, exactly.
    Anything else goes to the library's sdpa unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if (
        groups == 1
        or not 1 < q <= PACK_MAX_QUERY
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.shape[1] != 1
        or kwargs.get("position_bias") is not None
    ):
        return plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    packed = query.reshape(b, kv_heads, groups * q, d)  # query head h = kv * groups + j: rows (j, t) per kv head
    mask = attention_mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(b, 1, groups * q, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(b, heads, q, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, _packed_gqa_sdpa)


def incremental_attention(model) -> str:
    """The attention implementation of a step through the cache: packed GQA on an sdpa model (and on a flex_attention
    one: a step's dense mask over the stored slots is sdpa's), else the model's."""
    current = attn_implementation(model)
    return PACKED_SDPA if current in ("sdpa", "flex_attention") else current


def step_mask_kind(model) -> str:
    """The mask convention of :func:`incremental_attention`: eager's additive mask, or sdpa's bool one."""
    current = attn_implementation(model)
    return "sdpa" if current == "flex_attention" else current


def parallel_forward(model, layouts: list[Layout], attention: str = "auto", **kwargs):
    """One masked forward over right-padded layouts. Returns the model output (logits (B, L, V)).

    ``model`` may be wrapped for distributed training (DDP): the call goes through the wrapper, so gradients are
    synchronised, and attributes are read from the module inside. ``attention``: see :func:`choose_attention`.
    """
    inner = getattr(model, "module", model)
    device = inner.device
    ids, pos, kinds = pad_layouts(layouts)
    per_head = any(lay.head_expire is not None for lay in layouts)
    impl = attn_implementation(inner) if per_head else choose_attention(inner, ids.shape[1], attention)
    if impl == "flex_attention":
        mask = block_mask(layouts, ids.shape[1], device=device)
    else:
        mask = to_attention_mask(batch_visibility(layouts), impl, inner.dtype).to(device)
    rules = batch_rules([lay.mix for lay in layouts])
    if rules is not None and per_head:
        raise UsageError("a layout cannot both merge slots (CCM-merge) and expire keys per head")
    with (
        attention_implementation(inner, impl),
        lora_gate(inner, kinds),
        merging_attention(inner, rules, num_layers(inner)) as mix_kwargs,
        head_attention(inner, layouts, ids.shape[1], impl, num_layers(inner)) as head_kwargs,
    ):
        return model(
            input_ids=ids.to(device),
            position_ids=pos.to(device),
            attention_mask=mask,
            use_cache=False,
            **mix_kwargs,
            **head_kwargs,
            **kwargs,
        )


def can_feed_causally(model, layout: Layout) -> bool:
    """Whether ``layout``, fed from an empty cache, may be read in one pass with the model's own causal attention
    instead of kvcondense's mask: a non-empty :meth:`~kvcondense.layout.Layout.is_causal` layout, within the
    model's :func:`~kvcondense.models.attention_window`, on sdpa (its causal kernel needs no mask tensor; eager
    would build an n x n mask and n x n weights per layer, which chunks bound)."""
    window = attention_window(model)
    return (
        attn_implementation(model) in ("sdpa", "flex_attention")
        and len(layout) > 0
        and layout.is_causal()
        and (window is None or len(layout) <= window)
    )


def chunk_mask(model, cache: EvictingCache, chunk: Layout, first: int) -> torch.Tensor:
    """The 4-D mask of a chunk (logical indices ``first..``) against every row's stored slots and itself.

    All rows share the chunk's layout. Returns (B, 1, n, S + n) for the cache's B rows.
    """
    rows = cache.rows
    q_idx = torch.arange(first, first + len(chunk)).expand(rows, -1)
    vis = cache.visibility(
        q_idx, chunk.start.expand(rows, -1), chunk.expire.expand(rows, -1), chunk.closer_only.expand(rows, -1)
    )
    return to_attention_mask(vis, step_mask_kind(model), model.dtype)


@contextmanager
def writing_into(model, cache: EvictingCache, kinds: torch.Tensor):
    """The setting of a forward that writes into ``cache`` (a chunk or a decode step): the LoRA gated by the tokens'
    ``kinds`` (B, n), the step's attention (packed GQA sdpa; each layer narrowed to its own width when the cache
    has per-layer widths) and the cache open for writing. Yields the extra kwargs of the model call."""
    with (
        lora_gate(model, kinds),
        attention_implementation(model, incremental_attention(model)),
        layer_attention(model, cache.layer_kept, num_layers(model)) as layer_kwargs,
        cache.feeding(),
    ):
        yield layer_kwargs


def feed(
    model,
    cache: EvictingCache,
    chunk: Layout,
    first: int,
    mask: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    logits_rows: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Run one chunk (logical indices ``first..first+len(chunk)-1``) through the cache. The caller evicts.

    ``input_ids`` (B, n) feeds B rows that share the chunk's layout (default: the layout's own ids, one row).
    Returns the chunk's logits (B, n, V), or with ``logits_rows`` (chunk indices) only those rows' (B, k, V):
    the LM head over a 49k vocabulary is a fifth of a small model's prefill, and a prompt needs one row of it.
    ``causal``: the chunk is a whole layout that :func:`can_feed_causally`, on an empty cache; no mask is built
    and the model applies its own causal attention (sdpa's causal kernel, no (n, n) mask tensor).
    """
    device = model.device
    ids = chunk.input_ids.unsqueeze(0) if input_ids is None else input_ids
    if causal and not (cache.physical_length == cache.seen == first == 0 and can_feed_causally(model, chunk)):
        raise ValueError("a causal feed is a whole causal layout on an empty cache, within the attention window")
    if not causal:
        mask = (chunk_mask(model, cache, chunk, first) if mask is None else mask).to(device)
    if chunk.head_expire is not None or cache.slot_heads is not None:
        check_chunk(cache.slot_heads, cache.slot_expire, chunk, first)
    with writing_into(model, cache, chunk.kinds.expand(ids.shape[0], -1)) as layer_kwargs:
        out = model(
            input_ids=ids.to(device),
            position_ids=chunk.position_ids.expand(ids.shape[0], -1).to(device),
            attention_mask=None if causal else mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if logits_rows is None else logits_rows.to(device),
            **layer_kwargs,
        )
    n, rows = len(chunk), ids.shape[0]
    cache.append(
        torch.arange(first, first + n).expand(rows, -1),
        chunk.expire.expand(rows, -1),
        chunk.closer_only.expand(rows, -1),
        None if chunk.head_expire is None else chunk.head_expire.expand(rows, -1, -1, -1),
    )
    if (online := chunk.mix_online) is not None:
        cache.mix(online.within(first, first + n))  # CCM-merge: the memory update, before anything can see it
    return out.logits


def store_read(cache: EvictingCache, layout: Layout, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Store a one-row prompt whose keys and values were computed already (the scoring pass's read: see
    :func:`kvcondense.scoring.prompt_layout`) with its layout's metadata, as :func:`feed` of the whole prompt would
    (logical indices from 0). The caller evicts. ``kv`` is consumed: each layer's entry is dropped once copied (it
    may be a view that holds the scoring pass's longer tensors alive)."""
    with cache.feeding():
        for i in range(len(kv)):
            keys, values = kv[i]
            kv[i] = None
            cache.update(keys, values, i)
    cache.append(
        torch.arange(len(layout))[None],
        layout.expire[None],
        layout.closer_only[None],
        None if layout.head_expire is None else layout.head_expire[None],
    )


def feed_text(model, cache: EvictingCache, ids: torch.Tensor, first: int, position: int) -> torch.Tensor:
    """Plain text ``ids`` through the cache after ``first`` logical tokens, at positions from ``position`` (what
    follows a compressed context: a continuation, a question, an option). Returns its logits (n, V)."""
    piece = text_layout(ids)
    piece.position_ids += position
    return feed(model, cache, piece, first)[0]


def chunk_bounds(layout: Layout, chunk_size: int) -> list[tuple[int, int]]:
    """Chunks of at most ``chunk_size`` positions that also end at every cut the layout asks for (CCM-merge:
    a memory update must be complete before a later token attends to it)."""
    if chunk_size < 1:
        raise UsageError(f"a chunk holds at least one token, got {chunk_size}")
    cuts = sorted({c for c in layout.cuts if 0 < c < len(layout)} | {len(layout)})  # a slice keeps later cuts
    bounds, lo = [], 0
    for cut in cuts:
        while lo < cut:
            hi = min(lo + chunk_size, cut)
            bounds.append((lo, hi))
            lo = hi
    return bounds
