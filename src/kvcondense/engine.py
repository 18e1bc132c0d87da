"""The decode engine: the one place where tokens are fed through an evicting cache.

A :class:`Stream` holds the rows of one decode: the cache, each row's decode policy (the method's rule for the
tokens it generates) and each row's logical length. :meth:`Stream.prefill` lays a prompt out with its method and
feeds it chunk by chunk, freeing what expires; :meth:`Stream.step` feeds one token per row, with whatever special
tokens the policy places around it, applies the expiry the policy decided for keys already stored, and frees what
expired, rows of different lengths included. :func:`generate_step` is the token loop on top (mlx-lm's shape):
``generate``, ``generate_batch``, ``bench``, :class:`~kvcondense.session.MemorySession`, the QA task and the
equivalence tests all drive it, so sampling and stopping are written once.

    stream = Stream(model, method, token_ids)
    logits = stream.prefill(tokenize("Some long document ...", tokenizer))
    for (token,) in generate_step(stream, logits, max_new_tokens=32, eos_token_id=tokenizer.eos_token_id):
        print(tokenizer.decode([token]), end="")
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .cache import EvictingCache
from .errors import UsageError
from .forward import can_feed_causally, chunk_bounds, feed, num_layers, step_mask_kind, store_read, writing_into
from .layout import Kind, Layout
from .masks import to_attention_mask
from .methods import Method, StepPiece, TokenizedText
from .models import check_positions, learned_positions
from .sampling import Sampling
from .scoring import prompt_layout

PREFILL_CHUNK = 512
"""Default tokens per prefill forward: the peak stored KV is what is kept plus one chunk, and on 2 CPU cores chunks
of 64 made a 1024-token prefill 2.3x slower than chunks of 512 (``benchmarks/prefill.py --chunk 64``)."""


@dataclass
class IncrementalStats:
    """What the evicting cache held while a layout was fed through it."""

    logical_tokens: int
    stored_slots: int
    peak_slots: int
    kv_bytes: int
    peak_kv_bytes: int


@dataclass
class Step:
    """What one :meth:`Stream.step` fed: each row's piece (None for a row that fed nothing) and the logits of the
    rows that predict each row's next token (B, V)."""

    pieces: list[StepPiece | None]
    logits: torch.Tensor


