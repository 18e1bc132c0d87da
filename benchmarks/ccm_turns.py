"""Online memory over a long chat: stored KV and time per turn against the number of turns, measured in one run.

    .venv/bin/python benchmarks/ccm_turns.py --turns 100 --comp-tokens 8 --json runs/ccm_turns/result.json

Feeds the turns of real chitchat conversations (test split, joined end to end) one at a time into
- CCM-merge: each turn folded into a constant n slots per layer,
- CCM-concat: n slots per layer added per turn,
- full context: every turn's tokens kept,
through the evicting cache of :class:`kvcondense.session.MemorySession` (full context: the same cache, nothing
evicted). Memory and time do not depend on training, so the default model with untrained <COMP> rows is used
unless --checkpoint is given. Prints stored slots after turns 1/10/100, the time per turn of the last 10 turns over
the first 10 (merge should stay near 1; full grows with the context), and writes ``memory_by_turn`` records that
``kvcondense report`` plots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvcondense.cache import EvictingCache
from kvcondense.data.episodes import load_episodes
from kvcondense.forward import feed, num_layers
from kvcondense.layout import text_layout
from kvcondense.methods import build_method
from kvcondense.models import add_special_tokens, load_model
from kvcondense.session import MemorySession


def chat_turns(n: int) -> list[str]:
    turns: list[str] = []
    for ep in load_episodes("chitchat", "test"):
        turns += list(ep.chunks)
        if len(turns) >= n:
            return turns[:n]
    raise SystemExit(f"the chitchat test split has fewer than {n} turns")


class FullContext:
    """Every turn kept: the same evicting cache, with nothing that expires."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.cache = EvictingCache(num_layers(model))

    @torch.no_grad()
    def feed(self, text: str) -> None:
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        lay = text_layout(ids)
        lay.position_ids += self.cache.seen
        feed(self.model, self.cache, lay, self.cache.seen)

    def memory_slots(self) -> int:
        return int(self.cache.stored_slots()[0])

    def memory_bytes(self) -> int:
        return self.cache.kv_bytes()


def run(session, turns: list[str]) -> tuple[list[int], list[int], list[float]]:
    slots, nbytes, seconds = [], [], []
    for turn in turns:
        t0 = time.perf_counter()
        session.feed(turn)
        seconds.append(time.perf_counter() - t0)
        slots.append(session.memory_slots())
        nbytes.append(session.memory_bytes())
    return slots, nbytes, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--comp-tokens", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", default=None, help="write memory_by_turn records here")
    args = ap.parse_args()
    torch.manual_seed(0)
    turns = chat_turns(args.turns)
    model, tokenizer = load_model(args.model)
    model.eval()
    records = []
    for name in ("ccm-merge", "ccm-concat", "full"):
        if name == "full":
            session = FullContext(model, tokenizer)
        else:
            method = build_method(name, comp_tokens=args.comp_tokens)
            ids = add_special_tokens(model, tokenizer, method.special_tokens)
            session = MemorySession(model, tokenizer, method, ids, name=f"{args.model} (untrained {name})")
        run(session, turns[:2])  # warm-up (allocator, first-call overheads), not timed
        session = FullContext(model, tokenizer) if name == "full" else MemorySession(model, tokenizer, method, ids)
        slots, nbytes, seconds = run(session, turns)
        first, last = statistics.median(seconds[:10]), statistics.median(seconds[-10:])
        print(
            f"{name:<11} slots after turn 1/10/{len(turns)}: {slots[0]}/{slots[9]}/{slots[-1]}  "
            f"KV MiB at the end {nbytes[-1] / 2**20:.2f}  time/turn last10/first10 {last / first:.2f} "
            f"({first * 1e3:.0f} -> {last * 1e3:.0f} ms)"
        )
        records.append(
            {
                "method": name,
                "label": f"{name} (n={args.comp_tokens})" if name != "full" else "full context",
                "comp_tokens": args.comp_tokens,
                "memory_by_turn": nbytes,
                "slots_by_turn": slots,
                "seconds_by_turn": [round(s, 4) for s in seconds],
                "time_ratio_last10_first10": last / first,
            }
        )
    merge, concat = records[0]["slots_by_turn"], records[1]["slots_by_turn"]
    print(f"merge constant at {args.comp_tokens} slots after turn 1: {all(s == args.comp_tokens for s in merge)}")
    growth = {b - a for a, b in zip(concat, concat[1:], strict=False)}
    print(f"concat grows by exactly {args.comp_tokens} slots per turn: {growth == {args.comp_tokens}}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"results": records}, indent=1))
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
