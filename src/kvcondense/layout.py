"""The data contract between methods, masks, the cache, training and evaluation.

A :class:`Layout` describes one sequence after a method has inserted its special tokens. Every method in the
package (and every baseline) is expressed through four per-token arrays, which is all a mask builder and an
evicting cache need (SPEC section 0):

- ``expire[k]``: the last query index that may see key ``k``. Keys that stay forever hold :data:`NEVER`. An evicting
  cache frees key ``k`` right after position ``expire[k]`` has been processed.
- ``start[q]``: the smallest key index query ``q`` may see (0 for ordinary tokens). Sentinel ``<CR>`` rows use it to
  see only their own span.
- ``closer_only[k]``: key ``k`` is visible only to itself and to the query at ``expire[k]`` (the sentinel ``<CL>``:
  its span tokens do not see it, its ``<CR>`` does).
- ``position_ids``: the positions fed to the model (RoPE or learned), which need not be ``arange``.

A layout may also give each key an expiry per (layer, KV head), ``head_expire``: a key then stays visible to a
query in a head only while both its ``expire`` and its head's expiry allow it, and ``expire`` is the latest of its
heads' (the cache frees a slot once every head has let it go; SnapKV's per-head choice of kept prompt tokens).

Key ``k`` is visible to query ``q`` iff ``k <= q``, ``q <= expire[k]``, ``k >= start[q]`` and
(``not closer_only[k]`` or ``q in (k, expire[k])``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .merge import MixRules

NEVER = torch.iinfo(torch.int64).max
"""Expiry of a key that is never evicted."""

IGNORE = -100
"""Target value for positions that carry no loss (the ``ignore_index`` of cross-entropy)."""


class Kind(IntEnum):
    """What each token of a layout is. Only ``TEXT`` tokens are scored for perplexity."""

    TEXT = 0
    OPEN = 1  # sentinel <CL>
    CLOSE = 2  # sentinel <CR>
    GIST = 3
    COMP = 4
    SUM = 5


@dataclass(eq=False)
class Layout:
    """One sequence with its special tokens and its visibility rules. All fields are 1-D tensors of length L.

    Attributes:
        input_ids: token ids, special tokens included. (L,) int64.
        kinds: a :class:`Kind` per token. (L,) int64.
        position_ids: positions given to the model. (L,) int64.
        expire: last query index allowed to see each key, :data:`NEVER` for permanent keys. (L,) int64.
        start: first key index each query may see. (L,) int64.
        closer_only: keys visible only to themselves and to the query at their expiry. (L,) bool.
        targets: the token id each position must predict, or :data:`IGNORE`. Already shifted. (L,) int64.
        mix: CCM-merge only: slots rebuilt as weighted sums of other slots, closed form over the whole layout
            (the parallel forward), absolute indices.
        mix_online: CCM-merge only: the same update applied recursively as the cache is fed (the incremental
            forward), absolute indices.
        cuts: indices where an incremental chunk must end (a memory update is complete before anything reads it).
        head_expire: the expiry of each key per layer and KV head, or None (every head follows ``expire``).
            (layers, KV heads, L) int64, whose maximum over the heads is ``expire``.
    """

    input_ids: torch.Tensor
    kinds: torch.Tensor
    position_ids: torch.Tensor
    expire: torch.Tensor
    start: torch.Tensor
    closer_only: torch.Tensor
    targets: torch.Tensor
    mix: MixRules | None = None
    mix_online: MixRules | None = None
    cuts: tuple[int, ...] = ()
    head_expire: torch.Tensor | None = None

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        """The per-token tensor fields, in order: the one list of them."""
        return tuple(f.name for f in fields(cls) if f.type == "torch.Tensor")

    def __post_init__(self) -> None:
        n = self.input_ids.shape
        for name in self.tensor_fields()[1:]:
            if getattr(self, name).shape != n:
                raise ValueError(f"Layout.{name} has shape {tuple(getattr(self, name).shape)}, expected {tuple(n)}")
        heads = self.head_expire
        if heads is not None:
            if heads.dim() != 3 or heads.shape[-1] != n[0] or not heads.amax((0, 1)).equal(self.expire):
                raise ValueError("Layout.head_expire must be (layers, KV heads, L), its maximum over heads = expire")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_text(self) -> int:
        """Number of text tokens (what a full-attention model would store)."""
        return int((self.kinds == Kind.TEXT).sum())

    def kept_slots(self, upto: int | None = None) -> int:
        """Number of KV slots an evicting cache holds after processing positions ``0..upto`` (default: all): with
        per-head expiry, the slots of each layer's fullest head (every head of a layer holds that many), averaged
        over layers and rounded (layers may hold different numbers: :mod:`kvcondense.layer_widths`)."""
        last = len(self) - 1 if upto is None else upto
        if self.head_expire is not None:
            per_layer = (self.head_expire[..., : last + 1] > last).sum(-1).amax(-1)
            return int(per_layer.double().mean().round())
        return int((self.expire[: last + 1] > last).sum())

    def heads_or_tokens(self, layers: int, heads: int) -> torch.Tensor:
        """The per-head expiry (layers, heads, L): ``head_expire``, or ``expire`` in every head when there is none."""
        if self.head_expire is not None:
            return self.head_expire
        return self.expire.expand(layers, heads, -1)

    def is_causal(self) -> bool:
        """Whether this layout, fed from an empty cache, is plain causal attention: positions 0, 1, 2, ..., every
        key seen by every later query to the end, nothing merged or cut. Its mask is then transformers' own causal
        one, which the attention kernel applies without a mask tensor (see :class:`kvcondense.engine.Stream`)."""
        n = len(self)
        return (
            torch.equal(self.position_ids, torch.arange(n))
            and bool((self.start == 0).all())
            and bool((self.expire >= n - 1).all())
            and not bool(self.closer_only.any())
            and (self.head_expire is None or bool((self.head_expire >= n - 1).all()))
            and self.mix is None
            and self.mix_online is None
            and not self.cuts
        )

    def compression_ratio(self) -> float:
        """Measured KV kept: stored slots at the end / text tokens (what full attention would store)."""
        return self.kept_slots() / max(1, self.n_text)

    def slice(self, lo: int, hi: int) -> Layout:
        """Positions ``lo..hi-1`` of this layout, with indices kept absolute (used to feed a cache in chunks)."""
        tensors = {k: getattr(self, k)[lo:hi] for k in self.tensor_fields()}
        heads = None if self.head_expire is None else self.head_expire[..., lo:hi]
        return Layout(**tensors, mix=self.mix, mix_online=self.mix_online, cuts=self.cuts, head_expire=heads)


def text_layout(input_ids: torch.Tensor, expire: torch.Tensor | None = None) -> Layout:
    """A layout of plain text tokens with causal next-token targets and optional per-key expiry."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    n = ids.shape[0]
    targets = torch.full((n,), IGNORE, dtype=torch.long)
    targets[:-1] = ids[1:]
    return Layout(
        input_ids=ids,
        kinds=torch.full((n,), Kind.TEXT, dtype=torch.long),
        position_ids=torch.arange(n),
        expire=torch.full((n,), NEVER, dtype=torch.long) if expire is None else expire.long(),
        start=torch.zeros(n, dtype=torch.long),
        closer_only=torch.zeros(n, dtype=torch.bool),
        targets=targets,
    )


