"""Prefill and decode with compression and real eviction.

The prompt is laid out by the method and fed in chunks through the evicting cache (spans are freed as soon as
they close); generated tokens are laid out by the method's decode policy and freed the same way.

    kvcondense generate --checkpoint checkpoints/sentinel-r0.5 --prompt-file doc.txt --max-new-tokens 64
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .atomic import check_writable, write_json
from .engine import PREFILL_CHUNK, Sampling, Stream, generate_step
from .errors import UsageError
from .methods import Method, TokenizedText, tokenize


@dataclass
class Generation:
    """A generated continuation and what the cache held."""

    text: str
    new_tokens: list[int]
    prompt_tokens: int
    logical_tokens: int
    stored_slots: int
    kv_bytes: int
    kv_bytes_full: int
    peak_kv_bytes: int
    slots_per_step: list[int] = field(default_factory=list)


def check_layout_positions(limit: int | None, stream: Stream, max_new_tokens: int) -> None:
    """Refuse a prompt whose layout, with ``max_new_tokens`` after it, runs past ``limit`` positions: a method's
    special tokens may take positions of their own (gist tokens do), beyond the text's count checked before."""
    used = max(int(lay.position_ids.max()) + 1 for lay in stream.layouts)
    if limit is not None and used + max_new_tokens > limit:
        raise UsageError(
            f"the compressed prompt takes {used} positions (its special tokens take some) and with {max_new_tokens} "
            f"new tokens exceeds the model's context of {limit}; shorten the prompt or generate fewer tokens"
        )


def context_limit(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    method: Method,
    token_ids: dict[str, int],
    prompt: str | TokenizedText,
    max_new_tokens: int = 64,
    chunk_tokens: int = PREFILL_CHUNK,
    seed: int = 0,
    progress: bool = True,
    slack: int = 0,
    allow_long_context: bool = False,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    streamer=None,
) -> Generation:
    """Generation from a compressed prompt (text, or already tokenized), greedy unless ``sampling`` says otherwise.

    Raises :class:`UsageError` if the prompt is empty or prompt plus output exceed the model's context.
    ``slack``: dead slots allowed to wait for a batched compaction while decoding (see
    :meth:`EvictingCache.evict`); 0 frees every expired key at once. ``allow_long_context`` lets positions run past
    the model's trained context (RoPE extrapolates; quality is not what the model was trained for), which
    compression makes affordable in memory. Generation ends at end of sequence, after ``max_new_tokens``, or once
    the text contains one of the ``stop`` strings (the text is cut before it). ``streamer``: an object with
    ``put(token_ids)`` and ``end()`` (transformers' ``TextStreamer``), given each token as it comes."""
    text = tokenize(prompt, tokenizer) if isinstance(prompt, str) else prompt
    if len(text) == 0:
        raise UsageError("the prompt is empty; give some text")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(stop, str) or any(not s for s in stop):
        raise UsageError(f"stop takes a list of non-empty strings, got {stop!r}")
    limit = context_limit(model)
    if limit is not None and len(text) + max_new_tokens > limit and not allow_long_context:
        raise UsageError(
            f"prompt ({len(text)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds the model's context of "
            f"{limit} tokens; shorten the prompt, generate fewer tokens, or pass --allow-long-context"
        )
    stream = Stream(model, method, token_ids, slack=slack)
    logits = stream.prefill(text, chunk_tokens, seed)
    if not allow_long_context:
        check_layout_positions(limit, stream, max_new_tokens)
    cache, new, slots = stream.cache, [], []
    steps = generate_step(stream, logits, max_new_tokens, tokenizer.eos_token_id, sampling)
    for (token,) in tqdm(steps, total=max_new_tokens, desc="generate", disable=not progress, leave=False):
        new.append(token)
        slots.append(int(cache.stored_slots()[0]))
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        if stop and any(s in tokenizer.decode(new, skip_special_tokens=True) for s in stop):
            break
    if streamer is not None:
        streamer.end()
    text_out = tokenizer.decode(new, skip_special_tokens=True)
    for s in stop:
        text_out = text_out.split(s)[0]
    stored = int(cache.stored_slots()[0])
    per_slot = cache.kv_bytes() / max(stored, 1)
    return Generation(
        text=text_out,
        new_tokens=new,
        prompt_tokens=len(text),
        logical_tokens=cache.seen,
        stored_slots=stored,
        kv_bytes=cache.kv_bytes(),
        kv_bytes_full=int(per_slot * (len(text) + len(new))),
        peak_kv_bytes=stream.peak_kv_bytes,
        slots_per_step=slots,
    )


def chat_prompt(tokenizer, message: str) -> str:
    """``message`` as one user turn in the model's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this model's tokenizer has no chat template; drop --chat and give the prompt as plain text")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def generate_cli(args, prompt: str, method_params: dict) -> int:
    """``kvcondense generate``: print the continuation and the cache statistics."""
    from .loader import load
    from .verify import check_family

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad sampling flags fail before the model loads
    if args.json:
        check_writable(args.json, "--json")
    typed = {**method_params, "ratio": args.ratio}
    got = load(args.checkpoint, args.method, typed, args.model, device=args.device, dtype=args.dtype)
    model, tokenizer, method, token_ids = got.model, got.tokenizer, got.method, got.token_ids
    check_family(model)
    if args.chat:
        prompt = chat_prompt(tokenizer, prompt)
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    gen = generate(
        model,
        tokenizer,
        method,
        token_ids,
        prompt,
        args.max_new_tokens,
        args.prefill_chunk,
        args.seed,
        allow_long_context=args.allow_long_context,
        sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
        stop=args.stop,
        streamer=streamer,
        progress=not args.stream,
    )
    if not args.stream:
        print(gen.text, flush=True)
    print(  # statistics go to stderr: stdout holds the text alone
        f"[{method.name}] logical tokens: {gen.logical_tokens}  stored slots: {gen.stored_slots}  "
        f"KV bytes: {gen.kv_bytes:,} (full attention: {gen.kv_bytes_full:,}, "
        f"{gen.kv_bytes / max(gen.kv_bytes_full, 1):.2f}x)  peak KV bytes: {gen.peak_kv_bytes:,}",
        file=sys.stderr,
    )
    print(f"stored slots after each generated token: {' '.join(map(str, gen.slots_per_step))}", file=sys.stderr)
    if gen.kv_bytes > gen.kv_bytes_full:
        print(
            "note: the compressed cache is larger than full attention's here: the method's special tokens take "
            "slots, and this prompt is too short for its spans to pay for them",
            file=sys.stderr,
        )
    if args.json:
        write_json(args.json, {"kind": "generate", "method": method.name, **asdict(gen)})
    return 0
