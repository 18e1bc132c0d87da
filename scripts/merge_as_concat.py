"""A CCM-merge checkpoint's memories read two ways: averaged (merge, as trained) and concatenated (the same
weights through the concat layout). At t = 1 both are the same memory (a_1 = 1), so the two perplexities must
agree; beyond, the gap shows what the averaging does with these weights.

    .venv/bin/python scripts/merge_as_concat.py [--checkpoint checkpoints/merge-chitchat] [--episodes 30] [--t 1 2 4]

Same episodes as the README's table (chitchat test split, the first with at least 16 earlier turns).
"""

from __future__ import annotations

import argparse
import math

from kvcondense.data.episodes import load_episodes
from kvcondense.loader import load_checkpoint
from kvcondense.memory_eval import score_episodes
from kvcondense.methods import build_method, tokenize_episode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/merge-chitchat")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--t", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    got = load_checkpoint(args.checkpoint)
    model, tok, merge, token_ids = got.model, got.tokenizer, got.method, got.token_ids
    if merge.name != "ccm-merge":
        raise SystemExit(f"{args.checkpoint} holds {merge.name}, not ccm-merge; give a ccm-merge checkpoint")
    episodes = [e for e in load_episodes("chitchat", "test", 0) if len(e.chunks) >= 16][: args.episodes]
    tokens = [tokenize_episode(e, tok) for e in episodes]
    concat = build_method("ccm-concat", comp_tokens=merge.comp_tokens)
    print(f"{args.checkpoint}: last-turn perplexity on {len(tokens)} chitchat test conversations")
    for t in args.t:
        cut = [e.truncated(t) for e in tokens]
        cells = []
        for name, method in (("merged (as trained)", merge), ("concatenated", concat)):
            s = score_episodes(model, method, token_ids, cut, 4)
            cells.append(f"{name} {math.exp(s.nll / s.tokens):.3f} ({s.slots / s.episodes:.0f} slots)")
        print(f"t={t}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
