#!/usr/bin/env bash
# The exact commands that made the committed gist checkpoints (CPU, 2 cores, SmolLM2-135M, wiki train split).
# Stage 1 trains the gist rows only; stage 2 starts from it and trains LoRA + rows (the paper's stages 1-2).
# GIST_DATA=books trains on the Shakespeare train split instead (checkpoints/gist4-books; the long-document test).
set -u
cd "$(dirname "$0")/.."
data=${GIST_DATA:-wiki}
suffix=$([ "$data" = wiki ] && echo "" || echo "-$data")
for n in ${GIST_NS:-4}; do
  name="gist$n$suffix"
  .venv/bin/kvcondense train --method gist --gist-tokens "$n" --data "$data" --stage rows --steps 40 --batch-size 4 \
    --lr 1e-3 --save-every 20 --out "checkpoints/$name-stage1" > "checkpoints/$name-stage1.console.log" 2>&1 \
    || { echo "stage 1 failed for $name"; continue; }
  .venv/bin/kvcondense train --method gist --gist-tokens "$n" --data "$data" --stage lora \
    --init-from "checkpoints/$name-stage1" --steps 150 --batch-size 4 --lr 3e-4 --save-every 25 \
    --out "checkpoints/$name" > "checkpoints/$name.console.log" 2>&1 || echo "stage 2 failed for $name"
done
