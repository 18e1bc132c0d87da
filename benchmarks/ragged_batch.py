"""Batched decode with ragged eviction against unpadded batches holding the same stored KV.

    .venv/bin/python benchmarks/ragged_batch.py [--model smollm2-135m] [--method sentinel] [--steps 32] [--threads 1]

Ragged batch: 8 prompts of different lengths (``--min-tokens`` .. ``--max-tokens``, evenly spaced, cut from joined
Wikipedia articles), each laid out and prefilled alone with the method (sentinel r = 0.5 by default, spans freed as
they close), then stacked as :func:`kvcondense.batch.generate_batch` does: every row stores a different number of
slots, and the shorter rows are padded with invalid slots up to the widest. Decoding runs generate_batch's step
(policy step, expiry updates, one forward over all rows, per-row eviction) with greedy tokens, EOS ignored.

"Same stored KV" = the same number of valid stored slots summed over the 8 rows (S = their mean per row, taken when
decoding starts), without a padding slot. Three unpadded batches:

- ``same method``: 8 copies of the ragged row whose stored slots are closest to S, decoded with the same method and
  step function (so the same sentinel tokens and evictions): the cost of raggedness alone;
- ``plain transformers``: 8 rows of S tokens in the model's own DynamicCache, one text token per row per step, no
  mask of ours: the batch anyone would compare to (the issue's target: ragged >= 0.90 of it);
- ``full, evicting cache``: the same, through our cache and step function (shows what our bookkeeping costs).

Tokens/s counts generated text tokens (8 per step; the method's own sentinel tokens are work, not output). The
first step of every run is a warm-up and is excluded; each variant is run ``--repeats`` times from copies of the
same caches, interleaved, and the best time is kept. All ratios come from one run. Per-step timings of the ragged
run are split by piece length and eviction, which is where its time goes.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from kvcondense.data import load_split
from kvcondense.engine import Stream
from kvcondense.methods import FullAttention, build_method, tokenize
from kvcondense.models import add_special_tokens, load_model

ROWS = 8


def prompts(tok, lengths: list[int]):
    """One prompt per length, each starting at its own offset in joined Wikipedia articles."""
    docs = sorted(load_split("wiki", "train"), key=lambda d: -len(d.text))
    text = tokenize("\n".join(d.text for d in docs[:40]), tok)
    stride = (len(text) - max(lengths)) // len(lengths)
    if stride < 0:
        raise SystemExit(f"the corpus has {len(text)} tokens; ask for shorter prompts")
    return [text[i * stride : i * stride + n] for i, n in enumerate(lengths)]


def decode_ragged(stream: Stream, logits: torch.Tensor, steps: int):
    """generate_batch's decode step through the engine (greedy, EOS ignored). Returns (seconds for ``steps`` steps
    after one warm-up step, per timed step: (longest piece, seconds, slots freed))."""
    trace, before = [], int(stream.cache.stored_slots().sum())
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        step = stream.step([int(row.argmax()) for row in logits])
        seconds = time.perf_counter() - t0
        logits, fed = step.logits, [len(p.layout) for p in step.pieces if p is not None]
        after = int(stream.cache.stored_slots().sum())
        trace.append((max(fed), seconds, before + sum(fed) - after))
        before = after
    trace = trace[1:]  # warm-up
    return sum(t for _, t, _ in trace), trace


def decode_plain(model, cache, logits: torch.Tensor, steps: int) -> float:
    """Plain transformers batched greedy decode from a DynamicCache: seconds for ``steps`` steps after a warm-up."""
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        out = model(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    return time.perf_counter() - t0


def where_time_goes(trace) -> str:
    """Mean step time by longest piece, and how many steps compacted the cache, from a ragged run's trace."""
    parts = []
    for n in sorted({n for n, *_ in trace}):
        times = [t for m, t, _ in trace if m == n]
        parts.append(f"{len(times)} steps of {n} token(s): {1e3 * sum(times) / len(times):.0f} ms")
    compacting = [t for _, t, freed in trace if freed > 0]
    if compacting:
        parts.append(f"{len(compacting)} steps freed slots: {1e3 * sum(compacting) / len(compacting):.0f} ms each")
    return "; ".join(parts)


