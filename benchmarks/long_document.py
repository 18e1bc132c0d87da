"""Peak stored KV against document length: a chunked prefill with sentinel compression (spans freed as they
close) against full attention, on one long document (joined Wikipedia articles), up to 32k tokens: 4x the
default model's 8k context, so positions extrapolate; memory does not depend on what the model makes of them.

    .venv/bin/python benchmarks/long_document.py [--lengths 2048 4096 8192 16384 32768] [--ratio 0.5]

The compressed curve should grow at about (1 - r) of the full one, bounded by the kept slots plus one chunk.
"""

from __future__ import annotations

import argparse
import time

from kvcondense.data import load_split
from kvcondense.engine import incremental_forward
from kvcondense.methods import FullAttention, Sentinel, tokenize
from kvcondense.models import add_special_tokens, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--full-up-to", type=int, default=16384, help="longest length also measured with full attention")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    sentinel = Sentinel(ratio=args.ratio)
    ids = add_special_tokens(model, tok, sentinel.special_tokens)
    # Wikipedia articles joined into one long document (sentinel spans need lines of 30+ words; verse has few)
    docs = sorted(load_split("wiki", "train"), key=lambda d: -len(d.text))
    text = tokenize("\n".join(d.text for d in docs[:12]), tok)
    print("| tokens | sentinel peak KV (MiB) | sentinel final (MiB) | full peak KV (MiB) | ratio | prefill s |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        doc = text[:n]
        t = time.perf_counter()
        _, comp = incremental_forward(model, sentinel.layout(doc, ids, seed=0), args.chunk)
        t_comp = time.perf_counter() - t
        per_slot = comp.kv_bytes / comp.stored_slots
        if n <= args.full_up_to:
            t = time.perf_counter()
            _, full = incremental_forward(model, FullAttention().layout(doc, {}), args.chunk)
            t_full, full_peak = f"{time.perf_counter() - t:.0f}", full.peak_kv_bytes
        else:  # full attention's cache is exactly one slot per token: computed, not run, past --full-up-to
            t_full, full_peak = "-", n * per_slot
        print(
            f"| {n} | {comp.peak_kv_bytes / 2**20:.1f} | {comp.kv_bytes / 2**20:.1f} | {full_peak / 2**20:.1f} | "
            f"{comp.peak_kv_bytes / full_peak:.3f} | {t_comp:.0f} / {t_full} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