class Stream:
    """The rows of one decode over an evicting cache.

    Args:
        model: the model (with the method's adapters and token rows, if any).
        method: the compression method whose rule lays out prompts and generated tokens (None: prompts come as
            layouts and nothing is decoded after them).
        token_ids: the special tokens' ids.
        cache: continue an existing cache (default: a new empty one).
        slack: dead slots allowed to wait for a batched compaction while decoding (see
            :meth:`EvictingCache.evict`); 0 frees every expired key at once.
        policy: decode a one-row ``cache`` filled elsewhere with this policy (default: the one :meth:`prefill`
            sets up), from logical index ``seen`` on (default: the cache's).

    A stream has either one policy per cache row (rows decode independently, pieces of different lengths are
    padded) or one policy shared by every row (:meth:`repeat`: identical rows, the benchmarks' batch).
    """

    def __init__(
        self,
        model,
        method: Method | None,
        token_ids: dict[str, int],
        cache: EvictingCache | None = None,
        slack: int = 0,
        policy=None,
        seen: int | None = None,
    ):
        self.model, self.method, self.token_ids, self.slack = model, method, token_ids, slack
        self.cache = cache if cache is not None else EvictingCache(num_layers(model))
        self.policies: list = [] if policy is None else [policy]
        self.seen: list[int] = [self.cache.seen if seen is None else seen] * self.cache.rows
        self.layouts: list[Layout] = []
        self.peak_kv_bytes = self.peak_slots = 0
        self.position_table = learned_positions(model)  # GPT-2's: a position past it is an error, not extrapolated

    # -- prompts ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        prompt: TokenizedText | Layout,
        chunk_tokens: int = PREFILL_CHUNK,
        seed: int = 0,
        keep_logits: bool = False,
    ) -> torch.Tensor:
        """Lay out a one-row prompt (unless it is a layout already), feed it in chunks of ``chunk_tokens``, free
        what expires after each, and set up the decode policy that continues it. A prompt that frees nothing
        before its end (:meth:`~kvcondense.layout.Layout.is_causal`: full attention) is read in one pass with the
        model's own causal attention instead, on an sdpa model (:func:`~kvcondense.forward.can_feed_causally`):
        chunks would bound no KV (every key is kept), only activations, as transformers' own prefill.

        Returns the logits of the row that predicts the first new token (V,), or with ``keep_logits`` those of
        every row of the layout (L, V).
        """
        if self.cache.rows != 1:
            raise ValueError("prefill feeds one row; stack one-row streams with Stream.batch")
        if self.seen[0] != 0:  # a layout's expiry and starts are indices from its own first token
            raise ValueError("prefill starts a stream on an empty cache; continue a stream with step()")
        if len(prompt) == 0:
            raise UsageError("an empty prompt: give at least one token to prefill")
        read = None  # a method that reads token scores gets its scoring pass here, which may read the prompt for us
        layout = prompt
        if not isinstance(prompt, Layout):
            layout, read = prompt_layout(self.model, self.method, prompt, self.token_ids, seed)
        check_positions(self.position_table, layout.position_ids)
        predict_from = self.method.predict_from if self.method is not None else (Kind.TEXT,)
        predictors = torch.isin(layout.kinds, torch.tensor([int(k) for k in predict_from]))
        last = int(torch.nonzero(predictors).max()) if bool(predictors.any()) else len(layout) - 1
        kept, logits = [], None
        if read is not None and not keep_logits:  # the scoring pass's keys, values and last logits: no second read
            store_read(self.cache, layout, read.kv)
            self._peak()
            self.cache.evict(len(layout))
            logits = read.logits
        else:
            causal = can_feed_causally(self.model, layout)  # one pass: chunks would free nothing (see above)
            for lo, hi in [(0, len(layout))] if causal else chunk_bounds(layout, chunk_tokens):
                wanted = lo <= last < hi
                rows = None if keep_logits else torch.tensor([last - lo if wanted else hi - lo - 1])
                out = feed(self.model, self.cache, layout.slice(lo, hi), lo, logits_rows=rows, causal=causal)[0]
                if keep_logits:
                    kept.append(out)
                elif wanted:
                    logits = out[0]
                self._peak()
                self.cache.evict(hi)
        self.seen = [len(layout)]
        self.layouts = [layout]
        if self.method is not None:
            self.policies = [self.method.decode_policy(layout, self.token_ids, seed=seed)]
        return torch.cat(kept, 0) if keep_logits else logits

    @classmethod
    def batch(
        cls,
        model,
        method: Method,
        token_ids: dict[str, int],
        prompts: Sequence[TokenizedText],
        chunk_tokens: int = PREFILL_CHUNK,
        seed: int = 0,
    ) -> tuple[Stream, torch.Tensor]:
        """Prefill each prompt on its own (row ``i`` with seed ``seed + i``), then stack the rows into one stream
        whose shorter rows carry invalid slots. Returns the stream and each row's next-token logits (B, V)."""
        rows = [cls(model, method, token_ids) for _ in prompts]
        logits = torch.stack(
            [s.prefill(p, chunk_tokens, seed + i) for i, (s, p) in enumerate(zip(rows, prompts, strict=False))]
        )
        return cls.stack(rows), logits

    @classmethod
    def stack(cls, rows: Sequence[Stream]) -> Stream:
        """One stream from prefilled one-row streams (their caches stacked, shorter rows padded with invalid
        slots; each row keeps a copy of its own policy and its logical length: the rows stay usable apart)."""
        if not rows or any(s.cache.rows != 1 or len(s.policies) != 1 for s in rows):
            raise ValueError("stack one or more prefilled one-row streams (not a repeated or stacked one)")
        one = rows[0]
        stream = cls(one.model, one.method, one.token_ids, EvictingCache.stack([s.cache for s in rows]), one.slack)
        stream.policies = copy.deepcopy([p for s in rows for p in s.policies])
        stream.seen, stream.layouts = [n for s in rows for n in s.seen], [lay for s in rows for lay in s.layouts]
        stream.peak_kv_bytes = max(s.peak_kv_bytes for s in rows)
        return stream

    def repeat(self, times: int) -> None:
        """Turn a prefilled one-row stream into ``times`` identical rows sharing one policy (benchmarks)."""
        if times < 1 or len(self.policies) != 1:
            raise ValueError(f"repeat a prefilled one-row stream at least once, not {times} times")
        self.cache.repeat_rows(times)

    def clone(self) -> Stream:
        """An independent copy (cache, policies, lengths): one compressed prompt, several what-if continuations."""
        other = Stream(self.model, self.method, self.token_ids, self.cache.clone(), self.slack)
        other.policies, other.seen = copy.deepcopy(self.policies), list(self.seen)
        other.layouts, other.peak_kv_bytes = self.layouts, self.peak_kv_bytes
        return other

    # -- decoding ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: Sequence[int | None]) -> Step:
        """Feed one token per policy (None: that row feeds nothing and its logits are zero): the policy lays it
        out, keys it frees are marked, the piece is fed at the row's logical indices, and what expired is freed."""
        if len(tokens) != len(self.policies):
            raise ValueError(f"step got {len(tokens)} tokens for {len(self.policies)} rows")
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if bad := [t for t in tokens if t is not None and not 0 <= t < vocab]:  # before any row's policy moves on
            raise UsageError(f"token ids {bad} are outside the model's vocabulary (0..{vocab - 1})")
        pieces = [None if t is None else policy.step(t) for policy, t in zip(self.policies, tokens, strict=True)]
        check_positions(self.position_table, *(p.layout.position_ids for p in pieces if p is not None))
        shared = len(self.policies) == 1
        for b, piece in enumerate(pieces):
            for logical, expire in piece.updates if piece is not None else ():
                for row in range(self.cache.rows) if shared else (b,):
                    self.cache.set_expire(row, logical, expire)
        if shared and pieces[0] is not None:
            piece, first, rows = pieces[0], self.seen[0], self.cache.rows
            ids, wanted = piece.layout.input_ids.expand(rows, -1), torch.tensor([piece.next_row])
            logits = feed(self.model, self.cache, piece.layout, first, input_ids=ids, logits_rows=wanted)[:, 0]
            self.seen[0] += len(piece.layout)
            self._peak()
            self.cache.evict(self.seen[0], slack=self.slack)
            return Step(pieces, logits)
        out = feed_ragged(self.model, self.cache, pieces, self.seen)
        logits = out.new_zeros(out.shape[0], out.shape[-1])
        for b, piece in enumerate(pieces):
            if piece is not None:
                logits[b] = out[b, piece.next_row]
                self.seen[b] += len(piece.layout)
        self._peak()
        self.cache.evict(torch.tensor(self.seen) if len(self.seen) > 1 else self.seen[0], slack=self.slack)
        return Step(pieces, logits)

    def _peak(self) -> None:
        """Record the stored KV before an eviction (its peak: kept slots plus what was just fed)."""
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.cache.kv_bytes())
        self.peak_slots = max(self.peak_slots, self.cache.physical_length)


