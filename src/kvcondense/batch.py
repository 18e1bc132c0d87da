"""Batched generation with ragged eviction: every row compresses a different amount.

Each prompt is laid out and prefilled on its own (chunked, with eviction), then the one-row caches are stacked
into one batch whose shorter rows carry invalid slots. Each decode step (:meth:`kvcondense.engine.Stream.step`)
feeds every row's next piece (a token, or a token with its sentinel or gist tokens); shorter pieces are padded
with tokens that see only themselves and are freed at once. Per-row logical indices, positions and expiry keep
every row exactly what it would be alone; a test checks it against decoding each row by itself.
"""

from __future__ import annotations

import torch

from .cache import EvictingCache
from .engine import PREFILL_CHUNK, Sampling, Stream, generate_step
from .errors import UsageError
from .generate import check_layout_positions, context_limit
from .methods import Method, TokenizedText, tokenize


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    method: Method,
    token_ids: dict[str, int],
    prompts: list[str | TokenizedText],
    max_new_tokens: int = 32,
    chunk_tokens: int = PREFILL_CHUNK,
    seed: int = 0,
    sampling: Sampling | None = None,
) -> tuple[list[list[int]], EvictingCache]:
    """Generation for several prompts at once (greedy unless ``sampling`` says otherwise; one sampler draws for
    every row). Returns each row's new token ids and the final cache."""
    texts = [tokenize(p, tokenizer) if isinstance(p, str) else p for p in prompts]
    if not texts or any(len(t) == 0 for t in texts):
        raise UsageError("a batch needs prompts, each with some text")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = context_limit(model)
    longest = max(len(t) for t in texts)
    if limit is not None and longest + max_new_tokens > limit:
        raise UsageError(
            f"the longest prompt ({longest} tokens) plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit}; shorten it or generate fewer tokens"
        )
    stream, logits = Stream.batch(model, method, token_ids, texts, chunk_tokens, seed)
    check_layout_positions(limit, stream, max_new_tokens)
    new: list[list[int]] = [[] for _ in texts]
    for tokens in generate_step(stream, logits, max_new_tokens, tokenizer.eos_token_id, sampling):
        for row, token in zip(new, tokens, strict=True):
            if token is not None:
                row.append(token)
    return new, stream.cache


__all__ = ["generate_batch"]
