"""Batched generation with ragged eviction: every row compresses a different amount.

Each prompt is laid out and prefilled on its own (chunked, with eviction), then the one-row caches are stacked
into one batch whose shorter rows carry invalid slots. Each decode step feeds every row's next piece (a token,
or a token with its sentinel or gist tokens); shorter pieces are padded with tokens that see only themselves
and are freed at once. Per-row logical indices, positions and expiry keep every row exactly what it would be
alone; a test checks it against decoding each row by itself.
"""

from __future__ import annotations

import torch

from .cache import EvictingCache
from .errors import UsageError
from .forward import attention_implementation, attn_implementation, incremental_attention
from .generate import context_limit, prefill
from .layout import Kind
from .lora import lora_gate
from .masks import to_attention_mask
from .methods import Method, TokenizedText, tokenize


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    method: Method,
    token_ids: dict[str, int],
    prompts: list[str | TokenizedText],
    max_new_tokens: int = 32,
    chunk_tokens: int = 64,
    seed: int = 0,
) -> tuple[list[list[int]], EvictingCache]:
    """Greedy generation for several prompts at once. Returns each row's new token ids and the final cache."""
    texts = [tokenize(p, tokenizer) if isinstance(p, str) else p for p in prompts]
    if any(len(t) == 0 for t in texts):
        raise UsageError("a prompt of the batch is empty; give every row some text")
    limit = context_limit(model)
    longest = max(len(t) for t in texts)
    if limit is not None and longest + max_new_tokens > limit:
        raise UsageError(
            f"the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit}; shorten it or generate fewer tokens"
        )
    rows = [prefill(model, method, token_ids, t, chunk_tokens, seed + i)[:3] for i, t in enumerate(texts)]
    cache = EvictingCache.stack([c for _, c, _ in rows])
    logits = [lg for _, _, lg in rows]
    policies = [method.decode_policy(lay, token_ids, seed=seed + i) for i, (lay, _, _) in enumerate(rows)]
    seen = [len(lay) for lay, _, _ in rows]
    eos, n_rows = tokenizer.eos_token_id, len(rows)
    new: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    for _ in range(max_new_tokens):
        pieces = [None] * n_rows
        for b in range(n_rows):
            token = int(logits[b].argmax())
            if done[b] or token == eos:
                done[b] = True
                continue
            new[b].append(token)
            pieces[b] = policies[b].step(token)
            for logical, expire in pieces[b].updates:
                cache.set_expire(b, logical, expire)
        if all(done):
            break
        out = _feed_ragged(model, cache, pieces, seen)
        for b, piece in enumerate(pieces):
            if piece is not None:
                logits[b] = out[b, piece.next_row]
                seen[b] += len(piece.layout)
        cache.evict(torch.tensor(seen))
    return new, cache


def _feed_ragged(model, cache: EvictingCache, pieces, seen: list[int]) -> torch.Tensor:
    """One step for all rows: each row's piece at its own logical indices, padded to the longest piece.

    Every token carries its kind, so a conditional-LoRA model (CCM) is gated per token as in
    :func:`kvcondense.forward.feed` (padding is text: the base model, and it is freed at once)."""
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
    mask = to_attention_mask(cache.visibility(q_idx, start, expire, closer), attn_implementation(model), model.dtype)
    device = model.device
    with lora_gate(model, kinds), attention_implementation(model, incremental_attention(model)):
        out = model(
            input_ids=ids.to(device),
            position_ids=pos.to(device),
            attention_mask=mask.to(device),
            past_key_values=cache,
            use_cache=True,
        )
    cache.append(q_idx, torch.where(q_idx < 0, torch.full_like(expire, -1), expire), closer)
    return out.logits


__all__ = ["generate_batch"]