def feed_ragged(model, cache: EvictingCache, pieces: Sequence[StepPiece | None], seen: list[int]) -> torch.Tensor:
    """One step for all rows: each row's piece at its own logical indices, padded to the longest piece.

    Every token carries its kind, so a conditional-LoRA model (CCM) is gated per token as in
    :func:`kvcondense.forward.feed` (padding is text: the base model, and it is freed at once)."""
    if all(p is None for p in pieces):
        raise ValueError("a step with no piece to feed")
    n = max(len(p.layout) for p in pieces if p is not None)
    shape = (len(pieces), n)
    ids, pos = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    kinds = torch.full(shape, int(Kind.TEXT), dtype=torch.long)
    q_idx, start = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    expire, closer = torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.bool)
    for b, piece in enumerate(pieces):
        if piece is None:
            continue
        lay, m = piece.layout, len(piece.layout)
        ids[b, :m], pos[b, :m], start[b, :m] = lay.input_ids, lay.position_ids, lay.start
        kinds[b, :m] = lay.kinds
        expire[b, :m], closer[b, :m] = lay.expire, lay.closer_only
        q_idx[b, :m] = torch.arange(seen[b], seen[b] + m)
    mask = to_attention_mask(cache.visibility(q_idx, start, expire, closer), step_mask_kind(model), model.dtype)
    device = model.device
    with writing_into(model, cache, kinds) as layer_kwargs:
        out = model(
            input_ids=ids.to(device),
            position_ids=pos.to(device),
            attention_mask=mask.to(device),
            past_key_values=cache,
            use_cache=True,
            **layer_kwargs,
        )
    cache.append(q_idx, torch.where(q_idx < 0, torch.full_like(expire, -1), expire), closer)
    return out.logits


def generate_step(
    stream: Stream,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    sampling: Sampling | None = None,
) -> Iterator[list[int | None]]:
    """Pick a token per row, feed them, and yield them; a row that picked ``eos_token_id`` is done (not fed, None
    from then on). After each yield the stream holds every yielded token (a caller may stop at any yield).

    ``logits``: each row's next-token logits, (B, V) or (V,) for one row, as :meth:`Stream.prefill` returns.
    """
    pick = sampling or Sampling()  # greedy
    logits = logits.unsqueeze(0) if logits.dim() == 1 else logits
    done = [False] * logits.shape[0]
    for _ in range(max_new_tokens):
        tokens: list[int | None] = []
        for b in range(logits.shape[0]):
            token = None if done[b] else pick(logits[b])
            if token is not None and token == eos_token_id:
                done[b], token = True, None
            tokens.append(token)
        if all(done):
            return
        logits = stream.step(tokens).logits
        yield tokens


@torch.no_grad()
def incremental_forward(
    model, layout: Layout, chunk_size: int = 64, cache: EvictingCache | None = None
) -> tuple[torch.Tensor, IncrementalStats]:
    """Feed a layout chunk by chunk with real eviction. Returns logits (L, V) and the cache statistics.

    Peak stored KV is bounded by the kept slots plus one chunk.
    """
    stream = Stream(model, None, {}, cache)  # a given layout, no decoding after it: no method needed
    logits = stream.prefill(layout, chunk_size, keep_logits=True)
    cache = stream.cache
    stats = IncrementalStats(
        logical_tokens=cache.seen,
        stored_slots=int(cache.stored_slots()[0]),
        peak_slots=stream.peak_slots,
        kv_bytes=cache.kv_bytes(),
        peak_kv_bytes=stream.peak_kv_bytes,
    )
    return logits, stats
