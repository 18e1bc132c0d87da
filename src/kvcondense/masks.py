"""Pure mask construction: layout (key expiry) -> 4-D attention mask for the attention backend in use.

No model, no tokenizer. The same :func:`visibility` rule builds the training mask (all queries against all keys)
and the decode-time mask (new queries against the physical slots of an evicting cache), which is what makes the
parallel and the incremental forward agree.
"""

from __future__ import annotations

import torch

from .layout import Layout

SUPPORTED_ATTN = ("sdpa", "eager")


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
    q = q_idx.unsqueeze(-1)
    k = k_idx.unsqueeze(-2)
    exp = k_expire.unsqueeze(-2)
    vis = (k <= q) & (q <= exp) & (k >= q_start.unsqueeze(-1))
    closer = k_closer_only.unsqueeze(-2)
    return vis & (~closer | (q == k) | (q == exp))


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
    raise ValueError(
        f"attention implementation {attn_implementation!r} is not supported; load the model with "
        f"attn_implementation in {SUPPORTED_ATTN}"
    )
