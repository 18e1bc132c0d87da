"""Cost of a KL-to-the-uncompressed-model training step against an LM-only step, measured in one run.

    .venv/bin/python benchmarks/kl_step_cost.py [--model smollm2-135m] [--repeats 5] [--batch 4] [--block 256]

Both steps run on the same batch of sentinel layouts (forward + backward through the LoRA model); the KL step adds
the teacher's forward (adapters off, raw text, no grad) and the chunked KL; "kl, bf16 teacher" runs that forward
under bf16 autocast (``--teacher-dtype bfloat16``). The two are interleaved, each repeat
timing one of each, and the ratio of the medians is printed (this machine is noisy: compare ratios). Target: the
KL step costs at most 1.35x the LM step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator

from kvcondense.data import load_split
from kvcondense.methods import Sentinel
from kvcondense.train import TrainConfig, objective_loss, prepare_model, text_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    args = ap.parse_args()
    method = Sentinel(ratio=0.5)
    configs = {name: TrainConfig(model=args.model, objective=name) for name in ("lm", "kl", "lm+kl")}
    configs["kl, bf16 teacher"] = TrainConfig(model=args.model, objective="kl", teacher_dtype="bfloat16")
    model, tok, token_ids, _ = prepare_model(configs["lm"], method)
    blocks = text_blocks(load_split("wiki", "validation"), tok, args.block)[: args.batch]
    layouts = [method.layout(b, token_ids, seed=i) for i, b in enumerate(blocks)]
    accelerator = Accelerator(cpu=True)

    def step(cfg: TrainConfig) -> float:
        t = time.perf_counter()
        loss, _ = objective_loss(model, layouts, cfg, accelerator)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(configs["kl"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            times[name].append(step(cfg))
    lm = statistics.median(times["lm"])
    print(f"training step ({args.batch} x {args.block} tokens, sentinel r=0.5, {torch.get_num_threads()} threads):")
    for name in configs:
        med = statistics.median(times[name])
        print(f"  --objective {name:<17} median {med * 1e3:7.0f} ms   ratio to lm {med / lm:.2f}x")


if __name__ == "__main__":
    main()
