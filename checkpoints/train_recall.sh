#!/usr/bin/env bash
# The exact command that made the committed recall checkpoint (CPU, 2 cores, SmolLM2-135M, recall train split):
# CCM-concat trained on memory of arbitrary facts. Each example is one episode: 16 facts "The code word for X is
# y.", each compressed into 4 <COMP> tokens as it comes, then "The code word for X is" with the loss on " y" only.
# LoRA rank 8 (alpha 16, the CCM paper's smaller setting) keeps the adapter at 1.9 MB.
set -u
cd "$(dirname "$0")/.."
steps=${STEPS:-600}
.venv/bin/kvcondense train --method ccm-concat --comp-tokens 4 --data recall --block-tokens 192 --batch-size 4 \
  --lr 3e-4 --schedule cosine --steps "$steps" --warmup-steps $((steps * 3 / 100)) --save-every $((steps / 10)) \
  --lora-rank 8 --out checkpoints/concat-recall > checkpoints/concat-recall.console.log 2>&1 \
  || echo "training failed for concat-recall"
