"""One choice of kept tokens for the whole cache against one choice per (layer, KV head), in one harness.

    .venv/bin/python benchmarks/per_head_selection.py [--model smollm2-135m] [--docs 6] [--window 32]
        [--recent N] [--per-query] [--value-norm] [--no-pool] [--score window|repeat] [--kept 0.5 0.25 0.125]

kvcondense's ``scored`` eviction keeps or frees a token in every layer and head at once (a layout has one
visibility rule per token); kvpress's SnapKV applies the same kind of rule per layer and KV head. This measures
what that difference alone is worth, with everything else equal: the prefix task's windows (``--docs`` held-out
wiki windows, a 1024-token context then 128 tokens scored, as ``kvcondense eval --task prefix``), one scoring pass
(the attention of the context's last ``--window`` queries, summed over them, pooled over 5 neighbours), the same
4 sinks and the same ``--window`` recent tokens always kept, and exactly ``floor(kept x 1024)`` tokens kept per
head. ``uniform`` ranks tokens by the score summed over heads and averaged over layers (kvcondense's rule);
``per head`` ranks them separately in every layer and KV head (SnapKV's). The context is read whole, then the
continuation attends only to what each head kept (a mask: this measures quality, not memory). Prints the mean
per-token KL(p_full || p) over the scored tokens for each.

``--recent N`` keeps N recent tokens instead of ``--window`` (to score with many queries, e.g. ``--window 1024``:
every query of the context, H2O's accumulated attention, while keeping a short window); ``--per-query`` divides a
token's score by the number of scoring queries that see it (the mean, not the sum: early tokens are not favoured
for being seen by more queries). ``--score repeat`` scores by KVzip's replay instead
(:func:`kvcondense.scoring.repeat_scores`: the model is asked to repeat the context, and a token's score is the
largest attention the replay puts on it), with ``--recent`` (default 0) recent tokens kept.
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvcondense.data import load_split
from kvcondense.forward import attention_implementation
from kvcondense.models import load_model
from kvcondense.prefix_task import prefix_windows
from kvcondense.scoring import head_scores, pool_scores, repeat_scores

SINKS = 4


class HeadMask:
    """An attention implementation that hides, from the queries after the context, the context keys a KV head did
    not keep (``keep[layer]``: (KV heads, context) bool)."""

    def __init__(self):
        self.keep: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, **kw):
        keep = self.keep[module.layer_idx].repeat_interleave(query.shape[1] // key.shape[1], 0)  # (query heads, P)
        n, p = query.shape[2], keep.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None].repeat(query.shape[1], 1, 1)
        mask[:, p:, :p] &= keep[:, None, :]
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask[None], is_causal=False, **kw)


def keep_top(scores: torch.Tensor, kept: float, window: int, pool: bool = True) -> torch.Tensor:
    """Bool (T,): the sinks, the last ``window`` tokens and the best (pooled) scores, floor(kept x T) in all."""
    t = scores.shape[0]
    pooled = pool_scores(scores) if pool else scores.clone()  # marking sinks and window leaves the scores alone
    pooled[:SINKS] = pooled[t - window :] = float("inf")
    keep = torch.zeros(t, dtype=torch.bool)
    keep[pooled.topk(math.floor(kept * t)).indices] = True
    return keep


def replay_instruction(tokenizer) -> torch.Tensor:
    """KVzip's request to repeat the context, closed as its chat template closes a user turn (as kvpress does)."""
    text = "\n\nRepeat the previous context exactly."
    if tokenizer.chat_template:
        marker = "@@@"
        turn = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        text += turn.split(marker)[1]
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False))


