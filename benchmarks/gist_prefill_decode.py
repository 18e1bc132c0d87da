"""Gist tokens on a long document: peak stored KV during a chunked prefill, and decode-step time against a
full-cache model whose context has the compressed length.

    .venv/bin/python benchmarks/gist_prefill_decode.py [--tokens 16384] [--decode-context 4096] [--n-gist 4]

Targets (issue 3): peak stored KV <= final compressed size + one chunk; decode step within 10 % of the full cache
of the same stored length. Ratios are measured in one run. Positions past the model's 8k context are used for the
memory measurement only (memory does not depend on what the model makes of them).
"""

from __future__ import annotations

import argparse
import time

from kvcondense.data import load_split
from kvcondense.engine import Stream, incremental_forward
from kvcondense.methods import FullAttention, Gist, tokenize
from kvcondense.models import add_special_tokens, load_model


def long_text(tok, n: int):
    docs = sorted(load_split("books", "test"), key=lambda d: -len(d.text))
    return tokenize(docs[0].text, tok)[:n]


def decode_ms(stream: Stream, steps: int) -> float:
    """Median time of one engine decode step (token 100, laid out by the stream's method)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        stream.step([100])
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--decode-context", type=int, default=4096)
    ap.add_argument("--n-gist", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    method = Gist(n_gist=args.n_gist)
    ids = add_special_tokens(model, tok, method.special_tokens)

    # -- peak stored KV during a chunked prefill -------------------------------------------------------------------
    layout = method.layout(long_text(tok, args.tokens), ids)
    t = time.perf_counter()
    _, stats = incremental_forward(model, layout, chunk_size=args.chunk)
    elapsed = time.perf_counter() - t
    per_slot = stats.kv_bytes / stats.stored_slots
    bound = stats.kv_bytes + args.chunk * per_slot
    print(
        f"prefill {layout.n_text} text tokens (+{len(layout) - layout.n_text} gist) in chunks of {args.chunk}: "
        f"{elapsed:.0f} s; final stored {stats.stored_slots} slots ({stats.kv_bytes / 2**20:.1f} MiB), "
        f"peak {stats.peak_slots} slots ({stats.peak_kv_bytes / 2**20:.1f} MiB); full cache would be "
        f"{layout.n_text * per_slot / 2**20:.1f} MiB"
    )
    print(f"peak / (final + one chunk) = {stats.peak_kv_bytes / bound:.3f} (target <= 1)")

    # -- decode step: compressed 4k document vs a full cache of the same stored length ---------------------------
    stream = Stream(model, method, ids)
    stream.prefill(long_text(tok, args.decode_context), chunk_tokens=args.chunk)
    layout, stored = stream.layouts[0], int(stream.cache.stored_slots()[0])
    compressed = decode_ms(stream, args.steps)
    full_stream = Stream(model, FullAttention(), {})
    plain = long_text(tok, stored)
    full_stream.prefill(plain, chunk_tokens=args.chunk)
    full = decode_ms(full_stream, args.steps)
    print(
        f"decode step at a {layout.n_text}-token document compressed to {stored} slots: "
        f"{compressed:.1f} ms; full cache of {len(plain)} tokens: {full:.1f} ms; "
        f"ratio {compressed / full:.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