@torch.no_grad()  # prefill() itself keeps autograd on: 8 long prompts' activations would fill the memory
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sentinel", help="compression of the ragged rows (sentinel, local, ...)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    method = build_method(args.method, ratio=args.ratio)
    ids = add_special_tokens(model, tok, method.special_tokens)
    lengths = [round(args.min_tokens + i * (args.max_tokens - args.min_tokens) / (ROWS - 1)) for i in range(ROWS)]
    texts = prompts(tok, lengths)

    # -- ragged batch: rows prefilled alone, stacked with invalid padding slots ----------------------------------
    rows = [Stream(model, method, ids) for _ in texts]
    row_logits = torch.stack(
        [r.prefill(t, args.chunk, seed=i) for i, (r, t) in enumerate(zip(rows, texts, strict=False))]
    )
    ragged = Stream.stack(rows)
    stored = ragged.cache.stored_slots()
    s = round(float(stored.float().mean()))

    # -- unpadded, same method: 8 copies of the row closest to the mean ------------------------------------------
    near = int((stored - s).abs().argmin())
    same = Stream.stack([rows[near].clone() for _ in range(ROWS)])

    # -- unpadded, full attention, S = mean stored slots: our cache, and transformers' own -----------------------
    full_text = texts[-1][:s]
    flat_row = Stream(model, FullAttention(), {})
    flat_logits = flat_row.prefill(full_text, args.chunk)
    flat = Stream.stack([flat_row.clone() for _ in range(ROWS)])
    plain = model(input_ids=full_text.ids[None], use_cache=True)
    plain.past_key_values.batch_repeat_interleave(ROWS)
    plain_logits = plain.logits[:, -1].repeat(ROWS, 1)

    times: dict[str, list[float]] = {"ragged": [], "same": [], "plain": [], "evicting": []}
    traces = {}
    for _ in range(args.repeats):
        t, traces["ragged"] = decode_ragged(ragged.clone(), row_logits, args.steps)
        times["ragged"].append(t)
        t, traces["same"] = decode_ragged(same.clone(), row_logits[near].expand(ROWS, -1), args.steps)
        times["same"].append(t)
        times["plain"].append(decode_plain(model, copy.deepcopy(plain.past_key_values), plain_logits, args.steps))
        t, _ = decode_ragged(flat.clone(), flat_logits.expand(ROWS, -1), args.steps)
        times["evicting"].append(t)

    # -- report ------------------------------------------------------------------------------------------------
    tps = {k: ROWS * args.steps / min(v) for k, v in times.items()}
    print(
        f"{args.model}, {args.method} r={args.ratio}, {torch.get_num_threads()} thread(s), prompts {lengths[0]}.."
        f"{lengths[-1]} tokens, {args.steps} decode steps (warm-up excluded), best of {args.repeats}"
    )
    width = ragged.cache.physical_length
    print(
        f"ragged: stored slots per row {stored.tolist()} (mean S = {s}), physical width {width}: "
        f"{100 * (1 - int(stored.sum()) / (ROWS * width)):.0f} % of the slots are padding"
    )
    labels = {
        "ragged": "ragged batch",
        "same": f"unpadded, same method ({int(stored[near])} slots x 8)",
        "plain": f"unpadded, plain transformers ({s} x 8)",
        "evicting": f"unpadded, full, evicting cache ({s} x 8)",
    }
    for name, label in labels.items():
        print(f"  {label:45s} {tps[name]:6.1f} tokens/s  ({1e3 * min(times[name]) / args.steps:6.1f} ms/step)")
    print(f"ragged steps: {where_time_goes(traces['ragged'])}")
    print(f"same-method unpadded steps: {where_time_goes(traces['same'])}")
    print(f"ratio ragged / unpadded same method: {tps['ragged'] / tps['same']:.3f}")
    print(f"ratio ragged / unpadded plain transformers: {tps['ragged'] / tps['plain']:.3f}   (target >= 0.90)")
    print(f"ratio full evicting cache / plain transformers: {tps['evicting'] / tps['plain']:.3f}")


if __name__ == "__main__":
    main()
