"""Compression inside transformers' own ``generate``.

    from kvcondense.hf import CompressedDecoding, compressing

    with compressing(model, method, token_ids, tokenizer=tokenizer):          # like kvpress's `with press(model)`
        out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64,
                             do_sample=True, temperature=0.7, top_p=0.9, streamer=streamer)

    out = model.generate(input_ids, custom_generate=CompressedDecoding(method, token_ids), max_new_tokens=64)

transformers prepares the inputs, the logits processors (temperature, top-k, top-p, repetition penalty, ...), the
stopping criteria (max length, EOS, stop strings) and the streamer as usual, and hands the decoding loop to
:class:`CompressedDecoding` (its ``custom_generate`` hook). The loop runs on kvcondense's engine: each row is laid
out by the method and prefilled with real eviction, each step feeds the picked token through the method's decode
policy and frees what it condenses. The last generation's stream stays on the object (``decoding.stream``), so
what the cache really stored can be read (``decoding.stream.cache.stored_slots()``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .engine import PREFILL_CHUNK, Stream
from .errors import UsageError
from .methods import Method, TokenizedText, tokenize


def as_text(ids: torch.Tensor, tokenizer=None) -> TokenizedText:
    """A row of token ids as the methods' input. With the tokenizer, words, lines and sentence ends come from the
    decoded text when it tokenizes back to the same ids; otherwise every token is its own word on one line."""
    ids = ids.detach().cpu().long()
    if tokenizer is not None:
        again = tokenize(tokenizer.decode(ids.tolist()), tokenizer)
        if torch.equal(again.ids, ids):
            return again
    n = len(ids)
    return TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


class CompressedDecoding:
    """A ``custom_generate`` decoding loop for ``model.generate`` that compresses with ``method``.

    Args:
        method: the compression method (the model must carry its adapters and token rows, e.g. from
            :func:`kvcondense.load`).
        token_ids: the method's special tokens' ids.
        tokenizer: used to recover words and sentences from the ids (methods that place spans by words or sentences);
            ``generate(..., tokenizer=...)`` also provides it.
        chunk_tokens: prefill chunk size.
        seed: span placement seed of row 0 (row ``i`` uses ``seed + i``, as :func:`kvcondense.batch.generate_batch`).
        streamer: where each new token goes (``put``/``end``, transformers' ``TextStreamer``). transformers 5.x hands
            a ``custom_generate`` callable only its own extra arguments, not ``generate``'s ``streamer``; give it
            here too (``generate`` itself still puts the prompt), or use :func:`compressing`, which does both.
    """

    def __init__(
        self,
        method: Method,
        token_ids: dict[str, int],
        tokenizer=None,
        chunk_tokens: int = PREFILL_CHUNK,
        seed=0,
        streamer=None,
    ):
        self.method, self.token_ids, self.tokenizer = method, token_ids, tokenizer
        self.chunk_tokens, self.seed, self.streamer = chunk_tokens, seed, streamer
        self.stream: Stream | None = None

    @torch.no_grad()
    def __call__(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        tokenizer=None,
        **model_kwargs,
    ) -> torch.LongTensor:
        attention_mask = model_kwargs.get("attention_mask")  # (B, L), 0 on padding
        if generation_config.return_dict_in_generate:
            raise UsageError("compressed generation returns the token ids only; drop return_dict_in_generate")
        if (generation_config.num_beams or 1) > 1:
            raise UsageError("compressed generation samples or decodes greedily; beam search is not supported")
        tokenizer = tokenizer or self.tokenizer
        streamer = streamer or self.streamer
        rows = []
        for b in range(input_ids.shape[0]):  # left or right padding: keep the attended tokens
            keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b]).bool()
            rows.append(as_text(input_ids[b][keep], tokenizer))
        stream, logits = Stream.batch(model, self.method, self.token_ids, rows, self.chunk_tokens, self.seed)
        self.stream = stream
        pad = generation_config._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = input_ids
        while True:  # the stopping criteria end it (transformers always adds the max-length one)
            scores = logits_processor(out, logits.float().to(input_ids.device))
            if generation_config.do_sample:
                picked = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                picked = scores.argmax(dim=-1)
            if has_eos and pad is not None:
                picked = torch.where(unfinished, picked, pad.to(picked.device))
            out = torch.cat([out, picked[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(picked.cpu())
            unfinished = unfinished & ~stopping_criteria(out, scores).to(unfinished.device)
            if not bool(unfinished.any()):
                break
            # a row that just finished (or had) feeds nothing more
            fed = [int(t) if alive else None for t, alive in zip(picked.tolist(), unfinished.tolist(), strict=True)]
            logits = stream.step(fed).logits
        if streamer is not None:
            streamer.end()
        return out


@contextmanager
def compressing(model, method: Method, token_ids: dict[str, int], **options):
    """Within the block, ``model.generate`` decodes with compression (:class:`CompressedDecoding` with
    ``options``); the model's own ``generate`` is put back on exit. Yields the decoding object."""
    decoding = CompressedDecoding(method, token_ids, **options)
    own = vars(model).get("generate")
    original = model.generate

    def generate(*args, **kwargs):
        if "custom_generate" in kwargs:
            raise UsageError("inside compressing(model, ...) generate already decodes with compression")
        decoding.streamer = kwargs.get("streamer")  # generate keeps it from custom_generate callables
        return original(*args, custom_generate=decoding, **kwargs)

    model.generate = generate
    try:
        yield decoding
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own
