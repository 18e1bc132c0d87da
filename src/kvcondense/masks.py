"""Pure mask construction: layout (key expiry) -> 4-D attention mask for the attention backend in use.

No model, no tokenizer. The same :func:`visibility` rule builds the training mask (all queries against all keys)
and the decode-time mask (new queries against the physical slots of an evicting cache), which is what makes the
parallel and the incremental forward agree.
"""

from __future__ import annotations

import torch

from .errors import UsageError
from .layout import Layout

SUPPORTED_ATTN = ("sdpa", "eager", "flex_attention")


def visible(q, k, q_start, k_expire, k_closer_only):
    """The visibility rule, elementwise on broadcastable tensors (SPEC section 0), written once: key ``k`` is
    visible to query ``q`` iff ``k <= q <= expire[k]``, ``k >= start[q]`` and, for a closer-only key, ``q`` is
    ``k`` itself or the query at its expiry. Both the dense masks and flex_attention's ``mask_mod`` call it."""
    return (k <= q) & (q <= k_expire) & (k >= q_start) & (~k_closer_only | (q == k) | (q == k_expire))


def visibility(
    q_idx: torch.Tensor,
    q_start: torch.Tensor,
    k_idx: torch.Tensor,
    k_expire: torch.Tensor,
    k_closer_only: torch.Tensor,
) -> torch.Tensor:
    """Which keys each query may see (SPEC section 0).

    Args:
        q_idx: logical index of each query. (..., Lq)
        q_start: first key index each query may see. (..., Lq)
        k_idx: logical index of each key. (..., Lk)
        k_expire: last query index that may see each key. (..., Lk)
        k_closer_only: keys visible only to themselves and to the query at their expiry. (..., Lk)

    Returns:
        Bool tensor (..., Lq, Lk), True where the query attends to the key.
    """
    return visible(
        q_idx.unsqueeze(-1),
        k_idx.unsqueeze(-2),
        q_start.unsqueeze(-1),
        k_expire.unsqueeze(-2),
        k_closer_only.unsqueeze(-2),
    )


def layout_visibility(layout: Layout) -> torch.Tensor:
    """The (L, L) bool visibility matrix of one layout: row = query, column = key."""
    idx = torch.arange(len(layout))
    return visibility(idx, layout.start, idx, layout.expire, layout.closer_only)


def batch_visibility(layouts: list[Layout], length: int | None = None) -> torch.Tensor:
    """Right-padded (B, L, L) bool visibility. Pad rows see only themselves; pad keys are seen by nobody else."""
    length = length or max(len(x) for x in layouts)
    out = torch.eye(length, dtype=torch.bool).repeat(len(layouts), 1, 1)
    for b, lay in enumerate(layouts):
        n = len(lay)
        out[b, :n, :n] = layout_visibility(lay)
    return out


def padded_spec(layouts: list[Layout], length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded (B, L) expiry spec of several layouts. Pads get expiry -1 and are flagged ``pad``."""
    length = length or max(len(x) for x in layouts)
    b = len(layouts)
    spec = {
        "expire": torch.full((b, length), -1, dtype=torch.long),
        "start": torch.zeros((b, length), dtype=torch.long),
        "closer": torch.zeros((b, length), dtype=torch.bool),
        "pad": torch.ones((b, length), dtype=torch.bool),
    }
    for i, lay in enumerate(layouts):
        n = len(lay)
        spec["expire"][i, :n], spec["start"][i, :n] = lay.expire, lay.start
        spec["closer"][i, :n], spec["pad"][i, :n] = lay.closer_only, False
    return spec


def block_mask(layouts: list[Layout], length: int | None = None, block_size: int = 128, device=None):
    """A flex_attention ``BlockMask`` from the same expiry spec (GPU path for long sequences): blocks in which no
    query sees any key are skipped. Pads see only themselves, as in :func:`batch_visibility`."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = length or max(len(x) for x in layouts)
    spec = {k: v.to(device) for k, v in padded_spec(layouts, length).items()}
    expire, start, closer, pad = spec["expire"], spec["start"], spec["closer"], spec["pad"]

    def mask_mod(b, h, q, k):
        vis = visible(q, k, start[b, q], expire[b, k], closer[b, k])
        return (vis & ~pad[b, q]) | (pad[b, q] & (q == k))

    return create_block_mask(mask_mod, len(layouts), None, length, length, device=device, BLOCK_SIZE=block_size)


def to_attention_mask(visible: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Convert a (B, Lq, Lk) bool visibility into the 4-D mask (B, 1, Lq, Lk) a transformers backend expects.

    sdpa takes a bool mask (True = attend). eager *adds* the mask to the scores, so a bool mask there would be
    silently wrong: it gets an additive float mask (0 where visible, the dtype's minimum elsewhere).
    """
    if attn_implementation == "sdpa":
        return visible.unsqueeze(1)
    if attn_implementation == "eager":
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask.unsqueeze(1)
    raise UsageError(
        f"attention implementation {attn_implementation!r} is not supported; load the model with "
        f"attn_implementation in {SUPPORTED_ATTN}"
    )
