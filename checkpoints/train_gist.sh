#!/usr/bin/env bash
# The exact commands that made the committed gist checkpoints (CPU, 2 cores, SmolLM2-135M, wiki train split).
# Stage 1 trains the gist rows only; stage 2 starts from it and trains LoRA + rows (the paper's stages 1-2).
set -u
cd "$(dirname "$0")/.."
for n in ${GIST_NS:-4}; do
  .venv/bin/kvcondense train --method gist --gist-tokens "$n" --stage rows --steps 40 --batch-size 4 --lr 1e-3 \
    --save-every 20 --out "checkpoints/gist$n-stage1" > "checkpoints/gist$n-stage1.console.log" 2>&1 \
    || { echo "stage 1 failed for N=$n"; continue; }
  .venv/bin/kvcondense train --method gist --gist-tokens "$n" --stage lora --init-from "checkpoints/gist$n-stage1" \
    --steps 150 --batch-size 4 --lr 3e-4 --save-every 25 --out "checkpoints/gist$n" \
    > "checkpoints/gist$n.console.log" 2>&1 || echo "stage 2 failed for N=$n"
done