def keep_allocated(scores: torch.Tensor, kept: float, window: int, pool: bool, per_layer: bool) -> torch.Tensor:
    """Bool (layers, KV heads, T): the best floor(kept x T) x heads x layers (pooled) scores over the whole cache
    (sinks and window in every head). ``per_layer``: only each layer's share is taken from that ranking, then every
    head of the layer keeps its own best that many (a rectangle per layer); else the ranking decides alone (a
    ragged cache: what KVzip keeps, masked, not freed)."""
    layers, heads, t = scores.shape
    ranked = pool_scores(scores) if pool else scores.clone()
    ranked[..., :SINKS] = ranked[..., t - window :] = float("inf")
    n = math.floor(kept * t)
    keep = torch.zeros(ranked.numel(), dtype=torch.bool)
    keep[ranked.flatten().topk(n * layers * heads).indices] = True
    keep = keep.view(layers, heads, t)
    if not per_layer:
        return keep
    share = keep.sum((1, 2)).double() / heads  # slots per head each layer earned in the ranking
    counts = share.floor().long()
    counts[(share - counts).argsort(descending=True)[: n * layers - int(counts.sum())]] += 1  # the rounding
    out = torch.zeros_like(keep)
    for i in range(layers):
        out[i].scatter_(-1, ranked[i].topk(int(counts[i]), dim=-1).indices, True)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--recent", type=int, default=None)
    ap.add_argument("--per-query", action="store_true")
    ap.add_argument("--score", choices=("window", "repeat"), default="window")
    ap.add_argument("--no-pool", action="store_true", help="rank the raw scores (KVzip does not pool)")
    ap.add_argument("--value-norm", action="store_true", help="weigh scores by the values' norms (ExpectedAttention)")
    ap.add_argument("--allocate", action="store_true", help="also: budgets per layer / per head from one ranking")
    ap.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    model.eval()
    heads = HeadMask()
    AttentionInterface.register("bench_masked", heads)
    windows = prefix_windows(load_split("wiki", "test"), tokenizer, 1024, 128, args.docs)
    kl: dict[tuple[float, str], list[torch.Tensor]] = {}
    for ctx, nxt in windows:
        ids, p = torch.cat([ctx.ids, nxt])[None], ctx.ids.shape[0]
        full = model(ids).logits[0, p:-1].float().log_softmax(-1)
        if args.score == "repeat":
            scores = repeat_scores(model, ctx.ids, replay_instruction(tokenizer))
        else:
            scores = head_scores(model, ctx.ids, args.window, value_norm=args.value_norm)  # (layers, KV heads, T)
        if args.per_query:
            t = torch.arange(p)
            scores = scores / (p - torch.clamp(t, min=p - min(args.window, p)))
        recent = (0 if args.score == "repeat" else args.window) if args.recent is None else args.recent
        layers = range(scores.shape[0])
        uniform = scores.sum(1).mean(0)
        for kept in args.kept:
            pool = not args.no_pool
            one = keep_top(uniform, kept, recent, pool)
            choices = {
                "uniform": {i: one[None].expand_as(scores[i]) for i in layers},
                "per head": {
                    i: torch.stack([keep_top(s, kept, recent, not args.no_pool) for s in scores[i]]) for i in layers
                },
            }
            if args.allocate:
                by_layer = keep_allocated(scores, kept, recent, pool, per_layer=True)
                ragged = keep_allocated(scores, kept, recent, pool, per_layer=False)
                choices["per layer"] = {i: by_layer[i] for i in layers}
                choices["global"] = {i: ragged[i] for i in layers}
            for name, keep in choices.items():
                heads.keep = keep
                with attention_implementation(model, "bench_masked"):
                    logp = model(ids).logits[0, p:-1].float().log_softmax(-1)
                kl.setdefault((kept, name), []).append((full.exp() * (full - logp)).sum(-1))
    names = ["uniform", "per head"] + (["per layer", "global"] if args.allocate else [])
    print(f"{'kept':>6}  " + "  ".join(f"{n:>9}" for n in names) + "  ratio")
    for kept in args.kept:
        got = [float(torch.cat(kl[(kept, n)]).mean()) for n in names]
        print(f"{kept:6.3f}  " + "  ".join(f"{g:9.4f}" for g in got) + f"  {got[0] / got[1]:5.2f}")


if __name__ == "__main__":
    main()