def with_continuation(prompt: Layout, ids: torch.Tensor) -> Layout:
    """``prompt`` followed by plain text ``ids`` that reads what the prompt left (indices and positions after its
    own: a continuation after a compressed context), every text token predicting the next text token."""
    piece = text_layout(ids)
    n = len(prompt)
    piece.position_ids += int(prompt.position_ids.max()) + 1 if n else 0
    joined = concat([prompt, piece])
    joined.targets = next_text_targets(joined.input_ids, joined.kinds)
    return joined


def next_text_targets(input_ids: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Targets where each text token predicts the next *text* token, skipping special tokens in between.

    Special tokens predict nothing and are never targets. This is the sentinel loss rule, correct also for
    adjacent spans (``c <CR> <CL> d``: ``c`` predicts ``d``).
    """
    targets = torch.full_like(input_ids, IGNORE)
    text_idx = torch.nonzero(kinds == Kind.TEXT).flatten()
    if text_idx.numel() > 1:
        targets[text_idx[:-1]] = input_ids[text_idx[1:]]
    return targets


def head_shape(layouts: list[Layout]) -> tuple[int, int] | None:
    """(layers, KV heads) of the per-head expiry of any of ``layouts``, or None when none has one."""
    return next((tuple(x.head_expire.shape[:2]) for x in layouts if x.head_expire is not None), None)


def concat(layouts: list[Layout]) -> Layout:
    """Join layouts whose indices are already absolute (a prompt layout followed by decode pieces)."""

    def joined(rules):
        rules = [r for r in rules if r is not None]
        return sum(rules[1:], rules[0]) if rules else None

    shape = head_shape(layouts)
    heads = None if shape is None else torch.cat([x.heads_or_tokens(*shape) for x in layouts], -1)
    return Layout(
        **{k: torch.cat([getattr(x, k) for x in layouts]) for k in Layout.tensor_fields()},
        mix=joined(x.mix for x in layouts),
        mix_online=joined(x.mix_online for x in layouts),
        cuts=tuple(c for x in layouts for c in x.cuts),
        head_expire=heads,
    )
