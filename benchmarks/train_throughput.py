"""Training throughput: dense-mask sdpa against flex_attention with a block-sparse mask, at long lengths.

    python benchmarks/train_throughput.py [--model smollm2-135m | --config FILE] [--method sentinel] [--ratio 0.5]
        [--lengths 2048 4096 8192] [--steps 3] [--forward-only]

One training step = the parallel masked forward of one layout of L tokens, the loss, its backward and an AdamW
step, with the recipe's LoRA and trainable token rows (bf16 autocast on CUDA, as ``kvcondense train`` does). Both
variants run the same layouts from the same weights, interleaved; the first step of each is a warm-up (flex
compiles there) and the best of ``--steps`` timed steps is kept. Printed per length: tokens/s of each, their
ratio (flex / sdpa), the fraction of causal 128 x 128 blocks in which nothing is visible (what a
block-sparse kernel skips beyond causality), and on CUDA the peak memory of each.

Timing does not depend on the weights, so ``--config`` builds the model from a config file with random weights:
that runs where the default model's weights are not available (a GPU machine without the package cache). The
layouts are synthetic text (one token per word, a line every 100 tokens) so that no tokenizer is needed; the
method lays them out exactly as it lays out real text (sentinel spans of 2..25 words per line, and so on).

flex_attention has no backward on CPU (torch 2.13): there ``--forward-only`` is implied and the numbers are for
the forward alone. The issue's target is on GPU at 8k tokens: block-sparse faster than dense sdpa.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvcondense.forward import parallel_forward
from kvcondense.lora import LoraSettings, attach_lora
from kvcondense.masks import batch_visibility
from kvcondense.methods import TokenizedText, build_method
from kvcondense.models import load_model
from kvcondense.train import lm_loss


def synthetic_text(n: int, vocab: int, seed: int) -> TokenizedText:
    """``n`` random tokens, one word each, a new line every 100 tokens, a sentence end every 20."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    pos = torch.arange(n)
    return TokenizedText(ids, pos, pos // 100, pos % 20 == 19)


def blocks_skipped(layouts, block: int = 128) -> float:
    """Fraction of the causal 128 x 128 blocks (those on or below the diagonal) in which no query sees any key:
    what a block-sparse kernel skips beyond causality."""
    vis = batch_visibility(layouts)[0]
    n = vis.shape[0]
    nb = -(-n // block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = vis
    used = padded.view(nb, block, nb, block).any(3).any(1)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    return 1 - int(used[causal].sum()) / int(causal.sum())


def build(args):
    """The model: random weights from ``--config`` (timing only), else the registered or local model."""
    if args.config:
        with open(args.config) as f:
            fields = json.load(f)
        fields.pop("quantization_config", None)  # the GGUF origin of the default model's config
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return load_model(args.model)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", default=None, help="a model config.json: random weights (timing only)")
    ap.add_argument("--method", default="sentinel")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    forward_only = args.forward_only or device.type == "cpu"
    model = build(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    method = build_method(args.method, ratio=args.ratio)
    names = method.special_tokens
    model.resize_token_embeddings(vocab + len(names), mean_resizing=False)
    token_ids = {t: vocab + i for i, t in enumerate(names)}
    model = attach_lora(model, LoraSettings(), list(token_ids.values()), method.lora_on).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(layouts, attention: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast, torch.set_grad_enabled(not forward_only):
            logits = parallel_forward(model, layouts, attention=attention).logits
            loss, _ = lm_loss(logits.float(), layouts)
        if not forward_only:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rows = []
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{args.config or args.model} on {where}, {args.method} r={args.ratio}, "
        f"{'forward only' if forward_only else 'training step (forward + backward + AdamW)'}, "
        f"best of {args.steps} after a warm-up"
    )
    for length in args.lengths:
        layouts = [method.layout(synthetic_text(length, vocab, seed=length), token_ids, seed=0)]
        n = len(layouts[0])
        sparsity = blocks_skipped(layouts)
        times: dict[str, list[float]] = {"sdpa": [], "flex": []}
        peak: dict[str, int] = {}
        for i in range(args.steps + 1):
            for attention in ("sdpa", "flex"):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = step(layouts, attention)
                if i:
                    times[attention].append(t)
                if device.type == "cuda":
                    peak[attention] = torch.cuda.max_memory_allocated()
        tps = {k: n / min(v) for k, v in times.items()}
        row = {
            "length": n,
            "text_tokens": length,
            "kv_kept": layouts[0].kept_slots() / length,
            "blocks_skipped": sparsity,
            "sdpa_tokens_per_s": tps["sdpa"],
            "flex_tokens_per_s": tps["flex"],
            "flex_over_sdpa": tps["flex"] / tps["sdpa"],
            **{f"{k}_peak_bytes": v for k, v in peak.items()},
        }
        rows.append(row)
        mem = f", peak {peak['sdpa'] / 2**30:.2f} vs {peak['flex'] / 2**30:.2f} GiB" if peak else ""
        print(
            f"L={n:6d} ({length} text, KV kept {row['kv_kept']:.2f}, {100 * sparsity:.0f} % of causal blocks skipped): "
            f"sdpa {tps['sdpa']:8.0f} tok/s, flex {tps['flex']:8.0f} tok/s, flex/sdpa {row['flex_over_sdpa']:.2f}"
            + mem,
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "forward_only": forward_only, "method": args.method, "rows": rows}, f)


if __name__ == "__main__":
    main()
