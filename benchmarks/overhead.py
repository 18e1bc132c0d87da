"""Cost of the mask construction and eviction bookkeeping against a training step and a decode step.

    .venv/bin/python benchmarks/overhead.py [--model smollm2-135m] [--repeats 3]

Prints ratios measured in one run (this machine is noisy: compare ratios, not absolutes). Target: < 5 %.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvcondense.data import load_split
from kvcondense.engine import Stream
from kvcondense.forward import parallel_forward
from kvcondense.lora import LoraSettings, attach_lora
from kvcondense.masks import batch_visibility, to_attention_mask
from kvcondense.methods import Sentinel, tokenize
from kvcondense.models import add_special_tokens, load_model
from kvcondense.train import lm_loss, text_blocks


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    method = Sentinel(ratio=0.5)
    ids = add_special_tokens(model, tok, method.special_tokens)
    docs = load_split("wiki", "validation")
    blocks = text_blocks(docs, tok, 256)[:4]

    # -- training step: layouts + dense mask vs forward + backward -----------------------------------------------
    peft = attach_lora(model, LoraSettings(), list(ids.values()))
    peft.train()

    def bookkeeping_train():
        layouts = [method.layout(b, ids, seed=i) for i, b in enumerate(blocks)]
        to_attention_mask(batch_visibility(layouts), "sdpa", torch.float32)

    layouts = [method.layout(b, ids, seed=i) for i, b in enumerate(blocks)]

    def train_step():
        loss, _ = lm_loss(parallel_forward(peft, layouts).logits, layouts)
        loss.backward()

    t_mask = best(bookkeeping_train, args.repeats)
    t_step = best(train_step, args.repeats)
    print(
        f"training step (4 x 256 tokens): step {t_step * 1e3:.0f} ms, layouts + mask {t_mask * 1e3:.1f} ms, "
        f"overhead {100 * t_mask / t_step:.2f}%"
    )

    # -- decode step: mask against the cache + append + evict + policy vs the model call ---------------------------
    peft.eval()
    text = tokenize(" ".join(d.text for d in docs), tok)[: args.context]
    stream = Stream(peft, method, ids)
    stream.prefill(text, chunk_tokens=256)
    cache, model_time = stream.cache, [0.0]

    def started(*_):
        model_time.append(time.perf_counter())

    def finished(*_):
        model_time[0] += time.perf_counter() - model_time.pop()

    hooks = [peft.register_forward_pre_hook(started), peft.register_forward_hook(finished)]
    steps, t_total = 24, 0.0
    for i in range(steps):  # the engine's step: policy, expiry, mask, model, append, evict
        t0 = time.perf_counter()
        stream.step([100 + i])
        t_total += time.perf_counter() - t0
    for hook in hooks:
        hook.remove()
    t_book = t_total - model_time[0]
    t_model = t_total - t_book
    print(
        f"decode step ({args.context}-token context, {int(cache.stored_slots()[0])} slots stored): "
        f"model {t_model / steps * 1e3:.1f} ms, bookkeeping {t_book / steps * 1e3:.2f} ms, "
        f"overhead {100 * t_book / t_model:.2f}%"
    )


if __name__ == "__main__":
    main()
