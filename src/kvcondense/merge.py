"""CCM-merge: placeholder slots whose keys and values are a weighted sum of other slots, in every layer, after RoPE.

Kim et al. (ICLR 2024) keep a constant-size memory ``Mem(t) = (1 - a_t) Mem(t-1) + a_t h(t)``, where ``h(t)`` are
the per-layer keys/values of the ``<COMP>`` tokens of chunk ``t``. Training runs the whole episode in one pass:
after each chunk's ``<COMP>`` tokens come ``n`` ``<SUM>`` placeholders whose keys/values are replaced by the
closed form ``sum_j w[t, j] h(j)``. Inference applies the recursive form to the evicting cache. Both are a
:class:`MixRules`: ``slot dst := sum of weight * slot src``.

The replacement inside the model goes through transformers' own extension point (``AttentionInterface``): while
:func:`merging_attention` is active, the model's attention implementation is a registered wrapper that mixes the
keys/values it receives (post-RoPE, before the GQA repeat) and calls the original implementation.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


# ------------------------------------------------------------------------------------------------------------ weights
def merge_rates(steps: int, ema: float | None = None) -> list[float]:
    """The update rate a_t of steps t = 1..steps: a_1 = 1, then 1/t (running mean) or the constant ``ema``."""
    return [1.0 if t == 1 else (1.0 / t if ema is None else ema) for t in range(1, steps + 1)]


def merge_weights(steps: int, ema: float | None = None) -> torch.Tensor:
    """Closed-form weights (steps, steps), lower triangular: row t holds the weight of h(j) in Mem(t).

    ``w[t, j] = a_j * prod_{k=j+1..t} (1 - a_k)``: for the running mean every row is uniform (1/t each).
    """
    rates = merge_rates(steps, ema)
    w = torch.zeros(steps, steps, dtype=torch.float64)
    for t in range(steps):
        keep = 1.0  # product of (1 - a_k) for k = j+1..t, built from j = t downwards
        for j in range(t, -1, -1):
            w[t, j] = rates[j] * keep
            keep *= 1.0 - rates[j]
    return w


@dataclass
class MixRules:
    """``slot dst[p] += weight[p] * slot src[p]`` for every p; a slot that is some rule's dst is replaced by the
    sum of its rules. Indices are absolute positions of a layout. All (P,)."""

    dst: torch.Tensor
    src: torch.Tensor
    weight: torch.Tensor

    def within(self, lo: int, hi: int) -> MixRules:
        """The rules whose destination lies in ``lo..hi-1``."""
        keep = (self.dst >= lo) & (self.dst < hi)
        return MixRules(self.dst[keep], self.src[keep], self.weight[keep])

    def __len__(self) -> int:
        return self.dst.shape[0]

    def __add__(self, other: MixRules) -> MixRules:
        return MixRules(*(torch.cat([getattr(self, f), getattr(other, f)]) for f in ("dst", "src", "weight")))


def mix_slots(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Replace slots of ``x`` (B, H, S, D) by weighted sums of other slots.

    Args:
        dst, src: (B, P) slot indices per row (rules of weight 0 are padding).
        weight: (B, P).

    Returns:
        (B, H, S, D): ``x`` with every destination slot replaced by the sum of its rules.
    """
    b, h, _, d = x.shape
    p = dst.shape[1]
    src_x = torch.gather(x, 2, src[:, None, :, None].expand(b, h, p, d)) * weight.to(x.dtype)[:, None, :, None]
    mixed = torch.zeros_like(x).scatter_add(2, dst[:, None, :, None].expand(b, h, p, d), src_x)
    is_dst = torch.zeros(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    is_dst.scatter_(1, dst, weight != 0)
    return torch.where(is_dst[:, None, :, None], mixed, x)


def batch_rules(rules: list[MixRules | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Pad per-row rules into (B, P) dst, src, weight (padding: weight 0 on slot 0). None when no row mixes."""
    if not any(r is not None and len(r) for r in rules):
        return None
    width = max(len(r) if r is not None else 0 for r in rules)
    dst = torch.zeros(len(rules), width, dtype=torch.long)
    src = torch.zeros(len(rules), width, dtype=torch.long)
    weight = torch.zeros(len(rules), width, dtype=torch.float32)
    for b, r in enumerate(rules):
        if r is not None and len(r):
            dst[b, : len(r)], src[b, : len(r)], weight[b, : len(r)] = r.dst, r.src, r.weight
    return dst, src, weight


# ---------------------------------------------------------------------------------------------------------- attention
MERGING = "kvcondense_merge"  # the registered attention implementation that mixes keys/values


def eager_of(module) -> callable:
    """The eager attention function of ``module``'s modeling file (eager is per family, not in the registry)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def hiding_attention(module, query, key, value, mask, hidden, kvc_base: str, kvc_calls: list, **kwargs):
    """Run the base attention ``kvc_base`` (sdpa, eager, or a registered one) with ``hidden`` (broadcast to
    ``mask``) hidden in the bool or additive ``mask``, the call recorded in ``kvc_calls`` (the wrappers of
    :mod:`kvcondense.heads` and :mod:`kvcondense.layer_widths`)."""
    if mask.dtype == torch.bool:
        mask = mask & ~hidden
    else:
        mask = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
    kvc_calls.append(module.layer_idx)
    base = eager_of(module) if kvc_base == "eager" else ALL_ATTENTION_FUNCTIONS[kvc_base]
    return base(module, query, key, value, mask, **kwargs)


def _mixing_attention(
    module, query, key, value, attention_mask, kvc_mix=None, kvc_base="sdpa", kvc_calls=None, **kwargs
):
    if kvc_mix is not None:
        dst, src, weight = kvc_mix
        key, value = mix_slots(key, dst, src, weight), mix_slots(value, dst, src, weight)
        kvc_calls.append(1)  # the list belongs to the merging_attention block that made these kwargs
    base = eager_of(module) if kvc_base == "eager" else ALL_ATTENTION_FUNCTIONS[kvc_base]
    return base(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(MERGING, _mixing_attention)


@contextmanager
def merging_attention(model, rules: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, n_layers: int):
    """Within the block, forward calls made with ``**kwargs`` from :func:`mix_kwargs` mix keys/values after RoPE.

    Switches the model's attention implementation to the registered wrapper and restores it in ``finally``; on exit,
    checks that every layer really mixed (a family whose layers drop attention kwargs fails loudly, not silently).
    """
    if rules is None:
        yield {}
        return
    base = model.config._attn_implementation or "eager"
    kwargs = {"kvc_mix": tuple(t.to(model.device) for t in rules), "kvc_base": base}
    with wrapped_attention(model, MERGING, kwargs, n_layers, "ccm-merge mixed keys", "use ccm-concat") as got:
        yield got


@contextmanager
def wrapped_attention(model, name: str, kwargs: dict, n_layers: int, what: str, fix: str = ""):
    """Within the block, ``model``'s attention runs through the registered wrapper ``name`` (restored in
    ``finally``); the block gets ``kwargs`` plus ``kvc_calls``, a list each wrapper call appends to, and on exit
    every layer must have made one (a family whose layers drop attention kwargs fails loudly, not silently)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    calls: list[int] = []
    try:
        yield {**kwargs, "kvc_calls": calls}
    finally:
        config._attn_implementation = before
    if len(calls) != n_layers:
        raise RuntimeError(
            f"{what} in {len(calls)} of {n_layers} layers: this model family does not pass attention kwargs "
            f"through{'; ' + fix if fix else ''}"
        )
