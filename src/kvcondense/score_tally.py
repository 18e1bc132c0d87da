"""The scoring pass's attention: the model's own attention, plus each scoring query's attention probabilities on
every key, reduced over the queries of a :class:`Part` and over each KV head's group of query heads, and tallied
per layer across the chunks of a read (:class:`Tally`). Registered as an attention implementation for sdpa and
eager; :mod:`kvcondense.scoring` runs the pass."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .merge import eager_of

SCORING = {"sdpa": "kvcondense_score", "eager": "kvcondense_score_eager"}
"""The registered attention implementations of the scoring pass (see :func:`_scoring_attention`), by the attention
they compute the output with; each is registered with that attention's mask function (a name transformers' mask
registry does not know gets no causal mask at all, which is wrong for a text read over a cache)."""
QUERY_BLOCK = 256
"""Scoring queries handled at once (their probabilities over every key are held in fp32: 256 x T per head)."""


@dataclasses.dataclass(frozen=True)
class Part:
    """The scoring queries ``lo..hi-1`` of the text read, and how their attention on each key is reduced over them
    and over each KV head's group of query heads: ``"sum"`` or ``"max"``. ``keys``: only the keys before this index
    are scored (KVzip's replay scores the text, not its copy; the copy's keys still count in each query's softmax)."""

    lo: int
    hi: int
    reduce: str = "sum"
    keys: int | None = None


class Tally:
    """What one scoring pass collects, by layer: each part's reduced attention (B, KV heads, keys so far), the
    values' norms (if asked) and how many keys the layer held."""

    def __init__(self, parts: tuple[Part, ...], value_norm: bool):
        self.parts, self.value_norm = parts, value_norm
        self.scores: dict[int, list[torch.Tensor | None]] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self.keys: dict[int, int] = {}

    def add(self, layer: int, i: int, got: torch.Tensor) -> None:
        row = self.scores.setdefault(layer, [None] * len(self.parts))
        old = row[i]
        if old is not None:  # earlier chunks saw fewer keys: the later keys had no attention from them
            old = F.pad(old, (0, got.shape[-1] - old.shape[-1]))
            got = torch.maximum(old, got) if self.parts[i].reduce == "max" else old + got
        row[i] = got


def _reduced(query, k, rows: range, first: int, part: Part, scale: float) -> torch.Tensor:
    """The attention of query rows ``rows`` (local indices; absolute = ``first`` + local) on the keys ``k``
    (B, KV heads, T, d) (causal; the first ``part.keys`` of them if set), reduced over those rows and each KV head's
    group of query heads: (B, KV heads, keys). A group's query heads are stacked on the rows of one product with
    their KV head's keys (no copy of the keys per query head)."""
    b, kv_heads, t, d = k.shape
    groups = query.shape[1] // kv_heads
    width = t if part.keys is None else min(t, part.keys)
    op = (lambda x, dim: x.amax(dim)) if part.reduce == "max" else (lambda x, dim: x.sum(dim))
    total = None
    for lo in range(rows.start, rows.stop, QUERY_BLOCK):  # query rows in blocks: bounded memory
        hi = min(lo + QUERY_BLOCK, rows.stop)
        seen = first + hi  # the keys the block's last row sees: every later key is in all its rows' future
        q = query[:, :, lo:hi].float().reshape(b, kv_heads, groups * (hi - lo), d)  # query head h = kv * groups + j
        logits = (q @ k[:, :, :seen].transpose(-1, -2)).mul_(scale).view(b, kv_heads, groups, hi - lo, seen)
        corner = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=logits.device).triu_(1)  # row i: lo..lo+i
        logits[..., first + lo :].masked_fill_(corner, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[..., :width]  # normalised over every key seen; the scored ones kept
        got = op(op(probs, 3), 2)  # over the block's rows, then the group's query heads
        got = F.pad(got, (0, width - got.shape[-1]))  # keys no row of the block sees: no attention
        total = got if total is None else (torch.maximum(total, got) if part.reduce == "max" else total + got)
    return total


def _scoring_attention(module, query, key, value, attention_mask, kvc_tally=None, kvc_base="sdpa", **kw):
    """The model's own attention; besides, for every part of ``kvc_tally`` whose queries are in this call, their
    reduced attention on each key (see :class:`Part`), added to the tally of this layer (the cache holds every
    earlier token of the text, so the first query of the call is token ``keys - queries``)."""
    base = eager_of(module) if kvc_base == "eager" else ALL_ATTENTION_FUNCTIONS[kvc_base]
    out = base(module, query, key, value, attention_mask, **kw)
    t, first = key.shape[2], key.shape[2] - query.shape[2]
    scale = module.scaling if kw.get("scaling") is None else kw["scaling"]
    k = None
    for i, part in enumerate(kvc_tally.parts):
        rows = range(max(part.lo, first) - first, min(part.hi, t) - first)
        if len(rows) <= 0:
            continue
        if k is None:
            k = key.float()  # (B, KV heads, T, d)
        kvc_tally.add(module.layer_idx, i, _reduced(query, k, rows, first, part, scale))
    if kvc_tally.value_norm:
        kvc_tally.norms[module.layer_idx] = value.float().norm(dim=-1)
    kvc_tally.keys[module.layer_idx] = t
    return out


for _name, _mask in ((SCORING["sdpa"], sdpa_mask), (SCORING["eager"], eager_mask)):
    AttentionInterface.register(_name, _scoring_attention)
    AttentionMaskInterface.register(_name, _mask)
