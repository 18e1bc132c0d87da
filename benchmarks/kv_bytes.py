"""KV bytes actually stored after sentinel compression against (text tokens kept + one <CR> per span) x bytes
per token. Target: within 2 %.

    .venv/bin/python benchmarks/kv_bytes.py [--model smollm2-135m] [--tokens 1024] [--docs 4]
"""

from __future__ import annotations

import argparse

import torch

from kvcondense.data import load_split
from kvcondense.engine import incremental_forward
from kvcondense.layout import Kind
from kvcondense.methods import Sentinel, tokenize
from kvcondense.models import add_special_tokens, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    method = Sentinel(ratio=args.ratio)
    ids = add_special_tokens(model, tok, method.special_tokens)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(model.dtype).bits // 8
    print(f"bytes per token: {per_token:,}")
    worst = 0.0
    for i, doc in enumerate(load_split("wiki", "test")[: args.docs]):
        layout = method.layout(tokenize(doc.text, tok)[: args.tokens], ids, seed=i)
        _, stats = incremental_forward(model, layout, chunk_size=128)
        spans = int((layout.kinds == Kind.CLOSE).sum())
        kept_text = int(((layout.kinds == Kind.TEXT) & (layout.expire >= len(layout))).sum())
        expected = (kept_text + spans) * per_token
        err = abs(stats.kv_bytes - expected) / expected
        worst = max(worst, err)
        print(
            f"doc {i}: {layout.n_text} text tokens, {spans} spans, kept {kept_text} text + {spans} <CR>; "
            f"stored {stats.kv_bytes:,} B, expected {expected:,} B, full {layout.n_text * per_token:,} B, "
            f"kv_ratio {stats.kv_bytes / (layout.n_text * per_token):.3f}, error {100 * err:.2f}%"
        )
    print(f"worst error {100 * worst:.2f}% (target < 2%)")


if __name__ == "__main__":
    main()
