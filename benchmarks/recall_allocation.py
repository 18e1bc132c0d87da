"""Where KVzip's recall lead comes from: the scored-heads choice with three allocations of one budget, in one harness.

    .venv/bin/python benchmarks/recall_allocation.py [--episodes 30] [--kept 0.5 0.25 0.125] [--replay 0.5]
        [--window-share 0.5] [--questions 1]

``kvcondense eval --task qa --data recall --method scored-heads`` keeps, in every (layer, KV head), the same number
of context tokens (a rectangle the cache can free); kvpress's KVzip ranks every (layer, head, token) score at once
and keeps the best, so a head may keep many tokens and another few (it masks, and frees nothing). This measures what
that difference alone is worth on the recall episodes, with everything else equal: the same held-out episodes and
questions as the recall table, the same scores (``scored-heads``' attention and replay scores mixed, at ``--replay``
and ``--window-share``: the defaults are the settings of the README's table, the preset's now 0.75 and 0.25), the same
sinks and recent window kept in every head, the same number of kept (layer, head, token) entries:

- ``equal``: the method's own layout (every head keeps as many; what ``eval`` measures through the cache);
- ``per layer``: each layer's share taken from one ranking over the whole cache, every head of a layer keeping that
  many (a rectangle per layer);
- ``global``: that ranking alone (KVzip's allocation: heads keep unequal counts).

The context is read whole, then the question and each option read only what each head kept (the library's parallel
forward with per-head expiry: a mask, quality not memory); the option with the highest summed log-likelihood is the
answer, as in ``eval``. Prints accuracy per allocation and budget.
"""

from __future__ import annotations

import argparse

import torch
from per_head_selection import allocate, context_pruned_logits  # beside this script, on sys.path when run

from kvcondense.data.episodes import load_episodes
from kvcondense.layout import NEVER
from kvcondense.methods import build_method, tokenize
from kvcondense.models import load_model
from kvcondense.qa_task import episodes_as_qa
from kvcondense.scoring import with_scores


def option_logprob(model, context: torch.Tensor, keep: torch.Tensor, prompt: torch.Tensor, option: torch.Tensor):
    """Summed log-likelihood of ``option`` after ``context`` (read whole, then each head sees only ``keep``) and
    ``prompt``."""
    ids = torch.cat([context, prompt, option])
    logp = context_pruned_logits(model, ids, context.shape[0], keep).float().log_softmax(-1)
    rows = torch.arange(ids.shape[0] - option.shape[0] - 1, ids.shape[0] - 1)
    return float(logp[rows, option].sum())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--questions", type=int, default=1)
    ap.add_argument("--replay", type=float, default=0.5)
    ap.add_argument("--window-share", type=float, default=0.5, help="the recent window's most (the preset: 0.25)")
    ap.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    items = episodes_as_qa(load_episodes("recall", "test"), args.episodes, args.questions)
    names = ("equal", "per layer", "global")
    right = {(kept, n): 0 for kept in args.kept for n in names}
    asked = 0
    for item in items:
        text = tokenize(item.context, tok)
        settings = {"replay": args.replay, "window_share": args.window_share, "allocate": "head"}
        scored = with_scores(model, build_method("scored-heads", **settings), text)
        choices = {}
        for kept in args.kept:
            layout = build_method("scored-heads", ratio=1 - kept, **settings).layout(scored, {})
            equal = layout.head_expire == NEVER
            fixed = equal.all(0).all(0)  # the sinks and the recent window (and any token every head chose)
            per_head = int(equal[0, 0].sum()) - int(fixed.sum())
            ranked = scored.head_scores.masked_fill(fixed, float("-inf"))
            choices[kept] = {
                "equal": equal,
                # per_head more entries per head on average, the best of the others, beside the fixed ones
                "per layer": allocate(ranked, per_head, per_layer=True) | fixed,
                "global": allocate(ranked, per_head, per_layer=False) | fixed,
            }
            assert all(int(c.sum()) == int(equal.sum()) for c in choices[kept].values())  # the same entries kept
        for q in item.questions:
            asked += 1
            prompt = torch.tensor(tok(q.prompt(), add_special_tokens=False)["input_ids"])
            opts = [torch.tensor(tok(q.option_text(o), add_special_tokens=False)["input_ids"]) for o in q.options]
            for kept, by in choices.items():
                for name, keep in by.items():
                    got = [option_logprob(model, text.ids, keep, prompt, o) for o in opts]
                    right[(kept, name)] += q.options[max(range(len(got)), key=got.__getitem__)] == q.answer
    print(f"{'kept':>6}  " + "  ".join(f"{n:>9}" for n in names) + f"   ({asked} questions)")
    for kept in args.kept:
        print(f"{kept:6.3f}  " + "  ".join(f"{right[(kept, n)] / asked:9.3f}" for n in names))


if __name__ == "__main__":
    main()
