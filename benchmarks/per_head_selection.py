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
largest attention the replay puts on it), with ``--recent`` (default 0) recent tokens kept. ``--score mixed``:
``scored-heads``' own per-head scores (use with ``--no-pool --recent 32``), its replay score at weight ``--replay``
(default 0.5: the README's figures; the preset's now 0.75).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from kvcondense.data import load_split
from kvcondense.forward import parallel_forward
from kvcondense.layout import NEVER, text_layout
from kvcondense.methods import build_method
from kvcondense.methods.scored import layer_budgets
from kvcondense.models import load_model
from kvcondense.prefix_task import prefix_windows
from kvcondense.scoring import head_scores, pool_scores, repeat_scores, seen_by, with_scores

SINKS = 4


def context_pruned_logits(model, ids: torch.Tensor, p: int, keep: torch.Tensor) -> torch.Tensor:
    """Logits (L, V) of ``ids`` whose first ``p`` tokens (the context) are read whole, after which each layer and KV
    head sees only the context keys it kept (``keep``: (layers, KV heads, p) bool): the library's parallel forward
    over a layout with per-head expiry (a mask: this measures quality, not memory; the counts may differ per head)."""
    heads = torch.full((*keep.shape[:2], ids.shape[0]), NEVER)
    heads[..., :p] = torch.where(keep, NEVER, p - 1)
    layout = dataclasses.replace(text_layout(ids, heads.amax((0, 1))), head_expire=heads)
    return parallel_forward(model, [layout]).logits[0]


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


def allocate(ranked: torch.Tensor, n: int, per_layer: bool) -> torch.Tensor:
    """Bool (layers, KV heads, T): the best n x heads x layers entries of ``ranked`` over the whole cache (entries at
    +inf: kept in every head). ``per_layer``: only each layer's share is taken from that ranking, then every head of
    the layer keeps its own best that many (a rectangle per layer); else the ranking decides alone (a ragged cache:
    what KVzip keeps, masked, not freed)."""
    layers, heads, t = ranked.shape
    if not per_layer:
        keep = torch.zeros(ranked.numel(), dtype=torch.bool)
        keep[ranked.flatten().topk(n * layers * heads).indices] = True
        return keep.view(layers, heads, t)
    out = torch.zeros(layers, heads, t, dtype=torch.bool)
    for i, count in enumerate(layer_budgets(ranked, n).tolist()):  # the library's rule (scored --allocate layer)
        out[i].scatter_(-1, ranked[i].topk(count, dim=-1).indices, True)
    return out


def keep_allocated(scores: torch.Tensor, kept: float, window: int, pool: bool, per_layer: bool) -> torch.Tensor:
    """:func:`allocate` of the best floor(kept x T) (pooled) scores per head on average, sinks and window in
    every head."""
    t = scores.shape[-1]
    ranked = pool_scores(scores) if pool else scores.clone()
    ranked[..., :SINKS] = ranked[..., t - window :] = float("inf")
    return allocate(ranked, math.floor(kept * t), per_layer)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--recent", type=int, default=None)
    ap.add_argument("--per-query", action="store_true")
    ap.add_argument("--score", choices=("window", "repeat", "mixed"), default="window")
    ap.add_argument("--no-pool", action="store_true", help="rank the raw scores (KVzip does not pool)")
    ap.add_argument("--value-norm", action="store_true", help="weigh scores by the values' norms (ExpectedAttention)")
    ap.add_argument("--replay", type=float, default=0.5, help="--score mixed: the replay score's weight")
    ap.add_argument("--allocate", action="store_true", help="also: budgets per layer / per head from one ranking")
    ap.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    model.eval()
    windows = prefix_windows(load_split("wiki", "test"), tokenizer, 1024, 128, args.docs)
    kl: dict[tuple[float, str], list[torch.Tensor]] = {}
    for ctx, nxt in windows:
        ids, p = torch.cat([ctx.ids, nxt]), ctx.ids.shape[0]
        full = model(ids[None]).logits[0, p:-1].float().log_softmax(-1)
        if args.score == "mixed":  # scored-heads' own scores: mean attention x value norm and replay, as shares
            scores = with_scores(model, build_method("scored-heads", replay=args.replay), ctx).head_scores
        elif args.score == "repeat":
            scores = repeat_scores(model, ctx.ids, replay_instruction(tokenizer))
        else:
            scores = head_scores(model, ctx.ids, args.window, value_norm=args.value_norm)  # (layers, KV heads, T)
        if args.per_query:
            scores = scores / seen_by(p, args.window)
        recent = (0 if args.score == "repeat" else args.window) if args.recent is None else args.recent
        uniform = scores.sum(1).mean(0)
        for kept in args.kept:
            pool = not args.no_pool
            one = keep_top(uniform, kept, recent, pool)
            choices = {
                "uniform": one.expand_as(scores),
                "per head": torch.stack([torch.stack([keep_top(s, kept, recent, pool) for s in by]) for by in scores]),
            }
            if args.allocate:
                choices["per layer"] = keep_allocated(scores, kept, recent, pool, per_layer=True)
                choices["global"] = keep_allocated(scores, kept, recent, pool, per_layer=False)
            for name, keep in choices.items():
                logp = context_pruned_logits(model, ids, p, keep)[p:-1].float().log_softmax(-1)
                kl.setdefault((kept, name), []).append((full.exp() * (full - logp)).sum(-1))
    names = ["uniform", "per head"] + (["per layer", "global"] if args.allocate else [])
    print(f"{'kept':>6}  " + "  ".join(f"{n:>9}" for n in names) + "  ratio")
    for kept in args.kept:
        got = [float(torch.cat(kl[(kept, n)]).mean()) for n in names]
        print(f"{kept:6.3f}  " + "  ".join(f"{g:9.4f}" for g in got) + f"  {got[0] / got[1]:5.2f}")


if __name__ == "__main__":
    main()
