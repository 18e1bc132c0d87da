"""Prefill through kvcondense against plain transformers, on the same token ids, in one run.

    .venv/bin/python benchmarks/prefill.py [--model smollm2-135m] [--context 1024] [--chunk 512] [--repeats 5]
        [--threads 1] [--method sentinel --ratio 0.5]

Four prefills of one held-out Wikipedia context (the first ``--context`` tokens of the joined validation articles):

- ``plain transformers``: ``model(ids, past_key_values=DynamicCache(), logits_to_keep=1)``, the prefill
  ``model.generate`` runs (causal kernel, no mask of ours, only the last row's logits);
- ``kvcondense full``: ``Stream(model, FullAttention()).prefill(text, chunk)``, the evicting cache with nothing
  to evict (the issue's target: within 1.10x of plain transformers);
- ``kvcondense <method>``: the same with the compressed method (target: no slower than kvcondense full);
- ``plain transformers, chunked``: the plain model fed ``--chunk`` tokens at a time, for reference;
- ``plain transformers, as many rows``: the plain model fed as many tokens as the method's layout has rows (the
  context continued from the same articles), in the same ``--chunk`` chunks: what the method's extra tokens
  (sentinels, gists) cost by themselves, so that ``method / as many rows`` is the engine's own cost per row fed.

The variants run in turn, ``--repeats`` rounds, and each ratio is the median of its per-round ratios (this machine
is noisy: compare ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvcondense.data import load_split
from kvcondense.engine import Stream
from kvcondense.methods import FullAttention, build_method, tokenize
from kvcondense.models import add_special_tokens, load_model
from kvcondense.scoring import method_layout


@torch.no_grad()
def plain(model, ids: torch.Tensor, chunk: int) -> None:
    cache = DynamicCache(config=model.config)
    for lo in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, lo : lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--method", default="sentinel")
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    method = build_method(args.method, ratio=args.ratio)
    token_ids = add_special_tokens(model, tok, method.special_tokens)
    docs = load_split("wiki", "validation")
    joined = tokenize("\n".join(d.text for d in docs), tok)
    text = joined[: args.context]
    ids = text.ids.unsqueeze(0)
    rows = len(method_layout(model, method, text, token_ids))
    if len(joined) < rows:
        raise SystemExit(f"the validation articles have {len(joined)} tokens, fewer than the {rows} rows to match")
    as_many = joined.ids[:rows].unsqueeze(0)
    variants = {
        "plain transformers": lambda: plain(model, ids, ids.shape[1]),
        "plain transformers, chunked": lambda: plain(model, ids, args.chunk),
        "plain transformers, as many rows": lambda: plain(model, as_many, args.chunk),
        "kvcondense full": lambda: Stream(model, FullAttention(), token_ids).prefill(text, args.chunk),
        f"kvcondense {args.method}": lambda: Stream(model, method, token_ids).prefill(text, args.chunk),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"{args.context} tokens, chunk {args.chunk}, {torch.get_num_threads()} threads, {args.repeats} rounds")
    for name, ts in times.items():
        print(f"  {name:32s} median {statistics.median(ts) * 1e3:8.1f} ms")
    comp = f"kvcondense {args.method}"
    full = ratio("kvcondense full", "plain transformers")
    print(f"kvcondense full / plain transformers: {full:.3f} (target <= 1.10)")
    print(f"{comp} / kvcondense full: {ratio(comp, 'kvcondense full'):.3f} (target <= 1.00)")
    print(f"{comp} / plain transformers: {ratio(comp, 'plain transformers'):.3f}")
    extra = ratio("plain transformers, as many rows", "plain transformers, chunked")
    print(
        f"{rows} rows for {args.context} tokens: plain transformers on {rows} / on {args.context} tokens, "
        f"same chunks: {extra:.3f} (the cost of the method's extra rows alone)"
    )
    print(
        f"{comp} / plain transformers on as many rows, same chunks: "
        f"{ratio(comp, 'plain transformers, as many rows'):.3f} (the engine's cost per row fed)"
    )


if __name__ == "__main__":
    main()
